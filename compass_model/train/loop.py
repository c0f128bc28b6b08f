"""The one training loop: every stage (pretraining, SFT), alignment (DPO / OTPO) and the
experiments' small LM runs go through ``train_loop``; what differs between them is the objective
(``objectives.py``), a small object that turns the step's batches into a loss and its metrics.

The loop owns everything else, once:

* the optimizer (``make_optimizer``: AdamW, weight decay on matrices only) and the learning-rate
  schedule (``schedule.lr_at``: linear warmup, cosine decay);
* gradient accumulation over the objective's micro-batches, the reduction of gradients over ranks
  and global-norm clipping (``parallel.py``: expert / data parallelism, FSDP2);
* checkpoints and resume (``state.py`` atomic checkpoints, ``dcp_checkpoint.py`` shards): a resumed
  run restores the optimizer (and, if asked, the weights), drops metrics lines of steps past its
  checkpoint and then runs exactly the steps an uninterrupted run would;
* per-step metrics (``metrics.py``) and progress (``progress.py``).

One optimizer step ``s``::

    lr = lr_at(s, steps, lr, warmup, min_lr_ratio)
    for batch in objective.micro_batches(s): loss, metrics = objective.loss(model, batch); loss.backward()
    reduce gradients over ranks; clip to ``clip``; optimizer step; zero gradients
    sync router load; model.after_optimizer_step()          # aux-coefficient decay, router bias update
    record {"stage", "step", **objective.end_step(summed metrics), "lr", "grad_norm", "seconds"}
    checkpoint every ``save_every`` steps and at the end
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from compass_model.checkpoint import load_weights
from compass_model.train import parallel
from compass_model.train.dcp_checkpoint import load_model_shards, load_optimizer, save_distributed_checkpoint
from compass_model.train.progress import progress as counter_for
from compass_model.train.schedule import lr_at
from compass_model.train.state import latest_checkpoint, save_checkpoint, trainer_state

ADAMW_BETAS = (0.9, 0.95)


def make_optimizer(model, lr: float, weight_decay: float, foreach: bool | None = None,
                   betas: tuple = ADAMW_BETAS) -> torch.optim.AdamW:
    """AdamW (``betas``, eps 1e-8) with two groups: weight decay on matrices (``dim >= 2``: linear
    weights and the embedding), none on vectors (norm weights, biases; router biases are buffers).
    ``foreach=False`` where FSDP2's DTensor parameters and plain expert shards mix."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, foreach=foreach)


@dataclass(frozen=True)
class LoopConfig:
    """The optimisation settings of one ``train_loop`` call. ``name``: the ``"stage"`` of its
    metrics records and the progress label; ``keep_last``: checkpoints kept (the newest)."""
    name: str
    steps: int
    lr: float
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    betas: tuple = ADAMW_BETAS
    save_every: int = 1
    keep_last: int = 1

    def __post_init__(self):
        if self.steps < 0 or self.save_every < 1 or self.keep_last < 1:
            raise ValueError(f"{self.name}: need steps >= 0, save_every >= 1 and keep_last >= 1, got "
                             f"{self.steps}, {self.save_every}, {self.keep_last}")


def _load_weights(model, checkpoint_dir, ctx) -> None:
    """Load a checkpoint's weights into ``model`` (already laid out for ``ctx``)."""
    if ctx is not None:
        load_model_shards(checkpoint_dir, model, ctx)
    else:
        device = next(model.parameters()).device
        model.load_state_dict({k: v.to(device) for k, v in load_weights(checkpoint_dir).items()}, strict=True)


def _save(stage_dir, model, opt, step: int, done: bool, ctx, keep_last: int, run, extra) -> None:
    if ctx is None:
        save_checkpoint(stage_dir, model, opt, step, done=done, keep_last=keep_last, run=run, extra=extra)
    else:
        save_distributed_checkpoint(stage_dir, model, opt, step, done, ctx, keep_last=keep_last, run=run,
                                    extra=extra)


def accumulate(model, objective, micro: list, step: int) -> dict:
    """Forward + backward of optimizer step ``step``'s micro-batches ``micro`` into ``.grad``;
    returns ``objective``'s metrics summed over them."""
    objective.begin_step(model, micro, step)
    sums: dict = {}
    for b in micro:
        loss, m = objective.loss(model, b)
        loss.backward()
        for k, v in m.items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def train_loop(model, objective, cfg: LoopConfig, *, stage_dir=None, metrics=None, resume: bool = False,
               resume_weights: bool = False, stop_after: int | None = None, ctx=None, run: dict | None = None,
               progress=False, summary_extra: dict | None = None) -> list:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps of ``objective``; returns the
    per-step records of this call (also written to ``metrics``, a ``MetricsWriter``, on rank 0).

    ``stage_dir``: atomic checkpoints there every ``cfg.save_every`` steps and at the end (the last
    one ``done``); a 0-step run writes one done checkpoint. ``resume``: continue from its latest
    checkpoint (optimizer state and step; the caller built ``model`` from it, or
    ``resume_weights=True`` loads them here); a finished checkpoint runs nothing. ``stop_after``:
    return after that many steps of this call (a time-sliced job, or a simulated kill). ``ctx``:
    the distributed layout (``parallel.EPContext``); ``run``: the run's fingerprint, stored in each
    checkpoint. ``progress``: True / False, or a ``progress.progress`` counter to advance (one
    shared by several runs). ``summary_extra``: keep ``loss_first``, ``loss_last`` and the
    cumulative ``seconds`` in every checkpoint's ``extra`` (with these entries added), so a resumed
    run can report its whole stage."""
    main = ctx is None or ctx.is_main
    metrics = metrics if main else None
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay, foreach=False if ctx is not None and ctx.fsdp else None,
                         betas=cfg.betas)
    start = 0
    summary = None if summary_extra is None else {"loss_first": None, "loss_last": None, "seconds": 0.0}
    if resume and stage_dir is not None and (ckpt := latest_checkpoint(stage_dir)) is not None:
        st = trainer_state(ckpt)
        if resume_weights:
            _load_weights(model, ckpt, ctx)
        if summary is not None:
            summary.update({k: v for k, v in (st.get("extra") or {}).items() if k in summary})
        if st["done"]:
            return []
        load_optimizer(ckpt, st, model, opt, ctx)
        start = int(st["step"])
    if metrics is not None:
        metrics.truncate_after(cfg.name, start)          # steps past the checkpoint run again
    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, start + stop_after)
    shared = not isinstance(progress, bool)
    bar = progress if shared else counter_for(cfg.steps, f"{cfg.name:>12}", enabled=progress and main, initial=start)
    records = []
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        sums = accumulate(model, objective, objective.micro_batches(step), step)
        parallel.reduce_gradients(model, ctx)
        grad_norm = parallel.clip_grad_norm(model, cfg.clip, ctx)
        fields = objective.end_step(sums)
        opt.step()
        opt.zero_grad(set_to_none=True)
        parallel.sync_router_load(model, ctx)
        model.after_optimizer_step()
        seconds = time.perf_counter() - t0
        rec = {"stage": cfg.name, "step": step, **fields, "lr": lr, "grad_norm": grad_norm, "seconds": seconds}
        records.append(rec)
        if metrics is not None:
            metrics.write(rec)
        if summary is not None:
            if summary["loss_first"] is None:
                summary["loss_first"] = rec["loss"]
            summary["loss_last"] = rec["loss"]
            summary["seconds"] = float(summary["seconds"]) + seconds
        last = step + 1 == cfg.steps
        if stage_dir is not None and ((step + 1) % cfg.save_every == 0 or last):
            extra = None if summary is None else {**summary, **summary_extra}
            _save(stage_dir, model, opt, step + 1, last, ctx, cfg.keep_last, run, extra)
        bar.set_postfix(loss=f"{rec['loss']:.3f}")
        bar.update(1)
    if not shared:
        bar.close()
    if cfg.steps == 0 and stage_dir is not None and latest_checkpoint(stage_dir) is None:
        _save(stage_dir, model, opt, 0, True, ctx, 1, run, None)
    return records

