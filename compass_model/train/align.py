"""Stage 7 of the Compass-v3 recipe: preference alignment with mixed-policy pairs and OTPO.

Pipeline (``run_alignment``):

1. **Pairs** (``pairs.build_pairs``). For each generated task the *chosen* response is the task's reference
   answer (off-policy) and the *rejected* response is a sample of the SFT model itself (on-policy)
   that ``compass_model.data.check`` marks wrong. A correct sample is not a valid rejected response:
   it is resampled up to ``tries`` times, then the pair is dropped (``stats["dropped_correct"]``).
   User data (``{"prompt","chosen","rejected"}`` JSONL) can replace the generated pairs
   (``pairs_from_records``).
2. **Encoding** (``encode_pairs``). Each side is ``[BOS] prompt response [EOS]``, right-padded to a
   common length ``L`` (chosen and rejected share it: OTPO's cost matrix pairs their positions).
   Following ``compass_model.losses``, per-token tensors are indexed by *prediction position*:
   ``labels[:, i]`` is the token position ``i`` predicts, -100 unless it is a response token or the
   final EOS; ``mask = labels != -100``.
3. **Reference log-probs** (``reference_logprobs``), computed once with the SFT model and stored
   *per token* ``[N, L]`` (fp32, 0 off the response) in safetensors, so a resumed run reuses them and
   OTPO can weight them with weights that only exist at train time (summing first is a known bug).
4. **Training** (``train_preference``): DPO (sequence sums) as the baseline, then OTPO (optimal-
   transport token weights from the policy's detached final-norm hidden states), both from the same
   SFT start. AdamW, warmup + cosine ``lr_at``, gradient clipping at 1.0, atomic resumable checkpoints.
5. **Evaluation** (``preference_accuracy``) on held-out pairs.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from compass_model.checkpoint import WEIGHTS_NAME, from_pretrained, load_config
from compass_model.data import (
    load_preference_jsonl,
    make_tasks,
)
from compass_model.losses import (
    dpo_loss,
    otpo_loss,
    otpo_weights,
    sequence_logprobs,
)
from compass_model.train.data import catalogue_items
from compass_model.train.pairs import (
    PairBatch,
    build_pairs,
    encode_pairs,
    forward_pairs,
    load_reference,
    model_device,
    pair_fits,
    pair_logprobs,
    pairs_from_records,
    reference_logprobs,
    save_reference,
)
from compass_model.train import parallel
from compass_model.train.dcp_checkpoint import (
    laid_out_model,
    load_model_shards,
    load_optimizer,
    save_distributed_checkpoint,
)
from compass_model.train.schedule import lr_at
from compass_model.train.state import latest_checkpoint, save_checkpoint, trainer_state

METHODS = ("dpo", "otpo")
ALIGN_TASK_SEED_OFFSET, EVAL_TASK_SEED_OFFSET = 2, 1002


# ---- 4. training ---------------------------------------------------------------------------------

def _rewards_metrics(loss, chosen_rewards, rejected_rewards) -> dict:
    margin = chosen_rewards - rejected_rewards
    return {"loss": float(loss.detach()), "reward_margin": float(margin.mean()),
            "reward_accuracy": float((margin > 0).float().mean()),
            "chosen_reward": float(chosen_rewards.mean()), "rejected_reward": float(rejected_rewards.mean())}


def preference_step_loss(model, batch_slice: PairBatch, ref_slice, method: str, beta: float = 0.1,
                         eps: float = 1.0, tau: float = 0.2, router_losses: bool = False, sft_weight: float = 0.0,
                         share: float = 1.0, router_share: int = 1, nll_tokens: float | None = None):
    """The preference loss of one micro-batch: ``(loss, metrics)``, one forward on chosen + rejected.

    ``ref_slice``: ``(ref_chosen [B, L], ref_rejected [B, L])`` per-token reference log-probs.
    ``method="dpo"``: sequence sums (``sequence_logprobs`` + ``dpo_loss``); ``"otpo"``: OT token weights
    from the policy's detached hidden states (``otpo_weights``) + ``otpo_loss``. ``router_losses``:
    add the MoE balancing terms (aux + z, as the model's own total loss weights them) to the returned
    loss; ``metrics["loss"]`` is always the preference loss alone (``ln 2`` when policy == reference).
    ``sft_weight``: add that times the chosen responses' token-mean NLL (RPO, arXiv 2404.19733; Llama
    3): the chosen answers are the data's references, and without it a few hundred pairs pull the
    policy off its task answers (``compass demo``: SFT accuracy 0.41 -> 0.30 after 100 steps).

    Data parallelism (``batch_slice`` a rank's pairs of a micro-batch): ``share`` is their fraction
    of the micro-batch, ``router_share`` how many forwards average the router terms
    (``parallel.router_share``) and ``nll_tokens`` the micro-batch's chosen-token count, so the ranks'
    losses and their mean metrics *sum* to the single-process ones (``weight_min`` / ``weight_max``
    reduce by min / max)."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dev = model_device(model)
    b = batch_slice.to(dev)
    ref_c, ref_r = (t.to(dev) for t in ref_slice)
    lp_c, lp_r, h_c, h_r, router = forward_pairs(model, b)
    if method == "dpo":
        loss, cr, rr = dpo_loss(sequence_logprobs(lp_c, b.chosen_mask), sequence_logprobs(lp_r, b.rejected_mask),
                                sequence_logprobs(ref_c, b.chosen_mask), sequence_logprobs(ref_r, b.rejected_mask),
                                beta)
        metrics = _rewards_metrics(loss, cr, rr)
    else:
        w_c, w_r = otpo_weights(h_c.detach().float(), h_r.detach().float(), b.chosen_mask, b.rejected_mask,
                                eps=eps, tau=tau)
        loss, cr, rr = otpo_loss(lp_c, lp_r, ref_c, ref_r, w_c, w_r, beta)
        metrics = _rewards_metrics(loss, cr, rr)
        metrics["weight_min"] = float(w_c[b.chosen_mask].min()) if b.chosen_mask.any() else 0.0
        metrics["weight_max"] = float(w_c[b.chosen_mask].max()) if b.chosen_mask.any() else 0.0
    for k in ("loss", "reward_margin", "reward_accuracy", "chosen_reward", "rejected_reward"):
        metrics[k] *= share
    router = router / router_share
    metrics["router_loss"] = float(router.detach())
    total = loss * share + router if router_losses else loss * share
    if sft_weight:
        m = b.chosen_mask.float()
        nll = -(lp_c * m).sum() / (m.sum().clamp(min=1) if nll_tokens is None else max(nll_tokens, 1.0))
        metrics["sft_nll"] = float(nll.detach())
        total = total + sft_weight * nll
    return total, metrics


def step_indices(n: int, step: int, per_step: int, seed: int) -> list:
    """The pair indices of optimizer step ``step``: a pure function of ``(n, step, per_step, seed)``.
    Pairs are read as a stream of epochs, each a permutation seeded by ``(seed, epoch)``, so every pair
    is seen once per epoch and a resumed run draws exactly the minibatch an uninterrupted one would."""
    per_step = min(per_step, n)
    out, perms = [], {}
    for k in range(step * per_step, (step + 1) * per_step):
        epoch = k // n
        if epoch not in perms:
            perms[epoch] = random.Random(f"align/{seed}/{epoch}").sample(range(n), n)
        out.append(perms[epoch][k % n])
    return out


def _load_weights(model, checkpoint_dir, ctx=None) -> None:
    if ctx is not None:
        load_model_shards(checkpoint_dir, model, ctx)
        return
    state = load_file(str(Path(checkpoint_dir) / WEIGHTS_NAME), device=str(model_device(model)))
    model.load_state_dict(state, strict=True)


def _check_split(micro_batch: int, per_step: int, ctx) -> None:
    """Every micro-batch's pairs must split evenly over the ranks (each rank forwards its share)."""
    sizes = {min(micro_batch, per_step - i) for i in range(0, per_step, micro_batch)}
    if ctx is not None and any(n % ctx.world for n in sizes):
        raise ValueError(f"alignment micro-batches of {sorted(sizes)} pairs (micro_batch {micro_batch}, "
                         f"{per_step} pairs a step) must be divisible by the world size {ctx.world} "
                         f"(--dp {ctx.dp} x --ep {ctx.ep})")


def train_preference(model, batch: PairBatch, ref, *, method: str, steps: int, lr: float, micro_batch: int,
                     beta: float = 0.1, eps: float = 1.0, tau: float = 0.2, warmup_steps: int = 0, seed: int = 0,
                     stage_dir=None, metrics=None, resume: bool = False, save_every: int = 1, grad_accum: int = 1,
                     weight_decay: float = 0.0, router_losses: bool = True, sft_weight: float = 0.0,
                     ctx=None) -> list:
    """Train ``model`` in place on preference pairs; returns the per-step records of this call.

    Each optimizer step takes ``micro_batch * grad_accum`` pairs (``step_indices``), AdamW at
    ``lr_at(step, steps, lr, warmup_steps)``, gradients clipped to norm 1.0, then
    ``model.after_optimizer_step()``. Records ``{"stage": "align-<method>", "step", "loss", "lr",
    "reward_margin", "reward_accuracy", "seconds", ...}`` go to ``metrics`` (a ``MetricsWriter``) too.

    ``stage_dir``: atomic checkpoints (``state.save_checkpoint``) every ``save_every`` steps and at the
    end (``done=True``). ``resume=True`` continues from the latest checkpoint there (weights, optimizer
    state and step); if that stage is finished its weights are loaded into ``model`` and nothing runs.
    The checkpoint's ``extra`` keeps ``loss_first``, ``loss_last`` and the cumulative ``seconds``.

    ``ctx`` (``parallel.EPContext``; ``model`` laid out by ``parallel.shard``): as the trainer, every
    rank forwards its contiguous share of each micro-batch's pairs, gradients are summed over the
    ranks, clipped by their global norm, router statistics are the layout's (global by default), and
    checkpoints are DCP shards (``dcp_checkpoint.py``); rank 0 writes the metrics.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1 or micro_batch < 1 or grad_accum < 1 or save_every < 1:
        raise ValueError(f"need steps, micro_batch, grad_accum, save_every >= 1, got "
                         f"{steps}, {micro_batch}, {grad_accum}, {save_every}")
    ref_c, ref_r = ref
    if tuple(ref_c.shape) != tuple(batch.chosen_ids.shape) or tuple(ref_r.shape) != tuple(batch.rejected_ids.shape):
        raise ValueError(f"reference log-probs {tuple(ref_c.shape)} do not match the batch {tuple(batch.chosen_ids.shape)}")
    stage = f"align-{method}"
    per_step = min(micro_batch * grad_accum, len(batch))
    _check_split(micro_batch, per_step, ctx)
    metrics = metrics if ctx is None or ctx.is_main else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay,
                            foreach=False if ctx is not None and ctx.fsdp else None)
    start, extra = 0, {"loss_first": None, "loss_last": None, "seconds": 0.0}
    if resume and stage_dir is not None and (ckpt := latest_checkpoint(stage_dir)) is not None:
        state = trainer_state(ckpt)
        _load_weights(model, ckpt, ctx)
        extra.update({k: v for k, v in (state.get("extra") or {}).items() if k in extra})
        if state["done"]:
            return []
        load_optimizer(ckpt, state, model, opt, ctx)
        start = int(state["step"])
    if metrics is not None:
        metrics.truncate_after(stage, start)
    n = len(batch)
    records = []
    model.train()
    for step in range(start, steps):
        t0 = time.perf_counter()
        cur_lr = lr_at(step, steps, lr, warmup_steps)
        for g in opt.param_groups:
            g["lr"] = cur_lr
        idx = step_indices(n, step, per_step, seed)
        opt.zero_grad(set_to_none=True)
        agg: dict = {}
        for i in range(0, len(idx), micro_batch):
            sub = torch.tensor(idx[i:i + micro_batch])
            mine, dist_kw = sub, {}
            if ctx is not None:                 # this rank's contiguous share of the micro-batch
                k = len(sub) // ctx.world
                mine = sub[ctx.rank * k:(ctx.rank + 1) * k]
                dist_kw = {"share": k / len(sub), "router_share": parallel.router_share(ctx),
                           "nll_tokens": float(batch.chosen_mask[sub].sum())}
            loss, m = preference_step_loss(model, batch.select(mine), (ref_c[mine], ref_r[mine]), method, beta,
                                           eps, tau, router_losses=router_losses, sft_weight=sft_weight, **dist_kw)
            w = len(sub) / len(idx)             # each micro loss is a mean over its pairs
            (loss * w).backward()
            for k, v in parallel.reduce_metrics(m, ctx).items():
                agg[k] = agg.get(k, 0.0) + w * v
        parallel.reduce_gradients(model, ctx)
        grad_norm = parallel.clip_grad_norm(model, 1.0, ctx)
        opt.step()
        parallel.sync_router_load(model, ctx)
        model.after_optimizer_step()
        seconds = time.perf_counter() - t0
        rec = {"stage": stage, "step": step, "loss": agg["loss"], "lr": cur_lr,
               "reward_margin": agg["reward_margin"], "reward_accuracy": agg["reward_accuracy"],
               "seconds": seconds, "grad_norm": float(grad_norm),
               **{k: v for k, v in agg.items() if k not in ("loss", "reward_margin", "reward_accuracy")}}
        records.append(rec)
        if metrics is not None:
            metrics.write(rec)
        if extra["loss_first"] is None:
            extra["loss_first"] = rec["loss"]
        extra["loss_last"] = rec["loss"]
        extra["seconds"] = float(extra["seconds"]) + seconds
        done = step + 1 == steps
        if stage_dir is not None and (done or (step + 1) % save_every == 0):
            keep = {**extra, "method": method, "steps": steps, "seed": seed}
            if ctx is None:
                save_checkpoint(stage_dir, model, opt, step + 1, done=done, extra=keep)
            else:
                save_distributed_checkpoint(stage_dir, model, opt, step + 1, done, ctx, extra=keep)
    return records


# ---- 5. evaluation -------------------------------------------------------------------------------

def preference_accuracy(model, batch: PairBatch, ref, beta: float = 0.1, micro_batch: int = 16) -> dict:
    """Held-out preference metrics (eval mode, no grad), from sequence sums over the response:
    ``reward_accuracy``: fraction of pairs with ``beta ((pi_c - ref_c) - (pi_r - ref_r)) > 0``;
    ``logp_accuracy``: fraction whose mean per-token log-prob is higher on the chosen side;
    ``margin``: the mean reward margin; ``n``: pairs. (For the reference model itself every margin is
    0, so its ``reward_accuracy`` is 0 and only ``logp_accuracy`` is informative.)"""
    lp_c, lp_r = pair_logprobs(model, batch, micro_batch)
    ref_c, ref_r = (t.to(lp_c.device) for t in ref)
    mc, mr = batch.chosen_mask.to(lp_c.device), batch.rejected_mask.to(lp_c.device)
    margin = beta * ((sequence_logprobs(lp_c, mc) - sequence_logprobs(ref_c, mc))
                     - (sequence_logprobs(lp_r, mr) - sequence_logprobs(ref_r, mr)))
    mean_c = sequence_logprobs(lp_c, mc) / mc.sum(-1).clamp(min=1)
    mean_r = sequence_logprobs(lp_r, mr) / mr.sum(-1).clamp(min=1)
    return {"reward_accuracy": float((margin > 0).float().mean()),
            "logp_accuracy": float((mean_c > mean_r).float().mean()),
            "margin": float(margin.mean()), "n": len(batch)}


# ---- the stage -----------------------------------------------------------------------------------

def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1))
    os.replace(tmp, path)


def _fitting_tasks(n: int, seed: int, tokenizer, max_len: int, n_items: int) -> list:
    """The first ``n`` tasks of ``make_tasks(seed)`` whose prompt + answer fit ``max_len`` with room
    for a rejected sample (make_tasks is prefix-stable in n, so drawing more only appends tasks)."""
    if n < 1:
        return []
    specials = 1 + (tokenizer.bos_id is not None)
    fits = lambda t: (len(tokenizer.encode(t.prompt)) + specials
                      + max(len(tokenizer.encode(t.answer)), 1) + 1 <= max_len)
    for factor in (2, 4, 16):
        tasks = [t for t in make_tasks(n * factor, seed=seed, n_items=n_items) if fits(t)]
        if len(tasks) >= n:
            return tasks[:n]
    return tasks


def _stage_summary(stage_dir: Path, records: list) -> dict:
    ckpt = latest_checkpoint(stage_dir)
    extra = trainer_state(ckpt)["extra"] if ckpt is not None else {}
    return {"loss_first": extra.get("loss_first", records[0]["loss"] if records else None),
            "loss_last": extra.get("loss_last", records[-1]["loss"] if records else None),
            "seconds": extra.get("seconds", sum(r["seconds"] for r in records)),
            "steps": trainer_state(ckpt)["step"] if ckpt is not None else len(records)}


def _pairs_and_reference(sft, out_dir: Path, tokenizer, *, n_pairs, eval_pairs, micro_batch, max_len, seed,
                         resume, pairs_file, max_new_tokens, temperature, top_p, tries):
    """Steps 1 and 2 of ``run_alignment`` (cached under ``out_dir``) with the SFT model ``sft`` (None:
    read the caches only): ``(train_b, eval_b, refs, pair counts and stats)``."""
    # 1. pairs (cached)
    pairs_path = out_dir / "pairs.json"
    if resume and pairs_path.is_file():
        cached = json.loads(pairs_path.read_text())
        train_pairs, eval_pairs_, pstats = cached["train"], cached["eval"], cached["stats"]
    else:
        t0 = time.perf_counter()
        if pairs_file is not None:
            records = load_preference_jsonl(pairs_file)
            if len(records) <= eval_pairs:
                raise ValueError(f"{pairs_file}: {len(records)} records, need more than eval_pairs = {eval_pairs}")
            eval_pairs_ = pairs_from_records(records[len(records) - eval_pairs:])
            train_pairs = pairs_from_records(records[:len(records) - eval_pairs][:n_pairs])
            pstats = {"source": str(pairs_file), "dropped_correct": 0, "dropped_empty": 0}
        else:
            n_items = catalogue_items(max_len)
            kw = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "tries": tries,
                  "max_len": max_len}
            train_pairs, st_train = build_pairs(
                sft, tokenizer, _fitting_tasks(n_pairs, seed + ALIGN_TASK_SEED_OFFSET, tokenizer, max_len, n_items),
                seed=seed, **kw)
            eval_pairs_, st_eval = build_pairs(
                sft, tokenizer, _fitting_tasks(eval_pairs, seed + EVAL_TASK_SEED_OFFSET, tokenizer, max_len, n_items),
                seed=seed + 1, **kw)
            pstats = {"source": "generated", "train_stats": st_train, "eval_stats": st_eval,
                      **{k: st_train[k] + st_eval[k] for k in st_train}}
        pstats["seconds"] = time.perf_counter() - t0
        if not train_pairs or not eval_pairs_:
            raise ValueError(f"no usable pairs (train {len(train_pairs)}, eval {len(eval_pairs_)}): {pstats}")
        _write_json(pairs_path, {"train": train_pairs, "eval": eval_pairs_, "stats": pstats})
    train_b = encode_pairs(train_pairs, tokenizer, max_len)
    eval_b = encode_pairs(eval_pairs_, tokenizer, max_len)

    # 2. reference log-probs, per token (cached)
    refs = {}
    for name, b in (("train", train_b), ("eval", eval_b)):
        path = out_dir / f"reference-{name}.safetensors"
        if resume and path.is_file():
            refs[name] = load_reference(path, b)
        else:
            refs[name] = reference_logprobs(sft, b, micro_batch)
            save_reference(path, *refs[name], batch=b)
    return train_b, eval_b, refs, {"train": len(train_pairs), "eval": len(eval_pairs_), **pstats}


def run_alignment(sft_model_dir, out_dir, tokenizer, *, n_pairs: int, eval_pairs: int, steps: int, lr: float,
                  micro_batch: int, max_len: int, beta: float = 0.1, seed: int = 0, metrics=None,
                  resume: bool = False, pairs_file=None, eps: float = 1.0, tau: float = 0.2,
                  warmup_steps: int = 0, max_new_tokens: int | None = None, temperature: float = 1.0,
                  top_p: float = 0.95, tries: int = 2, device=None, sft_weight: float = 0.0, ctx=None) -> dict:
    """Stage 7: pairs -> reference log-probs -> DPO baseline and OTPO, both from the SFT model.

    Train pairs come from ``make_tasks(n_pairs, seed + 2)``, held-out pairs from
    ``make_tasks(eval_pairs, seed + 1002)`` (tasks that fit ``max_len``), rejected responses sampled from
    the SFT model. With ``pairs_file`` (preference JSONL) nothing is sampled: the last ``eval_pairs``
    records are held out and up to ``n_pairs`` of the others train. Under ``out_dir``: ``pairs.json``
    and ``reference-{train,eval}.safetensors`` (reused on resume), checkpoints in
    ``checkpoints/align-dpo`` (DPO) and ``checkpoints/align`` (OTPO).

    Returns ``{"pairs": {"train", "eval", "dropped_correct", ...}, "sft_eval": {...},
    "dpo": {"loss_first", "loss_last", "seconds", "steps", "eval", "train_eval"}, "otpo": {...}}``
    (``eval`` / ``sft_eval`` are ``preference_accuracy`` dicts on the held-out pairs).

    ``ctx`` (``parallel.EPContext``, every rank calls): rank 0 builds the pairs and reference
    log-probs (the SFT model, dense, in one process), the other ranks read them from its files; DPO
    and OTPO train on the layout of ``ctx`` (``train_preference``), and rank 0 evaluates the dense
    model consolidated from each stage's final checkpoint. Ranks other than 0 return ``{}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    main = ctx is None or ctx.is_main
    load = lambda: from_pretrained(sft_model_dir, device)
    max_seq_len = load_config(sft_model_dir).max_seq_len
    if max_len > max_seq_len:
        raise ValueError(f"max_len {max_len} exceeds the model's max_seq_len {max_seq_len}")
    kw = {"n_pairs": n_pairs, "eval_pairs": eval_pairs, "micro_batch": micro_batch, "max_len": max_len, "seed": seed,
          "pairs_file": pairs_file, "max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p,
          "tries": tries}
    sft = load() if main else None
    if main:
        train_b, eval_b, refs, pstats = _pairs_and_reference(sft, out_dir, tokenizer, resume=resume, **kw)
    parallel.barrier(ctx)
    if not main:                                    # rank 0's files, as a resume reads them
        train_b, eval_b, refs, pstats = _pairs_and_reference(None, out_dir, tokenizer, resume=True, **kw)
    result = {"pairs": pstats,
              "sft_eval": preference_accuracy(sft, eval_b, refs["eval"], beta, micro_batch) if main else None}
    del sft

    # 3. DPO baseline, then OTPO, each from the SFT weights
    for method, stage_name in (("dpo", "align-dpo"), ("otpo", "align")):
        policy = load() if ctx is None else laid_out_model(sft_model_dir, ctx, device=device)
        stage_dir = out_dir / "checkpoints" / stage_name
        records = train_preference(policy, train_b, refs["train"], method=method, steps=steps, lr=lr,
                                   micro_batch=micro_batch, beta=beta, eps=eps, tau=tau, warmup_steps=warmup_steps,
                                   seed=seed, stage_dir=stage_dir, metrics=metrics, resume=resume,
                                   sft_weight=sft_weight, ctx=ctx)
        if main:
            final = policy if ctx is None else from_pretrained(latest_checkpoint(stage_dir), device)
            result[method] = {**_stage_summary(stage_dir, records),
                              "eval": preference_accuracy(final, eval_b, refs["eval"], beta, micro_batch),
                              "train_eval": preference_accuracy(final, train_b, refs["train"], beta, micro_batch)}
        del policy
        parallel.barrier(ctx)
    if not main:
        return {}
    _write_json(out_dir / "align-summary.json", result)
    return result


__all__ = ["METHODS", "PairBatch", "build_pairs", "encode_pairs", "load_reference", "pair_fits", "pairs_from_records",
           "preference_accuracy", "preference_step_loss", "reference_logprobs", "run_alignment", "save_reference",
           "step_indices", "train_preference"]

