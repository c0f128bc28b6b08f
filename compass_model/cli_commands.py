"""What ``compass train / demo / eval / generate / quantize`` do (the parser is in ``cli.py``).

Every command checks its inputs and output paths before the work, runs on ``--device`` in
``--dtype``, reports progress through ``logging`` (``train/progress.py``), and prints its results
before writing them to a file.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

from compass_model.cli_config import STAGE_LIST, UsageError, model_config, stage_list

logger = logging.getLogger(__name__)


# ---- shared checks ------------------------------------------------------------------------------

def resolve_device(name: str | None):
    """``--device``: None -> CUDA when available, else the CPU; an unavailable device is an error."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available here; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def resolve_dtype(name: str | None):
    from compass_model.config import DTYPES
    return None if name is None else DTYPES[name]


def check_output_file(path, flag: str) -> None:
    """``--out FILE`` must be writable before the work starts (not after minutes of it)."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise UsageError(f"{flag} {p} is a directory; give a file name, e.g. {p / 'result.json'}")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise UsageError(f"{flag} {p}: directory {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{flag} {p}: directory {parent} is not writable")


def check_output_dir(path, flag: str) -> None:
    """``--save DIR``: creatable and writable; an existing non-empty DIR is refused (no mixing)."""
    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UsageError(f"{flag} {p} is a file; give a directory")
    if p.is_dir() and any(p.iterdir()):
        raise UsageError(f"{flag} {p} is not empty; choose a new directory")
    anc = p
    while not anc.exists():
        anc = anc.parent
    if not os.access(anc, os.W_OK):
        raise UsageError(f"{flag} {p}: {anc} is not writable")


def tokenizer_for(path):
    from compass_model.data import load_tokenizer
    if path is not None and not Path(path).is_file():
        raise UsageError(f"--tokenizer {path}: no such file (leave --tokenizer out for the byte tokenizer)")
    return load_tokenizer(path)


def load_checkpoint(args):
    """``--checkpoint``: a model directory, a stage directory (LATEST) or a run directory; verified,
    FP8 or not, moved to ``--device`` in ``--dtype``."""
    from compass_model.checkpoint import from_pretrained
    from compass_model.train.state import resolve_checkpoint
    device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    path = resolve_checkpoint(args.checkpoint)
    if path != Path(args.checkpoint):
        logger.info("checkpoint: %s", path)
    return from_pretrained(path, device=device, dtype=dtype), path


# ---- train / demo -------------------------------------------------------------------------------

def print_summary(report: dict) -> None:
    print("\nstage          steps   loss first -> last   seconds")
    for s in report["stages"]:
        if s["steps"]:
            print(f"{s['name']:<13} {s['steps']:>6}   {s['loss_first']:10.3f} -> {s['loss_last']:<7.3f} {s['seconds']:8.1f}")
    ev = report.get("eval")
    if report.get("fp8"):
        print_fp8(report["fp8"])
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


def train(args, demo: bool) -> int:
    from compass_model.train.parallel import exit_ep, finish_ep, init_ep
    from compass_model.train.pipeline import run_pipeline
    if demo:
        args.preset, args.config, args.stages, args.steps, args.data = "tiny", None, STAGE_LIST, None, None
    cfg, obj = model_config(args)
    stages = stage_list(args, obj)
    tok = tokenizer_for(args.tokenizer)
    ep, dp = getattr(args, "ep", 1), getattr(args, "dp", 1)
    ctx = init_ep(ep, dp=dp, router_stats=getattr(args, "router_stats", "global"))
    device = resolve_device(args.device) if ctx is None else None   # distributed: each rank's device is torchrun's
    if tok.vocab_size > cfg.vocab_size:            # a larger tokenizer: grow the embedding, 8-aligned
        cfg = cfg.replace(vocab_size=-(-tok.vocab_size // 8) * 8)
        logger.info("vocab_size raised to %d for the tokenizer's %d ids", cfg.vocab_size, tok.vocab_size)
    t0 = time.perf_counter()
    evaluate = not getattr(args, "no_eval", False)
    report = run_pipeline(args.out, cfg, stages, tok, seed=args.seed, data_file=args.data, resume=args.resume,
                          overwrite=args.overwrite, progress=not args.no_progress, evaluate=evaluate,
                          fp8=demo or (evaluate and args.fp8), eval_kwargs={"n_tasks": 140} if demo else None,
                          ctx=ctx, device=device, keep_last=args.keep_last,
                          fp8_tasks=700 if demo else None,    # 100 per language: 1 point = 1 task
                          stop_after=getattr(args, "stop_after", None),
                          activation_checkpointing=getattr(args, "activation_checkpointing", False))
    finish_ep(ctx)
    if not report:                                  # a non-zero EP rank: rank 0 reports
        pass
    elif not report.get("complete", True):
        print(f"stopped in stage {report['stopped_in']} after the requested steps; rerun with --resume")
    else:
        print_summary(report)
        print(f"\n{time.perf_counter() - t0:.0f} s; report: {Path(args.out) / 'report.json'}, "
              f"metrics: {Path(args.out) / 'metrics.jsonl'}, plots: {Path(args.out) / 'plots'}")
    exit_ep(ctx)                                    # EP: leave without gloo teardown (no return)
    return 0


# ---- quantize / eval / generate -------------------------------------------------------------------

def print_fp8(r: dict) -> None:
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


def quantize(args) -> int:
    from compass_model.checkpoint import is_quantized
    from compass_model.train.fp8_report import fp8_report
    check_output_file(args.out, "--out")
    check_output_dir(args.save, "--save")
    tok = tokenizer_for(args.tokenizer)
    model, path = load_checkpoint(args)
    if is_quantized(path):
        raise UsageError(f"--checkpoint {path} is already an FP8 model (quant_config.json); quantize its "
                         "full-precision checkpoint instead (eval and generate take this one as it is)")
    r = fp8_report(model, tok, n_tasks=args.n_tasks, min_tokens_per_expert=args.min_tokens_per_expert,
                   progress=not args.no_progress)
    print_fp8(r)
    if args.out:
        Path(args.out).write_text(json.dumps(r, indent=1))
    if args.save:
        from compass_model.data import CorpusConfig, generate_corpus
        from compass_model.quant import quantize_model, save_quantized
        from compass_model.train.fp8_report import CALIB_SEED, token_windows
        texts = [d["text"] for d in generate_corpus(CorpusConfig(seed=CALIB_SEED, n_docs=400))]
        calib = token_windows(tok, texts, min(256, model.config.max_seq_len), 8).to(next(model.parameters()).device)
        save_quantized(quantize_model(model, [calib], method="expert_aware",
                                      min_tokens_per_expert=args.min_tokens_per_expert), args.save)
        print(f"expert-aware FP8 model saved to {args.save}")
    return 0


def evaluate(args) -> int:
    from compass_model.train.evaluate import evaluate_model
    check_output_file(args.out, "--out")
    tok = tokenizer_for(args.tokenizer)
    model, _ = load_checkpoint(args)
    ev = evaluate_model(model, tok, n_tasks=args.n_tasks, progress=not args.no_progress)
    text = json.dumps(ev, indent=1)
    print(text)                                     # the results first: a failed write loses nothing
    if args.out:
        Path(args.out).write_text(text)
    return 0


def generate(args) -> int:
    import torch

    from compass_model.generate import generate as decode
    tok = tokenizer_for(args.tokenizer)
    model, _ = load_checkpoint(args)
    model.eval()
    device = next(model.parameters()).device
    ids = torch.tensor([tok.encode(args.prompt, bos=True)], device=device)
    room = model.config.max_seq_len - ids.shape[1]
    if room < 1:
        raise UsageError(f"--prompt is {ids.shape[1]} tokens, the model's context is {model.config.max_seq_len}: "
                         f"shorten it to at most {model.config.max_seq_len - 1} tokens to leave room to generate")
    n = min(args.max_new_tokens, room)
    gen = torch.Generator(device=device).manual_seed(args.seed) if device.type in ("cpu", "cuda") else None
    out = decode(model, ids, n, temperature=args.temperature, top_p=args.top_p, speculative=args.speculative,
                 generator=gen)
    new = out.tokens[0, ids.shape[1]:].tolist()
    if tok.eos_id in new:
        new = new[:new.index(tok.eos_id)]
    print(tok.decode([x for x in new if x < tok.vocab_size]))   # the embedding's round-up rows are not text
    if out.acceptance_rate is not None:
        print(f"[MTP draft acceptance {out.acceptance_rate:.2f}, {out.trunk_forwards} trunk forwards]", file=sys.stderr)
    return 0
