"""The recipe end to end: stages in order, each starting from the previous stage's checkpoint,
then evaluation, plots and ``report.json`` (the layout ``compass demo`` and ``compass train`` write).

  OUT/metrics.jsonl                 one JSON object per optimizer step (all stages)
  OUT/checkpoints/<stage>/step-N/   atomic checkpoints (state.py); LATEST names the newest
  OUT/align/                        alignment pairs and cached per-token reference log-probs
  OUT/plots/*.png                   loss per stage, expert load over training, the load-balance curve
                                    (entropy and aux coefficient), accuracy per language
  OUT/report.json                   stages, eval, alignment, router, fp8 (naive vs expert-aware W8A8)

``resume=True`` skips finished stages and continues an interrupted one from its last checkpoint
(the newest one that verifies); a fresh run needs an empty ``out`` unless ``overwrite=True``, two
runs cannot share ``out``, and a resume must use the run's config and seed (``rundir.py``). Every
stage's data file is checked before the first step (``data.check_stage_data``). The first stage
of a partial run (``--stages sft,align`` into an earlier run's ``out``) starts from the latest
finished stage before it in recipe order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch

from compass_model import CompassConfig
from compass_model.train import parallel, rundir
from compass_model.train.dcp_checkpoint import laid_out_model
from compass_model.train.data import check_stage_data, data_files_for, stage_data
from compass_model.train.metrics import MetricsWriter, read_metrics
from compass_model.train.stages import STAGES, stage_kind
from compass_model.train.state import (
    latest_checkpoint,
    load_model,
    stage_done,
    run_of,
    trainer_state,
    usable_checkpoint,
)
from compass_model.train.trainer import stage_dir_for, stage_summary, train_stage

logger = logging.getLogger(__name__)


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _stage_model(ckpt, prev_dir, config: CompassConfig, stage, seed: int, ctx, device=None):
    """The stage's model laid out for ``ctx``: from its own checkpoint ``ckpt`` (resume), else from
    ``prev_dir`` (the previous stage), else fresh (``dcp_checkpoint.laid_out_model``)."""
    src = ckpt if ckpt is not None else prev_dir
    if src is None:
        torch.manual_seed(seed)
    return laid_out_model(src, ctx, config=config, stage=stage, device=device,
                          prepare=lambda m: _apply_stage_rope(m, stage, fresh=ckpt is None))


def _earlier_stage_checkpoint(out: Path, first: str):
    """The latest checkpoint of the nearest finished stage before ``first`` in recipe order (of the
    ``long_context_*`` phases, the one that finished last; a phase starts from an earlier phase)."""
    k = STAGES.index(stage_kind(first))
    for kind in reversed(STAGES[:k + 1] if stage_kind(first) == "long_context" else STAGES[:k]):
        dirs = (sorted(out.glob("checkpoints/long_context_*")) if kind == "long_context"
                else [stage_dir_for(out, kind)])
        done = [latest_checkpoint(d) for d in dirs if stage_done(d) and d.name != first]
        if done:
            return max(done, key=lambda c: c.stat().st_mtime)
    return None


def extend_context(model, factor: float) -> None:
    """YaRN phase: the context becomes ``factor`` x the current one. YaRN's factor is measured
    against the length before any extension (``rope_original_max_len`` once YaRN is on), so a second
    phase compounds: 256 -> 512 (YaRN x2 over 256), then -> 1024 (YaRN x4 over 256)."""
    c = model.config
    orig = c.rope_original_max_len if c.rope_scaling == "yarn" else c.max_seq_len
    new_len = int(c.max_seq_len * factor)
    model.set_rope(rope_scaling="yarn", rope_factor=new_len / orig, rope_original_max_len=orig, max_seq_len=new_len)


def _apply_stage_rope(model, stage, fresh: bool) -> None:
    """``rope_factor > 1``: extend the previous stage's context (``fresh``: the model comes from the
    previous stage, not from this stage's own checkpoint, which is extended already)."""
    if fresh and stage.rope_factor > 1:
        extend_context(model, stage.rope_factor)
    if stage.seq_len > model.config.max_seq_len:
        raise ValueError(f"stage {stage.name}: seq_len {stage.seq_len} > the model's max_seq_len "
                         f"{model.config.max_seq_len}; raise max_seq_len or give the stage a rope_factor")


def _check_checkpoints(out: Path, stages, prev_dir, run: dict, resume: bool) -> None:
    """A resume continues checkpoints of this config and seed only (their headers say which)."""
    paths = [prev_dir] if prev_dir is not None else []
    if resume:
        for st in stages:
            try:
                paths.append(latest_checkpoint(stage_dir_for(out, st.name)))
            except FileNotFoundError:           # a dangling LATEST: the stage's own load reports it
                pass
    for p in paths:
        if p is not None:
            try:
                stored = run_of(p)
            except ValueError:                  # a damaged header: usable_checkpoint falls back
                continue
            rundir.check_fingerprint(stored, run, p)


def run_pipeline(out_dir, config: CompassConfig, stages: list, tokenizer, *, seed: int = 0, data_file=None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True, evaluate: bool = True,
                 eval_kwargs: dict | None = None, fp8: bool = False, fp8_tasks: int | None = None, ctx=None,
                 stop_after: int | None = None, device=None, keep_last: int = 2,
                 activation_checkpointing: bool = False) -> dict:
    """Train ``stages`` (StageConfigs, recipe order) from ``config``; returns the report dict.
    ``data_file``: None (generated data), one path for every stage, or ``{stage: path}`` /
    ``["FILE", "STAGE=FILE", ...]`` (``data.data_files_for``). ``device``: where the model, its
    batches and the evaluation run (None: where the model is built, the CPU).
    ``ctx``: expert parallelism (``parallel.init_ep``): every rank trains the pretraining and SFT
    stages (alignment included) on its shards; rank 0 alone evaluates and writes files (others return {}).
    ``stop_after``: leave after that many optimizer steps of this call (a time-sliced job; the next
    call with ``resume=True`` continues); the report then has ``"complete": False``.
    ``keep_last``: checkpoints kept per stage (the newest). ``activation_checkpointing``: recompute
    attention and experts in the backward (``recompute.py``)."""
    main = ctx is None or ctx.is_main
    if not stages:
        raise ValueError("no stages to train: name at least one (e.g. --stages general)")
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but config.vocab_size is {config.vocab_size}")
    files = data_files_for(data_file, [s.name for s in stages])
    with rundir.locked(out_dir) if main else contextlib.nullcontext():
        run = rundir.fingerprint(config, seed)
        if main:
            rundir.prepare(out_dir, run, resume=resume, overwrite=overwrite)
        parallel.barrier(ctx)
        return _run(Path(out_dir), config, stages, tokenizer, seed=seed, files=files, resume=resume,
                    progress=progress, evaluate=evaluate, eval_kwargs=eval_kwargs, fp8=fp8, fp8_tasks=fp8_tasks,
                    ctx=ctx, stop_after=stop_after, device=device, keep_last=keep_last, run=run,
                    activation_checkpointing=activation_checkpointing)


def _run(out: Path, config, stages, tokenizer, *, seed, files, resume, progress, evaluate, eval_kwargs, fp8,
         fp8_tasks, ctx, stop_after, device, keep_last, run, activation_checkpointing=False) -> dict:
    main = ctx is None or ctx.is_main
    log = logger.info if main else (lambda *a: None)       # rank 0 reports the run
    prepared = check_stage_data(stages, tokenizer, files, seed)      # every file, before any step
    prev_dir = _earlier_stage_checkpoint(out, stages[0].name)
    if stages[0].name == "align" and prev_dir is None:
        raise ValueError(f"stage align starts from an SFT model, and {out} has none: add sft to --stages "
                         "or resume the run that trained it")
    if main:
        _check_checkpoints(out, stages, prev_dir, run, resume)
        rundir.record(out, run)
    if prev_dir is not None:
        log(f"[{stages[0].name}] starts from {prev_dir}")
    metrics = MetricsWriter(out / "metrics.jsonl")
    if main and not resume and metrics.path.exists():
        metrics.path.unlink()                      # a fresh run does not append to an old one
    parallel.barrier(ctx)
    report: dict = {"config": json.loads(config.to_json()), "seed": seed, "stages": []}
    pre_extension = None                            # the checkpoint the first YaRN phase started from
    nll_other = None                                # the OTPO model aligned with the NLL term the other way
    t_start = time.perf_counter()
    for stage in stages:
        sdir = stage_dir_for(out, stage.name)
        if stage.rope_factor > 1 and pre_extension is None:
            pre_extension = prev_dir
        if resume and stage_done(sdir):
            log(f"[{stage.name}] finished earlier: skipped")
        elif stop_after is not None and stop_after <= 0:
            log(f"[{stage.name}] not started: the requested steps are done; continue with resume")
            return {"complete": False, "stopped_in": stage.name} if main else {}
        elif stage.name == "align":
            from compass_model.train.align import run_alignment
            kw = {"n_pairs": stage.n_pairs, "eval_pairs": stage.eval_pairs, "steps": stage.steps, "lr": stage.lr,
                  "micro_batch": stage.rows, "max_len": stage.seq_len, "beta": stage.beta, "seed": seed,
                  "warmup_steps": stage.warmup_steps, "pairs_file": files.get("align"), "device": device,
                  "ctx": ctx, "progress": progress}
            report["alignment"] = run_alignment(prev_dir, out, tokenizer, sft_weight=stage.sft_weight,
                                                metrics=metrics, resume=resume, **kw)
            report["alignment"]["sft_weight"] = stage.sft_weight
            if stage.compare_nll and ctx is None:        # one process: the comparison is the demo's
                nll_other = _align_other_way(prev_dir, out, tokenizer, stage, kw, run_alignment)
        else:
            ckpt = usable_checkpoint(sdir, warn=main) if resume else None
            model = _stage_model(ckpt, prev_dir, config, stage, seed, ctx, device)
            if activation_checkpointing:
                from compass_model.train.recompute import apply_activation_checkpointing
                apply_activation_checkpointing(model)
            if stage.retrieval_rows and stage.retrieval_len > model.config.max_seq_len:
                log(f"[{stage.name}] no retrieval rows: retrieval_seq_len {stage.retrieval_len} > the model's "
                    f"max_seq_len {model.config.max_seq_len} (no YaRN phase before it)")
                stage = stage.replace(retrieval_rows=0)
            data = prepared.get(stage.name) or stage_data(stage, tokenizer, seed)
            before = 0 if ckpt is None else trainer_state(ckpt)["step"]
            train_stage(model, stage, data, sdir, metrics, resume=ckpt is not None, progress=progress, ctx=ctx,
                        stop_after=stop_after, keep_last=keep_last, run=run)
            if stop_after is not None:
                stop_after -= min(stage.steps, before + stop_after) - before
                if not stage_done(sdir):
                    log(f"[{stage.name}] stopped after the requested steps; continue with resume")
                    return {"complete": False, "stopped_in": stage.name} if main else {}
        prev_dir = latest_checkpoint(sdir)
        rec = read_metrics(metrics.path)
        name = "align-otpo" if stage.name == "align" else stage.name
        summary = stage_summary(name, rec) | {"name": stage.name}
        report["stages"].append(summary)
        if summary["steps"]:
            log(f"[{stage.name}] {summary['steps']} steps, loss {summary['loss_first']:.3f} -> "
                f"{summary['loss_last']:.3f}, {summary['seconds']:.1f} s")
    if not main:
        return {}
    report["complete"] = True
    report["train_seconds"] = time.perf_counter() - t_start
    report["final_checkpoint"] = str(prev_dir) if prev_dir is not None else None
    if evaluate and prev_dir is not None:
        from compass_model.train.evaluate import evaluate_model
        t0 = time.perf_counter()
        model = load_model(prev_dir, device)
        report["eval"] = evaluate_model(model, tokenizer, progress=progress, **(eval_kwargs or {}))
        pre_extension = pre_extension or _pre_extension_checkpoint(out)     # YaRN phases of an earlier call
        if pre_extension is not None and report["eval"]["long_context"]:
            report["eval"]["long_context"]["4x_without_extension"] = _without_extension(
                pre_extension, tokenizer, eval_kwargs or {}, device)
        report["router"] = _router_report(report["eval"], read_metrics(metrics.path))
        sft_dir = latest_checkpoint(stage_dir_for(out, "sft"))
        if sft_dir is not None and sft_dir != prev_dir:      # what alignment changed on the tasks
            ev = evaluate_model(load_model(sft_dir, device), tokenizer, progress=progress,
                                desc="eval (SFT model)", **{**(eval_kwargs or {}), "n_long": 0, "n_speculative": 0})
            report["eval_sft"] = {k: ev[k] for k in ("accuracy", "per_language", "per_family")}
        if nll_other is not None and "alignment" in report:
            report["alignment"]["nll_term"] = _nll_term(report, nll_other, tokenizer, eval_kwargs or {}, device)
        report["eval_seconds"] = time.perf_counter() - t0
        if fp8:
            from compass_model.train.fp8_report import fp8_report
            t0 = time.perf_counter()
            report["fp8"] = fp8_report(model, tokenizer, seed=seed, progress=progress,
                                       n_tasks=fp8_tasks or (eval_kwargs or {}).get("n_tasks", 70))
            report["fp8_seconds"] = time.perf_counter() - t0
    _plots(out, read_metrics(metrics.path), report.get("eval"))
    _write_json(out / "report.json", report)
    return report


def _pre_extension_checkpoint(out: Path):
    """The checkpoint the run's YaRN phases started from when an earlier call trained them (a partial run
    such as ``--stages sft,align``): the nearest finished stage before ``long_context``; None without them."""
    if not any(stage_done(d) for d in out.glob("checkpoints/long_context_*")):
        return None
    for kind in reversed(STAGES[:STAGES.index("long_context")]):
        d = stage_dir_for(out, kind)
        if stage_done(d):
            return latest_checkpoint(d)
    return None


def _without_extension(checkpoint, tokenizer, eval_kwargs: dict, device=None) -> dict:
    """4x retrieval of the model the YaRN phases started from, its RoPE simply run past the trained
    context (no YaRN, no long-context training): what the extension stages are measured against."""
    from compass_model.train.evaluate import long_context_eval
    model = load_model(checkpoint, device)
    base = eval_kwargs.get("base_context", 256)
    if model.config.max_seq_len < 4 * base:
        model.set_rope(max_seq_len=4 * base)
    res = long_context_eval(model, tokenizer, base, n=eval_kwargs.get("n_long", 14), factors=(("4x", 4),))["4x"]
    return {**res, "checkpoint": str(checkpoint), "rope_scaling": model.config.rope_scaling}


def _align_other_way(sft_dir, out: Path, tokenizer, stage, kw: dict, run_alignment) -> dict:
    """OTPO (and DPO) again from the same SFT model, pairs and reference log-probs, with the chosen-answer
    NLL term the other way (weight 1 when the stage has none, else 0), under ``out/align-nll-other``."""
    other = out / "align-nll-other"
    other.mkdir(exist_ok=True)
    for name in ("pairs.json", "reference-train.safetensors", "reference-eval.safetensors"):
        if (out / name).is_file():
            shutil.copyfile(out / name, other / name)
    weight = 0.0 if stage.sft_weight > 0 else 1.0
    res = run_alignment(sft_dir, other, tokenizer, sft_weight=weight, resume=True, **kw)
    return {"sft_weight": weight, "checkpoint": latest_checkpoint(other / "checkpoints" / "align"),
            "preference_accuracy": res.get("otpo", {}).get("eval", {}).get("reward_accuracy")}


def _nll_term(report: dict, other: dict, tokenizer, eval_kwargs: dict, device=None) -> dict:
    """``alignment.nll_term``: whether the run's alignment used the NLL term on chosen answers, why, and the
    task accuracy (and retrieval at 1x / 4x) of the final model aligned each way."""
    from compass_model.train.evaluate import evaluate_model
    ev = evaluate_model(load_model(other["checkpoint"], device), tokenizer, progress=False,
                        desc="eval (aligned the other way)", **{**eval_kwargs, "n_speculative": 0})
    mine = report["eval"]
    used = report["alignment"]["sft_weight"] > 0
    side = lambda e: {"accuracy": e["accuracy"], **{f"retrieval_{k}": v.get("accuracy")  # noqa: E731
                                                     for k, v in e["long_context"].items() if k in ("1x", "4x")}}
    with_, without = (side(mine), side(ev)) if used else (side(ev), side(mine))
    why = ("on: the stage sets sft_weight > 0 (neither the paper nor the official OTPO configs add it)" if used else
           "off, as in the paper and the official OTPO configs (sft_weight = 0); the run with it on is measured "
           "beside it from the same SFT model and pairs")
    return {"used": used, "weight": report["alignment"]["sft_weight"] if used else other["sft_weight"], "why": why,
            "accuracy_without": without["accuracy"], "accuracy_with": with_["accuracy"],
            "without": without, "with": with_, "other_checkpoint": str(other["checkpoint"])}


def _router_report(ev: dict, records: list) -> dict:
    """Router load at the end (held-out text) and the training-time load entropy per stage."""
    per_stage = {}
    for r in records:
        if "load_entropy" in r:
            per_stage.setdefault(r["stage"], []).append(r["load_entropy"])
    return {"eval": ev.get("router"),
            "train_load_entropy": {k: sum(v[-10:]) / len(v[-10:]) for k, v in per_stage.items()}}


def _plots(out: Path, records: list, ev) -> None:
    from compass_model.train import plots

    try:
        plots.pyplot()
    except ImportError as e:                          # matplotlib missing: the report still lands
        logging.getLogger("compass").warning("no plots: %s", e)
        return
    d = out / "plots"
    d.mkdir(exist_ok=True)
    plots.plot_losses(records, d / "loss.png")
    plots.plot_expert_load(records, d / "expert_load.png")
    plots.plot_load_balance(records, d / "load_balance.png")
    if ev is not None:
        plots.plot_accuracy(ev.get("per_language", {}), d / "accuracy.png")
