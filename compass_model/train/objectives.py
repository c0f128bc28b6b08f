"""The objectives of ``loop.train_loop``: each turns one optimizer step's batches into losses to
backpropagate and the metrics to log. An objective has four methods:

* ``micro_batches(step)``: the step's micro-batches, a pure function of ``step`` (so a resumed run
  draws exactly the batches an uninterrupted one would);
* ``begin_step(model, micro, step)``: per-step normalisers (the step's token count, the aux
  coefficient, ...), seen before any forward;
* ``loss(model, batch)``: ``(loss, metrics)`` of one micro-batch. The loop calls
  ``loss.backward()`` and *sums* the metrics over the step's micro-batches, so both come already
  scaled to their share of the step;
* ``end_step(sums)``: the step's logged fields from the summed metrics (reduced over ranks where
  the objective did not already), at least ``"loss"``.

``LMObjective``: next-token LM with multi-token prediction and MoE router terms, the pretraining
stages and SFT (the SFT mixed loss is the same objective: the batches' loss masks weight prompt
tokens 1 on e-commerce samples and 0 on general ones, ``data.PackedBatch.loss_mask``).
``PreferenceObjective``: DPO or OTPO on preference pairs against per-token reference log-probs.
"""

from __future__ import annotations

import contextlib
import random

import torch

from compass_model.losses import dpo_loss, otpo_loss, otpo_weights, sequence_logprobs
from compass_model.moe import aux_loss_coefficient
from compass_model.train import parallel
from compass_model.train.pairs import PairBatch, forward_pairs, model_device

METHODS = ("dpo", "otpo")


# ---- language modelling (pretraining stages, SFT) -----------------------------------------------

def _autocast(model, precision: str):
    if precision != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device_type=next(model.parameters()).device.type, dtype=torch.bfloat16)


def batch_inputs(batch, device=None) -> dict:
    """A ``PackedBatch`` as the model's keyword arguments (on ``device``)."""
    t = {"input_ids": batch.input_ids, "labels": batch.labels, "loss_mask": batch.loss_mask(),
         "position_ids": batch.position_ids, "attention_mask": batch.attention_mask()}
    return t if device is None else {k: v.to(device) for k, v in t.items()}


class LMObjective:
    """``loss = lm + w_mtp mtp + (alpha(step) aux + z_coef z) / M`` per micro-batch.

    Global token normalisation: an optimizer step of M micro-batches divides every micro-batch's
    summed token loss by ``N = sum over all M of the loss-mask weights``, so the gradient is the
    mean over the step's tokens however they fall into micro-batches (not a mean of per-batch
    means, which over-weights short batches). The MTP term is normalised by the same N, so it too
    adds up across micro-batches and ranks; the aux and z terms are per-batch means averaged over
    the M forwards (times the ranks' router share, ``parallel.router_share``).

    ``data``: anything with ``micro_batches(step, n)`` (``data.StageData``); ``mtp_weight`` applies
    on steps where ``step % mtp_every == 0``; ``precision="bf16"``: autocast; ``ctx``: every rank
    forwards its rows of each micro-batch (``parallel.rank_rows``); ``per_block_load``: also log
    ``block_counts``, the expert assignments of every trunk MoE block (summed over micro-batches).
    Logged: ``loss, lm, mtp, aux, z, tokens, aux_coef, mtp_weight`` and, with MoE blocks,
    ``load_entropy`` and ``expert_load`` (means over blocks and micro-batches)."""

    def __init__(self, data, *, grad_accum: int = 1, mtp_weight: float = 0.0, mtp_every: int = 1,
                 precision: str = "fp32", ctx=None, per_block_load: bool = False):
        self.data, self.grad_accum, self.mtp_weight, self.mtp_every = data, grad_accum, mtp_weight, mtp_every
        self.precision, self.ctx, self.per_block_load = precision, ctx, per_block_load

    @classmethod
    def for_stage(cls, stage, data, model_config, ctx=None) -> LMObjective:
        """The objective of a pretraining or SFT ``StageConfig``."""
        parallel.check_rows(stage, ctx)
        return cls(data, grad_accum=stage.grad_accum, mtp_weight=stage.mtp_weight(model_config),
                   mtp_every=stage.mtp_every, precision=stage.precision, ctx=ctx)

    def micro_batches(self, step: int) -> list:
        """The step's ``grad_accum`` micro-batches (``PackedBatch``es, every rank's rows)."""
        return self.data.micro_batches(step, self.grad_accum)

    def begin_step(self, model, micro: list, step: int) -> None:
        """The step's token count, MTP weight, aux coefficient and router-term divisor."""
        self.n_tokens = sum(float(b.loss_mask()[b.labels != -100].sum()) for b in micro)
        self.w_mtp = self.mtp_weight if step % self.mtp_every == 0 else 0.0
        self.alpha = float(aux_loss_coefficient(model.config, model.step))
        self.M = len(micro) * parallel.router_share(self.ctx)
        self.loads, self.entropies, self.blocks = [], [], []

    def loss(self, model, batch):
        """This rank's rows of one micro-batch: forward, the loss to backpropagate and its terms."""
        c = model.config
        b = parallel.rank_rows(batch, self.ctx)
        with _autocast(model, self.precision):
            out = model(**batch_inputs(b, next(model.parameters()).device), num_tokens=max(self.n_tokens, 1.0))
        ls = out.losses
        loss = ls["lm"] + self.w_mtp * ls["mtp"] + (self.alpha * ls["aux"] + c.z_loss_coef * ls["z"]) / self.M
        metrics = {"loss": float(loss.detach()), "lm": float(ls["lm"].detach()), "mtp": float(ls["mtp"].detach()),
                   "aux": float(ls["aux"].detach()) / self.M, "z": float(ls["z"].detach()) / self.M}
        trunk = out.router_stats[:c.n_moe_layers]       # router_stats: trunk MoE blocks first, then MTP
        if trunk:
            self.loads.append(torch.stack([s["load"].float() / s["load"].sum().clamp(min=1) for s in trunk]).mean(0))
            self.entropies.append(float(torch.stack([s["entropy"].float() for s in trunk]).mean()))
            if self.per_block_load:             # load fractions times the assignments T k
                n_assign = b.input_ids.numel() * c.top_k
                self.blocks.append(torch.stack([s["load"].double() for s in trunk]) * n_assign)
        return loss, metrics

    def end_step(self, sums: dict) -> dict:
        """The step's loss terms summed over micro-batches and ranks, with the router load."""
        totals = {**sums, "tokens": self.n_tokens, "aux_coef": self.alpha, "mtp_weight": self.w_mtp}
        totals = parallel.all_reduce_totals(totals, self.ctx)
        if self.loads:
            totals["load_entropy"] = sum(self.entropies) / len(self.entropies)
            totals["expert_load"] = [round(v, 5) for v in torch.stack(self.loads).mean(0).tolist()]
        if self.blocks:
            totals["block_counts"] = [[round(v) for v in blk] for blk in torch.stack(self.blocks).sum(0).tolist()]
        return totals


# ---- preference alignment (DPO, OTPO) ------------------------------------------------------------

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


class PreferenceObjective:
    """DPO or OTPO (``preference_step_loss``) on the pairs of ``batch`` against the per-token
    reference log-probs ``ref``. A step takes ``per_step`` pairs (``step_indices``) in micro-batches
    of ``micro_batch``; each micro-batch's loss is a mean over its pairs, weighted by its share of the
    step. ``ctx``: every rank forwards its contiguous share of each micro-batch's pairs. Logged:
    ``loss`` (the preference loss), ``reward_margin``, ``reward_accuracy``, the mean chosen and
    rejected rewards, ``router_loss``, OTPO's ``weight_min`` / ``weight_max`` and, with
    ``sft_weight``, ``sft_nll``."""

    def __init__(self, batch: PairBatch, ref, *, method: str, micro_batch: int, per_step: int, seed: int = 0,
                 beta: float = 0.1, eps: float = 1.0, tau: float = 0.2, router_losses: bool = True,
                 sft_weight: float = 0.0, ctx=None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.batch, self.ref, self.method, self.ctx = batch, ref, method, ctx
        self.micro_batch, self.per_step, self.seed = micro_batch, per_step, seed
        self.kw = {"beta": beta, "eps": eps, "tau": tau, "router_losses": router_losses, "sft_weight": sft_weight}

    def micro_batches(self, step: int) -> list:
        """The step's pair indices (``step_indices``), as ``micro_batch``-sized index tensors."""
        idx = step_indices(len(self.batch), step, self.per_step, self.seed)
        return [torch.tensor(idx[i:i + self.micro_batch]) for i in range(0, len(idx), self.micro_batch)]

    def begin_step(self, model, micro: list, step: int) -> None:
        """The step's pair count (each micro-batch's weight is its share of it)."""
        self.n_pairs = sum(len(s) for s in micro)

    def loss(self, model, sub):
        """This rank's share of the pairs ``sub``: the weighted loss and the ranks' summed metrics."""
        mine, dist_kw = sub, {}
        if self.ctx is not None:                 # this rank's contiguous share of the micro-batch
            k = len(sub) // self.ctx.world
            mine = sub[self.ctx.rank * k:(self.ctx.rank + 1) * k]
            dist_kw = {"share": k / len(sub), "router_share": parallel.router_share(self.ctx),
                       "nll_tokens": float(self.batch.chosen_mask[sub].sum())}
        ref_c, ref_r = self.ref
        loss, m = preference_step_loss(model, self.batch.select(mine), (ref_c[mine], ref_r[mine]), self.method,
                                       **self.kw, **dist_kw)
        w = len(sub) / self.n_pairs
        return loss * w, {k: w * v for k, v in parallel.reduce_metrics(m, self.ctx).items()}

    def end_step(self, sums: dict) -> dict:
        """The step's metrics (already summed over micro-batches and ranks)."""
        return dict(sums)
