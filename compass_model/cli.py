"""``compass`` command line.

  compass demo [--out DIR] [--resume]       the main job: the tiny preset through all seven stages,
                                            evaluation, FP8, plots and DIR/report.json (~7 min on 2 cores)
  compass train --preset NAME|--config FILE --stages LIST [--data FILE] [--steps N] [--seed N] --out DIR
  torchrun --nproc-per-node N -m compass_model.cli train ... --ep N     expert parallelism (gloo / NCCL)
  compass eval --checkpoint DIR [--out FILE]
  compass generate --checkpoint DIR --prompt TEXT [--max-new-tokens N] [--temperature T] [--speculative]
  compass quantize --checkpoint DIR [--out FILE] [--save DIR]
                                            naive vs expert-aware FP8: logit error, accuracy per language,
                                            calibration coverage, worst-expert SQNR, MoE layer speed
  compass experiment balance|experts|combine|otpo-vs-dpo [--quick] [--out DIR]
                                            the paper's ablations, JSON + PNG each
  compass info                              what compass_kernels built and would use (JSON)
  compass route-demo                        the routing kernels against the Megatron-style path
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STAGE_LIST = "general,ecommerce,reasoning,long_context_2x,long_context_4x,sft,align"


def _config(args):
    from compass_model import CompassConfig
    if getattr(args, "config", None):
        obj = json.loads(Path(args.config).read_text())
        model = obj.get("model", {})
        preset = model.pop("preset", None)
        return (CompassConfig.from_preset(preset, **model) if preset else CompassConfig(**model)), obj
    return CompassConfig.from_preset(args.preset), {}


def _stages(args, cfg_obj: dict):
    from compass_model.train.stages import StageConfig, demo_stages, select_stages
    stages = demo_stages()
    if cfg_obj.get("stages"):
        by = {s.name: s for s in stages}
        for d in cfg_obj["stages"]:
            base = by.get(d["name"])
            by[d["name"]] = base.replace(**d) if base is not None else StageConfig(**d)
        stages = list(by.values())
    stages = select_stages(stages, args.stages)
    if getattr(args, "steps", None) is not None:
        stages = [s.replace(steps=args.steps, warmup_steps=min(s.warmup_steps, max(0, args.steps // 5)),
                            n_pairs=min(s.n_pairs, max(8, 4 * args.steps)), eval_pairs=min(s.eval_pairs, 8))
                  for s in stages]
    return stages


def _print_summary(report: dict) -> None:
    print("\nstage          steps   loss first -> last   seconds")
    for s in report["stages"]:
        if s["steps"]:
            print(f"{s['name']:<13} {s['steps']:>6}   {s['loss_first']:10.3f} -> {s['loss_last']:<7.3f} {s['seconds']:8.1f}")
    ev = report.get("eval")
    if report.get("fp8"):
        _print_fp8(report["fp8"])
    if ev:
        sft = report.get("eval_sft")
        before = f" (SFT model before alignment: {sft['accuracy']:.3f})" if sft else ""
        print(f"\ntask accuracy {ev['accuracy']:.3f}{before}; perplexity {ev['perplexity']:.2f}")
        print("per language:  " + "  ".join(f"{k} {v['accuracy']:.2f}" for k, v in ev["per_language"].items()))
        print("per family:    " + "  ".join(f"{k} {v['accuracy']:.2f}" for k, v in ev["per_family"].items()))
        lc = ev.get("long_context", {})
        print("long context:  " + "  ".join(
            f"{k} ({v.get('context')} tokens) {v['accuracy']:.2f}" if "accuracy" in v else f"{k} skipped"
            for k, v in lc.items()))
        print(f"router load entropy (held-out, per layer): {[round(e, 3) for e in ev['router']['entropy']]}")
    al = report.get("alignment")
    if al:
        for m in ("sft_eval", "dpo", "otpo"):
            e = al[m] if m == "sft_eval" else al[m].get("eval", {})
            reward = "  n/a " if m == "sft_eval" else f"{e.get('reward_accuracy', float('nan')):.3f}"  # policy == ref
            print(f"preference accuracy {m.replace('_eval', ''):>4}: reward {reward}"
                  f"  log-p {e.get('logp_accuracy', float('nan')):.3f}  (n={e.get('n')})")


def _train(args, demo: bool) -> int:
    from compass_model.data import load_tokenizer
    from compass_model.train.parallel import exit_ep, finish_ep, init_ep
    from compass_model.train.pipeline import run_pipeline
    ctx = init_ep(getattr(args, "ep", 1))
    if demo:
        args.preset, args.config, args.stages, args.steps, args.data = "tiny", None, STAGE_LIST, None, None
    cfg, obj = _config(args)
    stages = _stages(args, obj)
    tok = load_tokenizer(args.tokenizer)
    if tok.vocab_size > cfg.vocab_size:            # a larger tokenizer: grow the embedding, 8-aligned
        cfg = cfg.replace(vocab_size=-(-tok.vocab_size // 8) * 8)
        print(f"vocab_size raised to {cfg.vocab_size} for the tokenizer's {tok.vocab_size} ids")
    t0 = time.perf_counter()
    evaluate = not getattr(args, "no_eval", False)
    report = run_pipeline(args.out, cfg, stages, tok, seed=args.seed, data_file=args.data, resume=args.resume,
                          progress=not args.no_progress, evaluate=evaluate, fp8=demo or (evaluate and args.fp8),
                          eval_kwargs={"n_tasks": 140} if demo else None, ctx=ctx,
                          fp8_tasks=700 if demo else None,    # 100 per language: 1 point = 1 task
                          stop_after=getattr(args, "stop_after", None))
    finish_ep(ctx)
    if not report:                                  # a non-zero EP rank: rank 0 reports
        pass
    elif not report.get("complete", True):
        print(f"stopped in stage {report['stopped_in']} after the requested steps; rerun with --resume")
    else:
        _print_summary(report)
        print(f"\n{time.perf_counter() - t0:.0f} s; report: {Path(args.out) / 'report.json'}, "
              f"metrics: {Path(args.out) / 'metrics.jsonl'}, plots: {Path(args.out) / 'plots'}")
    exit_ep(ctx)                                    # EP: leave without gloo teardown (no return)
    return 0


def _print_fp8(r: dict) -> None:
    print("\nFP8 (W8A8)      logit rel err   top-1   ppl      accuracy  worst language drop (points)")
    ref = r["reference"]
    print(f"{'full precision':<15} {'-':>13}   {'-':>5}   {ref['perplexity']:<8.3f} {ref['accuracy']:.3f}")
    for m in ("naive", "expert_aware"):
        x = r[m]
        print(f"{m:<15} {x['logits']['rel_err']:13.4f}   {x['logits']['top1']:.3f}   {x['perplexity']:<8.3f} "
              f"{x['accuracy']:.3f}     {x['max_drop_points']:.1f}")
    for m in ("naive", "expert_aware"):
        print(f"{m:<15} MoE output rel err per layer: {[round(v, 4) for v in r[m]['moe_output_rel_err']]}")
    cov = r["expert_aware"]["coverage"]
    print(f"calibration: min tokens per expert {cov['min_before']} -> {cov['min_after']} after oversampling "
          f"{cov['oversampled_sequences']} sequences; checks: {r['checks']}")


def _quantize(args) -> int:
    from compass_model.checkpoint import from_pretrained
    from compass_model.data import load_tokenizer
    from compass_model.train.fp8_report import fp8_report
    model = from_pretrained(args.checkpoint)
    tok = load_tokenizer(args.tokenizer)
    r = fp8_report(model, tok, n_tasks=args.n_tasks, min_tokens_per_expert=args.min_tokens_per_expert)
    _print_fp8(r)
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))
    if args.save:
        from compass_model.quant import quantize_model, save_quantized
        from compass_model.train.fp8_report import CALIB_SEED, token_windows
        from compass_model.data import CorpusConfig, generate_corpus
        texts = [d["text"] for d in generate_corpus(CorpusConfig(seed=CALIB_SEED, n_docs=400))]
        calib = token_windows(tok, texts, min(256, model.config.max_seq_len), 8)
        save_quantized(quantize_model(model, [calib], method="expert_aware",
                                      min_tokens_per_expert=args.min_tokens_per_expert), args.save)
        print(f"expert-aware FP8 model saved to {args.save}")
    return 0


def _eval(args) -> int:
    from compass_model.checkpoint import from_pretrained
    from compass_model.data import load_tokenizer
    from compass_model.train.evaluate import evaluate_model
    model = from_pretrained(args.checkpoint)
    ev = evaluate_model(model, load_tokenizer(args.tokenizer), n_tasks=args.n_tasks)
    text = json.dumps(ev, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


def _generate(args) -> int:
    import torch

    from compass_model.checkpoint import from_pretrained
    from compass_model.data import load_tokenizer
    from compass_model.generate import generate
    model = from_pretrained(args.checkpoint).eval()
    tok = load_tokenizer(args.tokenizer)
    ids = torch.tensor([tok.encode(args.prompt, bos=True)])
    n = min(args.max_new_tokens, model.config.max_seq_len - ids.shape[1])
    gen = torch.Generator().manual_seed(args.seed)
    out = generate(model, ids, n, temperature=args.temperature, top_p=args.top_p, speculative=args.speculative,
                   generator=gen)
    new = out.tokens[0, ids.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    print(tok.decode(new))
    if out.acceptance_rate is not None:
        print(f"[MTP draft acceptance {out.acceptance_rate:.2f}, {out.trunk_forwards} trunk forwards]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["route-demo"]:                  # its options belong to compass_kernels.cli
        from compass_kernels import cli as kcli
        return kcli.main(["demo", *argv[1:]])
    ap = argparse.ArgumentParser(prog="compass", description="Compass: MoE kernels and the Compass-v3 recipe")
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--out", default="compass-out", help="output directory (default: compass-out)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--resume", action="store_true", help="skip finished stages, continue the interrupted one")
        p.add_argument("--tokenizer", default=None, help="a tokenizers JSON file (default: UTF-8 bytes)")
        p.add_argument("--no-progress", action="store_true")

    common(sub.add_parser("demo", help="the tiny preset through all seven stages, evaluation and plots"))
    t = sub.add_parser("train", help="train stages of the recipe")
    src = t.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", help="tiny | small | proxy-2b | compass-v3 | compass-v3-top4")
    src.add_argument("--config", help='JSON: {"model": {"preset": ..., fields...}, "stages": [{...}]}')
    t.add_argument("--stages", default=STAGE_LIST, help=f"comma-separated (default: {STAGE_LIST})")
    t.add_argument("--data", help="JSONL: {text} for pretraining stages, {prompt,response,domain} for sft, "
                                  "{prompt,chosen,rejected} for align")
    t.add_argument("--steps", type=int, help="steps for every stage (overrides the config)")
    t.add_argument("--no-eval", action="store_true")
    t.add_argument("--stop-after", type=int, help="leave after N optimizer steps (a time-sliced job); "
                                                   "--resume continues")
    t.add_argument("--ep", type=int, default=1, help="expert parallelism over torchrun's processes "
                                                     "(torchrun --nproc-per-node N -m compass_model.cli train --ep N)")
    t.add_argument("--fp8", action="store_true", help="add the FP8 report (naive vs expert-aware) after evaluation")
    common(t)
    e = sub.add_parser("eval", help="evaluate a checkpoint on held-out tasks")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--out")
    e.add_argument("--n-tasks", type=int, default=70)
    e.add_argument("--tokenizer", default=None)
    g = sub.add_parser("generate", help="generate from a checkpoint")
    g.add_argument("--checkpoint", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--speculative", action="store_true", help="MTP self-speculative decoding (greedy)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--tokenizer", default=None)
    q = sub.add_parser("quantize", help="FP8 report (naive vs expert-aware) for a checkpoint; --save writes one")
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", help="write the report JSON here")
    q.add_argument("--save", help="save the expert-aware FP8 model (safetensors with scales) here")
    q.add_argument("--n-tasks", type=int, default=700, help="held-out tasks (700 = 100 per language)")
    q.add_argument("--min-tokens-per-expert", type=int, default=128)
    q.add_argument("--tokenizer", default=None)
    x = sub.add_parser("experiment", help="run one of the paper's experiments (JSON + PNG)")
    x.add_argument("name", choices=["balance", "experts", "combine", "otpo-vs-dpo", "all"])
    x.add_argument("--out", default="compass-out/experiments")
    x.add_argument("--quick", action="store_true", help="small sizes (seconds; what the tests run)")
    x.add_argument("--seed", type=int, default=0)
    sub.add_parser("info", help="print compass_kernels.backend_info() as JSON")
    sub.add_parser("route-demo", help="routing kernels vs the Megatron-style path "
                                      "([--tokens N] [--hidden N] [--reps N]; compass_kernels.cli demo)")

    args = ap.parse_args(argv)
    if args.cmd == "info":
        from compass_kernels import cli as kcli
        return kcli.main(["info"])
    if args.cmd in ("demo", "train"):
        return _train(args, demo=args.cmd == "demo")
    if args.cmd == "eval":
        return _eval(args)
    if args.cmd == "quantize":
        return _quantize(args)
    if args.cmd == "experiment":
        from compass_kernels.cli import reexec_with_malloc_tunables
        reexec_with_malloc_tunables(argv, "compass_model.cli")   # timings: large buffers stay in the heap
        from compass_model.experiments import EXPERIMENTS
        names = list(EXPERIMENTS) if args.name == "all" else [args.name]
        for n in names:
            EXPERIMENTS[n](args.out, quick=args.quick, seed=args.seed)
            print(f"{n}: {Path(args.out) / (n + '.json')} and .png")
        return 0
    return _generate(args)


if __name__ == "__main__":
    sys.exit(main())
