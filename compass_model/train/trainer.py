"""One pretraining / SFT stage: ``loop.train_loop`` with the stage's ``objectives.LMObjective``
(AdamW, warmup + cosine, gradient accumulation with global token normalisation, clipping, fp32 or
bf16 autocast, router aux-coefficient decay, per-step metrics and atomic per-step checkpoints,
resumable), and the stage summary the report shows.
"""

from __future__ import annotations

from pathlib import Path

from compass_model.train.loop import LoopConfig, accumulate, make_optimizer, train_loop
from compass_model.train.metrics import MetricsWriter, read_metrics
from compass_model.train.objectives import LMObjective

__all__ = ["accumulate_gradients", "make_optimizer", "stage_dir_for", "stage_summary", "train_stage"]


def accumulate_gradients(model, micro: list, stage, step: int, ctx=None):
    """Forward + backward of one optimizer step's micro-batches (``PackedBatch``es) into ``.grad``,
    as ``train_stage`` runs them. Returns (the step's logged loss terms, per-micro expert-load
    fractions, per-micro load entropies). ``ctx`` (expert parallelism, ``parallel.EPContext``):
    this rank runs its rows of every micro-batch."""
    objective = LMObjective.for_stage(stage, None, model.config, ctx)
    sums = accumulate(model, objective, micro, step)
    totals = {**sums, "tokens": objective.n_tokens, "aux_coef": objective.alpha, "mtp_weight": objective.w_mtp}
    return totals, objective.loads, objective.entropies


def train_stage(model, stage, data, stage_dir, metrics: MetricsWriter | None = None, *, resume: bool = False,
                progress: bool = True, stop_after: int | None = None, ctx=None, keep_last: int = 2,
                run: dict | None = None) -> dict:
    """Run ``stage.steps`` optimizer steps of ``stage`` on ``model`` (in place), reading
    ``data.micro_batches(step, stage.grad_accum)``; checkpoints go to ``stage_dir``.

    ``resume``: continue from ``stage_dir``'s latest checkpoint (weights, optimizer state, step); the
    caller builds ``model`` from that checkpoint (``state.load_model``). ``stop_after``: return after
    that many steps of this call (tests simulate a killed run with it). ``ctx``: expert parallelism
    (``parallel.py``; ``model`` is the EP-sharded model, rank 0 writes metrics and checkpoints).
    ``keep_last``: checkpoints kept (the newest); ``run``: the run's fingerprint, stored in each.
    Returns ``{"name", "steps", "loss_first", "loss_last", "seconds"}`` from the stage's metrics."""
    objective = LMObjective.for_stage(stage, data, model.config, ctx)
    cfg = LoopConfig(stage.name, stage.steps, stage.lr, stage.warmup_steps, stage.min_lr_ratio, stage.weight_decay,
                     stage.clip, save_every=stage.save_every, keep_last=keep_last)
    main = ctx is None or ctx.is_main
    train_loop(model, objective, cfg, stage_dir=stage_dir, metrics=metrics, resume=resume, stop_after=stop_after,
               ctx=ctx, run=run, progress=progress)
    return stage_summary(stage.name, read_metrics(metrics.path) if metrics is not None and main else [])


def stage_summary(name: str, records: list) -> dict:
    """``loss_first`` / ``loss_last``: means over the stage's first / last ``max(1, n // 10)`` steps
    (single steps are noisy at these batch sizes); ``seconds``: summed step times."""
    rs = [r for r in records if r.get("stage") == name]
    k = max(1, len(rs) // 10)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"name": name, "steps": len(rs), "loss_first": mean([r["loss"] for r in rs[:k]]),
            "loss_last": mean([r["loss"] for r in rs[-k:]]), "seconds": sum(r.get("seconds", 0.0) for r in rs)}


def stage_dir_for(out_dir, name: str) -> Path:
    """Where stage ``name`` of a run in ``out_dir`` keeps its checkpoints."""
    return Path(out_dir) / "checkpoints" / name
