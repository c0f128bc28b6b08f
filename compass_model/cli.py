"""``compass`` command line.

  compass demo [--out DIR] [--resume]       the main job: the tiny preset through all seven stages,
                                            evaluation, FP8, plots and DIR/report.json (~7 min on 2 cores)
  compass train --preset NAME|--config FILE --stages LIST [--data [STAGE=]FILE ...] [--steps N] [--seed N]
                --out DIR [--resume | --overwrite] [--save-every N] [--keep-last N] [--device D] [--dtype T]
  torchrun --nproc-per-node N*M -m compass_model.cli train ... --dp N --ep M   data x expert parallel
                                            (gloo / NCCL; docs/distributed.md)
  compass eval --checkpoint DIR [--out FILE]
  compass generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--speculative]
  compass quantize --checkpoint DIR [--out FILE] [--save DIR]
                                            naive vs expert-aware FP8: logit error, accuracy per language,
                                            calibration coverage, worst-expert SQNR, MoE layer speed
  compass experiment balance|experts|combine|otpo-vs-dpo [--quick] [--out DIR]
                                            the paper's ablations, JSON + PNG each
  compass plan --preset NAME --gpus N [--gpu-mem GiB] [--seq-len L] [--micro-batch B] [--dp N --ep M]
                                            per-GPU memory and all-to-all bytes of a dp x ep layout
  compass info                              what compass_kernels built and would use (JSON)
  compass route-demo                        the routing kernels against the Megatron-style path

An error prints one line, ``compass: error: <cause and fix>``, and exits 1 (2 for a bad command
line); ``--debug`` (anywhere on the line, or ``COMPASS_DEBUG=1``) shows the traceback instead.
``--checkpoint`` takes a model directory, a stage directory (its LATEST) or a run's ``--out``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from compass_model.cli_config import STAGE_LIST


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {v}")
    return v


def _runtime(p, dtype_help: str) -> None:
    p.add_argument("--device", default=None, help="cpu | cuda | cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None, help=dtype_help)


def _checkpoint_command(sub, name: str, help_: str):
    p = sub.add_parser(name, help=help_)
    p.add_argument("--checkpoint", required=True,
                   help="a model directory, a stage directory (its LATEST) or the --out of compass train")
    p.add_argument("--tokenizer", default=None, help="a tokenizers JSON file (default: UTF-8 bytes)")
    _runtime(p, "cast the weights to this dtype (default: as saved)")
    return p


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="compass", description="Compass: MoE kernels and the Compass-v3 recipe")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def run_options(p):
        p.add_argument("--out", default="compass-out", help="run directory (default: compass-out); must be "
                       "empty unless --resume or --overwrite")
        p.add_argument("--seed", type=int, default=0)
        how = p.add_mutually_exclusive_group()
        how.add_argument("--resume", action="store_true", help="continue the run in --out: skip finished stages, "
                         "continue the interrupted one (same config and seed required)")
        how.add_argument("--overwrite", action="store_true", help="delete the run in --out and start over")
        p.add_argument("--tokenizer", default=None, help="a tokenizers JSON file (default: UTF-8 bytes)")
        p.add_argument("--no-progress", action="store_true")
        p.add_argument("--save-every", type=_positive, default=None,
                       help="checkpoint every N steps and at each stage's end (default: ~20 per stage, at "
                            "least every 100 steps)")
        p.add_argument("--keep-last", type=_positive, default=2, help="checkpoints kept per stage (default: 2)")
        _runtime(p, "compute precision: bfloat16 = autocast, weights and optimizer stay fp32 (default: "
                    "each stage's precision)")

    run_options(sub.add_parser("demo", help="the tiny preset through all seven stages, evaluation and plots"))
    t = sub.add_parser("train", help="train stages of the recipe")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="tiny | small | proxy-2b | compass-v3 | compass-v3-top4")
    src.add_argument("--config", help='JSON: {"model": {"preset": ..., fields...}, "stages": [{...}]}')
    t.add_argument("--stages", default=STAGE_LIST, help=f"comma-separated (default: {STAGE_LIST})")
    t.add_argument("--data", action="append", metavar="[STAGE=]FILE",
                   help="JSONL data: FILE for every stage, STAGE=FILE for one (repeatable). {text} for "
                        "pretraining stages, {prompt,response,domain} for sft, {prompt,chosen,rejected} for align")
    t.add_argument("--steps", type=int, help="steps for every stage (overrides the config)")
    t.add_argument("--no-eval", action="store_true")
    t.add_argument("--stop-after", type=int, help="leave after N optimizer steps (a time-sliced job); "
                                                   "--resume continues")
    t.add_argument("--ep", type=_positive, default=1, help="expert parallelism over torchrun's processes "
                                                           "(torchrun --nproc-per-node dp*ep ... --dp N --ep M)")
    t.add_argument("--dp", type=_positive, default=1, help="data parallelism: torchrun starts dp x ep processes; "
                                                           "dp > 1 FSDP2-shards the weights")
    t.add_argument("--router-stats", choices=["global", "local"], default="global",
                   help="router load statistics over the whole batch (default) or each rank's rows")
    t.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute attention and experts in the backward (less activation memory)")
    t.add_argument("--fp8", action="store_true", help="add the FP8 report (naive vs expert-aware) after evaluation")
    run_options(t)
    e = _checkpoint_command(sub, "eval", "evaluate a checkpoint on held-out tasks")
    e.add_argument("--out", help="also write the JSON here")
    e.add_argument("--n-tasks", type=_positive, default=70)
    e.add_argument("--no-progress", action="store_true")
    g = _checkpoint_command(sub, "generate", "generate from a checkpoint")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=_positive, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding (greedy)")
    g.add_argument("--seed", type=int, default=0)
    q = _checkpoint_command(sub, "quantize", "FP8 report (naive vs expert-aware) for a checkpoint; --save writes one")
    q.add_argument("--out", help="write the report JSON here")
    q.add_argument("--save", help="save the expert-aware FP8 model (safetensors with scales) here")
    q.add_argument("--n-tasks", type=_positive, default=700, help="held-out tasks (700 = 100 per language)")
    q.add_argument("--min-tokens-per-expert", type=int, default=128)
    q.add_argument("--no-progress", action="store_true")
    xp = sub.add_parser("export", help="write a checkpoint another library loads (--format hf: transformers)")
    xp.add_argument("--checkpoint", required=True)
    xp.add_argument("--format", required=True, choices=["hf"])
    xp.add_argument("--out", required=True)
    x = sub.add_parser("experiment", help="run one of the paper's experiments (JSON + PNG)")
    x.add_argument("name", choices=["balance", "experts", "combine", "otpo-vs-dpo", "all"])
    x.add_argument("--out", default="compass-out/experiments")
    x.add_argument("--quick", action="store_true", help="small sizes (seconds; what the tests run)")
    x.add_argument("--seed", type=int, default=0)
    pl = sub.add_parser("plan", help="per-GPU memory and all-to-all bytes of a preset at a dp x ep layout")
    pl.add_argument("--preset", required=True, help="tiny | small | proxy-2b | compass-v3")
    pl.add_argument("--gpus", type=_positive, required=True)
    pl.add_argument("--gpu-mem", type=float, default=80.0, help="GiB per GPU (default 80)")
    pl.add_argument("--seq-len", type=_positive, help="tokens per sequence (default: min(max_seq_len, 4096))")
    pl.add_argument("--micro-batch", type=_positive, default=1, help="sequences per GPU per micro-batch")
    pl.add_argument("--dp", type=_positive, help="data-parallel size (default: chosen with --ep)")
    pl.add_argument("--ep", type=_positive, help="expert-parallel size (default: the largest divisor of E "
                                                 "within a node)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    sub.add_parser("info", help="print compass_kernels.backend_info() as JSON")
    r = sub.add_parser("route-demo", help="route a Compass-shaped batch: the routing kernels against the "
                                          "Megatron-style path")
    r.add_argument("--tokens", type=_positive, default=8192)
    r.add_argument("--hidden", type=_positive, default=2048)
    r.add_argument("--reps", type=_positive, default=5)
    r.add_argument("--system-malloc", action="store_true",
                   help="keep glibc's default malloc settings (fresh pages for every large tensor)")
    return ap


def _dispatch(args, argv: list) -> int:
    from compass_model import cli_commands as c
    if args.cmd == "info":
        from compass_kernels import cli as kcli
        return kcli.main(["info"])
    if args.cmd == "route-demo":
        from compass_kernels import cli as kcli
        return kcli.main(["demo", "--tokens", str(args.tokens), "--hidden", str(args.hidden), "--reps",
                          str(args.reps), *(["--system-malloc"] if args.system_malloc else [])])
    if args.cmd == "plan":
        import json

        from compass_model.plan import format_plan, make_plan
        p = make_plan(args.preset, args.gpus, args.gpu_mem, args.seq_len, args.micro_batch, args.dp, args.ep)
        print(json.dumps(p.to_dict(), indent=1) if args.json else format_plan(p))
        return 0
    if args.cmd in ("demo", "train"):
        return c.train(args, demo=args.cmd == "demo")
    if args.cmd == "eval":
        return c.evaluate(args)
    if args.cmd == "quantize":
        return c.quantize(args)
    if args.cmd == "export":
        from compass_model.export_hf import export_hf
        print(f"transformers checkpoint (MixtralForCausalLM) written to {export_hf(args.checkpoint, args.out)}")
        return 0
    if args.cmd == "experiment":
        from compass_kernels.cli import reexec_with_malloc_tunables
        reexec_with_malloc_tunables(argv, "compass_model.cli")   # timings: large buffers stay in the heap
        from compass_model.experiments import EXPERIMENTS
        names = list(EXPERIMENTS) if args.name == "all" else [args.name]
        for n in names:
            EXPERIMENTS[n](args.out, quick=args.quick, seed=args.seed)
            print(f"{n}: {Path(args.out) / (n + '.json')} and .png")
        return 0
    return c.generate(args)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (redirections made after setup included)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def _setup_logging() -> None:
    """Progress, stage and experiment lines go to stderr, as bare messages (results go to stdout):
    the ``compass`` logger (progress, ``train/progress.py``) and the ``compass_model`` package's
    module loggers, at INFO."""
    for name in ("compass", "compass_model"):
        log = logging.getLogger(name)
        if not any(isinstance(h, _StderrHandler) for h in log.handlers):
            h = _StderrHandler()
            h.setFormatter(logging.Formatter("%(message)s"))
            log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    if isinstance(e, (KeyError, AttributeError, IndexError, AssertionError, NameError)):
        text = f"{type(e).__name__}: {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("COMPASS_DEBUG", "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    _setup_logging()
    try:
        return _dispatch(args, argv)
    except KeyboardInterrupt:
        print("compass: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"compass: error: {_one_line(e)}  (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
