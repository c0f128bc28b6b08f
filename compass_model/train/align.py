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
   SFT start, through the one training loop (``loop.py``): AdamW, warmup + cosine ``lr_at``, gradient
   clipping at 1.0, atomic resumable checkpoints.
5. **Evaluation** (``preference_accuracy``) on held-out pairs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from compass_model.checkpoint import from_pretrained, load_config
from compass_model.data import load_preference_jsonl, make_tasks
from compass_model.losses import sequence_logprobs
from compass_model.train import parallel
from compass_model.train.data import catalogue_items
from compass_model.train.dcp_checkpoint import laid_out_model
from compass_model.train.loop import LoopConfig, train_loop
from compass_model.train.objectives import (
    METHODS,
    PreferenceObjective,
    preference_step_loss,
    step_indices,
)
from compass_model.train.pairs import (
    PairBatch,
    build_pairs,
    encode_pairs,
    load_reference,
    pair_fits,
    pair_logprobs,
    pairs_from_records,
    reference_logprobs,
    save_reference,
)
from compass_model.train.state import latest_checkpoint, trainer_state

ALIGN_BETAS = (0.9, 0.999)             # AdamW's defaults, as alignment has always trained
ALIGN_TASK_SEED_OFFSET, EVAL_TASK_SEED_OFFSET = 2, 1002


# ---- 4. training ---------------------------------------------------------------------------------

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
                     ctx=None, progress: bool = False) -> list:
    """Train ``model`` in place on preference pairs; returns the per-step records of this call.

    ``loop.train_loop`` with a ``objectives.PreferenceObjective``: each optimizer step takes
    ``micro_batch * grad_accum`` pairs (``step_indices``), AdamW (betas 0.9, 0.999; ``weight_decay``
    on matrices only, the shared ``loop.make_optimizer`` groups) at ``lr_at(step, steps, lr,
    warmup_steps)``, gradients clipped to norm 1.0, then ``model.after_optimizer_step()``. Records ``{"stage": "align-<method>", "step", "loss", "lr",
    "reward_margin", "reward_accuracy", "seconds", ...}`` go to ``metrics`` (a ``MetricsWriter``) too.

    ``stage_dir``: atomic checkpoints (``state.save_checkpoint``) every ``save_every`` steps and at the
    end (``done=True``). ``resume=True`` continues from the latest checkpoint there (weights, optimizer
    state and step); if that stage is finished its weights are loaded into ``model`` and nothing runs.
    The checkpoint's ``extra`` keeps ``loss_first``, ``loss_last`` and the cumulative ``seconds``.

    ``ctx`` (``parallel.EPContext``; ``model`` laid out by ``parallel.shard``): as the trainer, every
    rank forwards its contiguous share of each micro-batch's pairs, gradients are summed over the
    ranks, clipped by their global norm, router statistics are the layout's (global by default), and
    checkpoints are DCP shards (``dcp_checkpoint.py``); rank 0 writes the metrics. ``progress``: a
    bar on a terminal, else a log line every tenth of the steps (``progress.py``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if steps < 1 or micro_batch < 1 or grad_accum < 1 or save_every < 1:
        raise ValueError(f"need steps, micro_batch, grad_accum, save_every >= 1, got "
                         f"{steps}, {micro_batch}, {grad_accum}, {save_every}")
    ref_c, ref_r = ref
    if tuple(ref_c.shape) != tuple(batch.chosen_ids.shape) or tuple(ref_r.shape) != tuple(batch.rejected_ids.shape):
        raise ValueError(f"reference log-probs {tuple(ref_c.shape)} do not match the batch {tuple(batch.chosen_ids.shape)}")
    per_step = min(micro_batch * grad_accum, len(batch))
    _check_split(micro_batch, per_step, ctx)
    objective = PreferenceObjective(batch, ref, method=method, micro_batch=micro_batch, per_step=per_step, seed=seed,
                                    beta=beta, eps=eps, tau=tau, router_losses=router_losses,
                                    sft_weight=sft_weight, ctx=ctx)
    cfg = LoopConfig(f"align-{method}", steps, lr, warmup_steps, weight_decay=weight_decay, betas=ALIGN_BETAS,
                     save_every=save_every)
    return train_loop(model, objective, cfg, stage_dir=stage_dir, metrics=metrics, resume=resume,
                      resume_weights=True, ctx=ctx, progress=progress,
                      summary_extra={"method": method, "steps": steps, "seed": seed})


# ---- 5. evaluation -------------------------------------------------------------------------------

def preference_accuracy(model, batch: PairBatch, ref, beta: float = 0.1, micro_batch: int = 16,
                        desc: str | None = None) -> dict:
    """Held-out preference metrics (eval mode, no grad), from sequence sums over the response:
    ``reward_accuracy``: fraction of pairs with ``beta ((pi_c - ref_c) - (pi_r - ref_r)) > 0``;
    ``logp_accuracy``: fraction whose mean per-token log-prob is higher on the chosen side;
    ``margin``: the mean reward margin; ``n``: pairs. (For the reference model itself every margin is
    0, so its ``reward_accuracy`` is 0 and only ``logp_accuracy`` is informative.) ``desc``: report
    progress under that label (``pairs.pair_logprobs``)."""
    lp_c, lp_r = pair_logprobs(model, batch, micro_batch, desc)
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
                         resume, pairs_file, max_new_tokens, temperature, top_p, tries, progress=False):
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
            refs[name] = reference_logprobs(sft, b, micro_batch, desc=f"reference log-probs ({name} pairs)"
                                            if progress else None)
            save_reference(path, *refs[name], batch=b)
    return train_b, eval_b, refs, {"train": len(train_pairs), "eval": len(eval_pairs_), **pstats}


def run_alignment(sft_model_dir, out_dir, tokenizer, *, n_pairs: int, eval_pairs: int, steps: int, lr: float,
                  micro_batch: int, max_len: int, beta: float = 0.1, seed: int = 0, metrics=None,
                  resume: bool = False, pairs_file=None, eps: float = 1.0, tau: float = 0.2,
                  warmup_steps: int = 0, max_new_tokens: int | None = None, temperature: float = 1.0,
                  top_p: float = 0.95, tries: int = 2, device=None, sft_weight: float = 0.0, ctx=None,
                  progress: bool = False) -> dict:
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
        train_b, eval_b, refs, pstats = _pairs_and_reference(sft, out_dir, tokenizer, resume=resume,
                                                             progress=progress, **kw)
    parallel.barrier(ctx)
    if not main:                                    # rank 0's files, as a resume reads them
        train_b, eval_b, refs, pstats = _pairs_and_reference(None, out_dir, tokenizer, resume=True, **kw)

    def desc(label: str) -> str | None:
        return f"preference accuracy ({label})" if progress else None

    result = {"pairs": pstats,
              "sft_eval": preference_accuracy(sft, eval_b, refs["eval"], beta, micro_batch, desc("SFT, held-out"))
              if main else None}
    del sft

    # 3. DPO baseline, then OTPO, each from the SFT weights
    for method, stage_name in (("dpo", "align-dpo"), ("otpo", "align")):
        policy = load() if ctx is None else laid_out_model(sft_model_dir, ctx, device=device)
        stage_dir = out_dir / "checkpoints" / stage_name
        records = train_preference(policy, train_b, refs["train"], method=method, steps=steps, lr=lr,
                                   micro_batch=micro_batch, beta=beta, eps=eps, tau=tau, warmup_steps=warmup_steps,
                                   seed=seed, stage_dir=stage_dir, metrics=metrics, resume=resume,
                                   sft_weight=sft_weight, ctx=ctx, progress=progress)
        if main:
            final = policy if ctx is None else from_pretrained(latest_checkpoint(stage_dir), device)
            result[method] = {**_stage_summary(stage_dir, records),
                              "eval": preference_accuracy(final, eval_b, refs["eval"], beta, micro_batch,
                                                          desc(f"{method}, held-out")),
                              "train_eval": preference_accuracy(final, train_b, refs["train"], beta, micro_batch,
                                                                desc(f"{method}, train"))}
        del policy
        parallel.barrier(ctx)
    if not main:
        return {}
    _write_json(out_dir / "align-summary.json", result)
    return result


__all__ = ["METHODS", "PairBatch", "build_pairs", "encode_pairs", "load_reference", "pair_fits", "pairs_from_records",
           "preference_accuracy", "preference_step_loss", "reference_logprobs", "run_alignment", "save_reference",
           "step_indices", "train_preference"]

