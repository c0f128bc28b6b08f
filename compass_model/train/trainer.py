"""One pretraining / SFT stage: AdamW, warmup + cosine, gradient accumulation with global token
normalisation, clipping, fp32 or bf16 autocast, router aux-coefficient decay, per-step metrics and
atomic per-step checkpoints (``state.py``), resumable.

Global token normalisation: an optimizer step of M micro-batches divides every micro-batch's
summed token loss by ``N = sum over all M of the loss-mask weights``, so the gradient is the mean
over the step's tokens however they fall into micro-batches (not a mean of per-batch means, which
over-weights short batches). The MTP term is normalised by the same N (its token sums over the
step's LM token count), so it too adds up across micro-batches and EP ranks; the aux and z terms are
per-batch means and are averaged over M.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from compass_model.moe import aux_loss_coefficient
from compass_model.train import parallel
from compass_model.train.dcp_checkpoint import load_optimizer, save_distributed_checkpoint
from compass_model.train.metrics import MetricsWriter, read_metrics
from compass_model.train.schedule import lr_at
from compass_model.train.progress import progress as counter_for
from compass_model.train.state import latest_checkpoint, save_checkpoint, trainer_state


def make_optimizer(model, lr: float, weight_decay: float, foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95); weight decay on matrices only (not norms, router biases are buffers).
    ``foreach=False`` where FSDP2's DTensor parameters and plain expert shards mix."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    other = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=foreach)


def _autocast(model, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16)


def _to(batch, device):
    return {"input_ids": batch.input_ids.to(device), "labels": batch.labels.to(device),
            "loss_mask": batch.loss_mask().to(device), "position_ids": batch.position_ids.to(device),
            "attention_mask": batch.attention_mask().to(device)}


def accumulate_gradients(model, micro: list, stage, step: int, ctx=None):
    """Forward + backward of one optimizer step's micro-batches (``PackedBatch``es) into ``.grad``.
    Returns (totals: loss terms summed as the objective sees them, per-micro expert-load fractions,
    per-micro load entropies). ``ctx`` (expert parallelism, ``parallel.EPContext``): this rank runs
    its rows of every micro-batch; the token count is the whole step's on every rank, and with global
    router statistics so are the aux and z normalisers (``parallel.router_share``)."""
    device = next(model.parameters()).device
    c = model.config
    n_tokens = sum(float(b.loss_mask()[b.labels != -100].sum()) for b in micro)
    w_mtp = stage.mtp_weight(c) if step % stage.mtp_every == 0 else 0.0
    alpha = float(aux_loss_coefficient(c, model.step))
    M = len(micro) * parallel.router_share(ctx)   # per-forward router means: averaged over forwards
    micro = [parallel.rank_rows(b, ctx) for b in micro]
    totals = {"loss": 0.0, "lm": 0.0, "mtp": 0.0, "aux": 0.0, "z": 0.0, "tokens": n_tokens,
              "aux_coef": alpha, "mtp_weight": w_mtp}
    loads, entropies = [], []
    n_trunk = c.n_moe_layers                     # router_stats: trunk MoE blocks first, then MTP
    for b in micro:
        with _autocast(model, stage.precision):
            out = model(**_to(b, device), num_tokens=max(n_tokens, 1.0))
        ls = out.losses
        loss = ls["lm"] + w_mtp * ls["mtp"] + (alpha * ls["aux"] + c.z_loss_coef * ls["z"]) / M
        loss.backward()
        totals["loss"] += float(loss.detach())
        totals["lm"] += float(ls["lm"].detach())
        totals["mtp"] += float(ls["mtp"].detach())
        for k in ("aux", "z"):
            totals[k] += float(ls[k].detach()) / M
        trunk = out.router_stats[:n_trunk]
        if trunk:
            loads.append(torch.stack([s["load"].float() / s["load"].sum().clamp(min=1) for s in trunk]).mean(0))
            entropies.append(float(torch.stack([s["entropy"].float() for s in trunk]).mean()))
    return totals, loads, entropies


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
    parallel.check_rows(stage, ctx)
    main = ctx is None or ctx.is_main
    metrics = metrics if main else None
    opt = make_optimizer(model, stage.lr, stage.weight_decay, foreach=False if ctx is not None and ctx.fsdp else None)
    start = 0
    if resume and (ckpt := latest_checkpoint(stage_dir)) is not None:
        st = trainer_state(ckpt)
        start = st["step"]
        load_optimizer(ckpt, st, model, opt, ctx)
    if metrics is not None:
        metrics.truncate_after(stage.name, start)          # steps past the checkpoint run again
    model.train()
    end = stage.steps if stop_after is None else min(stage.steps, start + stop_after)
    bar = counter_for(stage.steps, f"{stage.name:>12}", enabled=progress and main, initial=start)
    for step in range(start, end):
        t0 = time.perf_counter()
        lr = lr_at(step, stage.steps, stage.lr, stage.warmup_steps, stage.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = data.micro_batches(step, stage.grad_accum)
        totals, loads, entropies = accumulate_gradients(model, micro, stage, step, ctx)
        parallel.reduce_gradients(model, ctx)
        grad_norm = parallel.clip_grad_norm(model, stage.clip, ctx)
        totals = parallel.all_reduce_totals(totals, ctx)
        opt.step()
        opt.zero_grad(set_to_none=True)
        parallel.sync_router_load(model, ctx)
        model.after_optimizer_step()
        record = {"stage": stage.name, "step": step, **totals, "lr": lr, "grad_norm": grad_norm,
                  "seconds": time.perf_counter() - t0}
        if loads:
            record["load_entropy"] = sum(entropies) / len(entropies)
            record["expert_load"] = [round(v, 5) for v in torch.stack(loads).mean(0).tolist()]
        if metrics is not None:
            metrics.write(record)
        last = step + 1 == stage.steps
        if (step + 1) % stage.save_every == 0 or last:
            if ctx is None:
                save_checkpoint(stage_dir, model, opt, step + 1, done=last, keep_last=keep_last, run=run)
            else:
                save_distributed_checkpoint(stage_dir, model, opt, step + 1, last, ctx, keep_last=keep_last, run=run)
        bar.set_postfix(loss=f"{totals['loss']:.3f}")
        bar.update(1)
    bar.close()
    if stage.steps == 0 and latest_checkpoint(stage_dir) is None:
        if ctx is None:
            save_checkpoint(stage_dir, model, opt, 0, done=True, run=run)
        else:
            save_distributed_checkpoint(stage_dir, model, opt, 0, True, ctx, run=run)
    return stage_summary(stage.name, read_metrics(metrics.path) if metrics is not None else [])


def stage_summary(name: str, records: list) -> dict:
    """``loss_first`` / ``loss_last``: means over the stage's first / last ``max(1, n // 10)`` steps
    (single steps are noisy at these batch sizes); ``seconds``: summed step times."""
    rs = [r for r in records if r.get("stage") == name]
    k = max(1, len(rs) // 10)
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"name": name, "steps": len(rs), "loss_first": mean([r["loss"] for r in rs[:k]]),
            "loss_last": mean([r["loss"] for r in rs[-k:]]), "seconds": sum(r.get("seconds", 0.0) for r in rs)}


def stage_dir_for(out_dir, name: str) -> Path:
    return Path(out_dir) / "checkpoints" / name
