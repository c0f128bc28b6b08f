"""Expert-aware FP8 (W8A8) inference for the MoE experts: conversion, calibration, save/load.

``quantize_model(model, calibration_batches, ...)`` replaces every ``MoE`` of a
``CompassForCausalLM`` by an ``Fp8MoE``: the expert weights become FP8 codes plus fp32 scales and
the experts run through ``compass_kernels.grouped_gemm_fp8``; router, shared expert, attention,
embeddings, norms and head stay in the model's precision (bf16/fp32). Definitions:
../shared/REFERENCE.md (FP8).

Two methods:
  expert_aware  weights: per expert, per output channel ("row") or 128 x 128 ("block2d") scales;
                activations: dynamic per token ("dynamic_row"), dynamic 1 x 128 ("dynamic_block") or
                static per-expert scales from calibration ("static"); optional SmoothQuant per expert
                input (``smooth_alpha``).
  naive         the baseline: one per-tensor scale per weight tensor (all experts of a layer share
                it) and one static activation scale per layer and GEMM input, no smoothing.

Weight layout. The model keeps the experts as ``w13_EDF [E, D, 2F]`` and ``w2_EFD [E, F, D]``
(``[E, K, N]``); ``grouped_gemm_fp8`` takes ``[E, N, K]`` (nn.Linear), so the codes are stored
transposed: ``w13_q [E, 2F, D]``, ``w2_q [E, D, F]``.

SmoothQuant, kept simple: for expert e and GEMM input X_e (the routed token rows for fc1, the
SwiGLU output for fc2) ``s_e = smooth_scales(amax|X_e|, amax|W_e|, alpha)`` per input channel;
the weight's input columns are multiplied by ``s_e`` before quantization and the activation rows
of expert e are divided by ``s_e`` right before their (dynamic or static) quantization. The
product is unchanged; the division is one elementwise op on the permuted rows (it is not folded
into the preceding RMSNorm because every expert has its own s and the norm is shared).

Calibration (``calibrate``) runs the full-precision model over the calibration batches with
forward pre-hooks on the MoE layers and records, per layer and expert, the routed token count and
the per-channel amax of both GEMM inputs. Experts below ``min_tokens_per_expert`` are covered by
oversampling: calibration sequences (from ``calibration_batches`` or an extra ``oversample_pool``)
are ranked by how many tokens they send to the still-deficient experts and the best ones are run
again (MoEQuant's expert-balanced sampling, arXiv 2505.03804), until every expert reaches the
minimum or nothing helps. Experts still short afterwards (with ``route_all_for_stats``) get their
statistics from every calibration token routed through them, for statistics only. The coverage
report holds the per-expert counts before and after.

Note: repeating a sequence does not change an amax, so oversampling only adds information when the
pool holds sequences that were not in the first pass (pass ``oversample_pool``); the statistics an
expert with dynamic activations needs are only SmoothQuant's per-channel amax.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import compass_kernels as ck
from compass_kernels.fp8 import Fp8Tensor
from compass_kernels.fp8_ref import FP8_MAX
from compass_model.config import CompassConfig
from compass_model.model import CompassForCausalLM
from compass_model.moe import (
    MoE,
    load_balancing_loss,
    nvtx_range,
    router_stats,
    router_z_loss,
)

__all__ = [
    "Fp8MoE",
    "QuantConfig",
    "calibrate",
    "expert_sqnr",
    "load_quantized",
    "logit_error",
    "quantize_model",
    "save_quantized",
]

METHODS = ("expert_aware", "naive")
ACTIVATIONS = ("dynamic_row", "dynamic_block", "static")
WEIGHT_GRANULARITIES = ("row", "block2d")
QUANT_CONFIG_NAME = "quant_config.json"
_FMAX = FP8_MAX[torch.float8_e4m3fn]


@dataclass(frozen=True)
class QuantConfig:
    method: str = "expert_aware"
    activation: str = "dynamic_row"
    weight_granularity: str = "row"
    smooth: bool = True
    block_size: int = 128

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.weight_granularity not in WEIGHT_GRANULARITIES:
            raise ValueError(f"weight_granularity must be one of {WEIGHT_GRANULARITIES}, got "
                             f"{self.weight_granularity!r}")
        if self.method == "naive" and (self.activation != "static" or self.smooth
                                       or self.weight_granularity != "row"):
            raise ValueError("method='naive' means per-tensor weight scales, a static per-layer activation "
                             "scale and no smoothing")


def _quantize_static(x_MK: torch.Tensor, scale_M: torch.Tensor) -> Fp8Tensor:
    """x [M, K] with a given per-row scale [M] -> "row" Fp8Tensor (saturating, like quantize_fp8)."""
    scale_M = scale_M.float().clamp(min=1e-12)
    data = (x_MK.float() / scale_M[:, None]).clamp(-_FMAX, _FMAX).to(torch.float8_e4m3fn)
    return Fp8Tensor(data, scale_M.contiguous(), "row")


def _row_experts(offsets: torch.Tensor, M: int) -> torch.Tensor:
    """The expert of each of the M permuted rows (rows past offsets[-1] get the last expert)."""
    E = offsets.numel() - 1
    rows = torch.arange(M, device=offsets.device)
    return torch.searchsorted(offsets[1:], rows, right=True).clamp(max=E - 1)


class Fp8MoE(MoE):
    """An ``MoE`` whose routed experts are FP8 codes + scales run by ``grouped_gemm_fp8``.

    Buffers (all in the state dict, so safetensors holds codes and scales):
      w13_q [E, 2F, D] fp8, w13_scale [E, 2F] ("row") or [E, ceil(2F/bs), ceil(D/bs)] ("block2d")
      w2_q  [E, D, F]  fp8, w2_scale  [E, D] or [E, ceil(D/bs), ceil(F/bs)]
      smooth13 [E, D], smooth2 [E, F]  SmoothQuant divisors of the activations (ones: none)
      act13_scale [E], act2_scale [E]  static activation scales (naive: one value repeated)
    """

    def __init__(self, config: CompassConfig, qconfig: QuantConfig):
        super().__init__(config)
        E, D, Fd = config.num_experts, config.d_model, config.expert_ffn_dim
        del self.w13_EDF, self.w2_EFD
        if self.shared is not None:          # like CompassForCausalLM: everything but the router in the model dtype
            self.shared.to(config.torch_dtype)
        self.qconfig = qconfig
        bs = qconfig.block_size

        def wscale(N, K):
            if qconfig.weight_granularity == "row":
                return torch.ones(E, N)
            return torch.ones(E, -(-N // bs), -(-K // bs))

        fp8 = torch.float8_e4m3fn
        self.register_buffer("w13_q", torch.zeros(E, 2 * Fd, D, dtype=fp8))
        self.register_buffer("w13_scale", wscale(2 * Fd, D))
        self.register_buffer("w2_q", torch.zeros(E, D, Fd, dtype=fp8))
        self.register_buffer("w2_scale", wscale(D, Fd))
        self.register_buffer("smooth13", torch.ones(E, D))
        self.register_buffer("smooth2", torch.ones(E, Fd))
        self.register_buffer("act13_scale", torch.ones(E))
        self.register_buffer("act2_scale", torch.ones(E))

    # -- conversion --------------------------------------------------------------------------

    @torch.no_grad()
    def load_from(self, moe: MoE, stats: dict | None, smooth_alpha: float | None) -> None:
        """Quantize ``moe``'s experts into this module (router and shared expert copied exactly).
        ``stats``: this layer's calibration statistics (``calibrate``), needed for smoothing and
        static activation scales."""
        self.router.load_state_dict(moe.router.state_dict())
        if self.shared is not None:
            self.shared.load_state_dict(moe.shared.state_dict())
        q = self.qconfig
        w13 = moe.w13_EDF.detach().float().transpose(1, 2)          # [E, 2F, D]
        w2 = moe.w2_EFD.detach().float().transpose(1, 2)            # [E, D, F]
        if q.smooth and smooth_alpha is not None:
            if stats is None:
                raise ValueError("smoothing needs calibration statistics")
            s13 = torch.stack([ck.smooth_scales(a, w.abs().amax(0), smooth_alpha)
                               for a, w in zip(stats["amax13"], w13)])
            s2 = torch.stack([ck.smooth_scales(a, w.abs().amax(0), smooth_alpha)
                              for a, w in zip(stats["amax2"], w2)])
            w13, w2 = w13 * s13[:, None, :], w2 * s2[:, None, :]
            self.smooth13.copy_(s13)
            self.smooth2.copy_(s2)
        for name, w in (("w13", w13), ("w2", w2)):
            if q.method == "naive":
                s = w.abs().amax().clamp(min=1e-12) / _FMAX
                data = (w / s).clamp(-_FMAX, _FMAX).to(torch.float8_e4m3fn)
                scale = s.expand(w.shape[:2]).contiguous()
            else:
                qt = ck.quantize_fp8(w.contiguous(), granularity=q.weight_granularity, block_size=q.block_size)
                data, scale = qt.data, qt.scale
            getattr(self, f"{name}_q").copy_(data)
            getattr(self, f"{name}_scale").copy_(scale)
        if q.activation == "static":
            if stats is None:
                raise ValueError("static activation scales need calibration statistics")
            for name, amax_EK, smooth in (("act13", stats["amax13"], self.smooth13),
                                          ("act2", stats["amax2"], self.smooth2)):
                amax_E = (amax_EK / smooth).amax(1)
                if q.method == "naive":
                    amax_E = amax_E.amax().expand_as(amax_E)
                else:   # an expert that saw no token at all falls back on the layer's maximum
                    amax_E = torch.where(amax_E > 0, amax_E, amax_E.amax())
                getattr(self, f"{name}_scale").copy_(amax_E.clamp(min=1e-12) / _FMAX)

    # -- forward -----------------------------------------------------------------------------

    def _quantize_act(self, x_MK: torch.Tensor, offsets: torch.Tensor, smooth_EK: torch.Tensor,
                      static_E: torch.Tensor) -> Fp8Tensor:
        q = self.qconfig
        rows = _row_experts(offsets, x_MK.shape[0])
        x = x_MK.float()
        if q.smooth:
            x = x / smooth_EK[rows]
        if q.activation == "static":
            return _quantize_static(x, static_E[rows])
        gran = "row" if q.activation == "dynamic_row" else "block"
        return ck.quantize_fp8(x, granularity=gran, block_size=q.block_size)

    def _w(self, name: str) -> Fp8Tensor:
        return Fp8Tensor(getattr(self, f"{name}_q"), getattr(self, f"{name}_scale"),
                         self.qconfig.weight_granularity, self.qconfig.block_size)

    def forward(self, x: torch.Tensor):
        E = self.num_experts
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        x_TD = x.reshape(-1, x.shape[-1])
        with nvtx_range("router"):
            logits_TE, scores_TE, ids_TK, gates_TK = self.router(x_TD)
            counts_E = torch.zeros(E, device=x.device).scatter_add_(
                0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), device=x.device))
        with nvtx_range("permute"):
            plan = ck.route(ids_TK, E)
            xp_RD = ck.permute(x_TD, plan)
        xe_MD, offsets, state = self._dispatch(xp_RD, plan)
        with nvtx_range("expert_fc1"):
            qx = self._quantize_act(xe_MD, offsets, self.smooth13, self.act13_scale)
            h_MF2 = ck.grouped_gemm_fp8(qx, self._w("w13"), offsets, out_dtype=torch.float32)
        with nvtx_range("activation"):
            gate_MF, up_MF = h_MF2.chunk(2, dim=-1)
            a_MF = F.silu(gate_MF) * up_MF
        with nvtx_range("expert_fc2"):
            qa = self._quantize_act(a_MF, offsets, self.smooth2, self.act2_scale)
            y_MD = ck.grouped_gemm_fp8(qa, self._w("w2"), offsets, out_dtype=out_dtype)
        y_RD = self._combine(y_MD, state)
        with nvtx_range("unpermute"):
            out_TD = ck.unpermute(y_RD, plan, probs=gates_TK.to(y_RD.dtype))
        if self.shared is not None:
            out_TD = out_TD + self.shared(x_TD)
        router = {
            "aux": load_balancing_loss(scores_TE, counts_E),
            "z": router_z_loss(logits_TE),
            "stats": router_stats(counts_E, plan.tokens_per_expert),
        }
        return out_TD.reshape(x.shape).to(x.dtype), router


# ---------------------------------------------------------------------------------------------
# calibration


class _Recorder:
    """Forward pre-hooks on every MoE: per-expert counts and GEMM-input amax, per-sequence counts."""

    def __init__(self, model: CompassForCausalLM):
        self.moes = model.moe_layers()
        c = model.config
        E, D, Fd = c.num_experts, c.d_model, c.expert_ffn_dim
        L = len(self.moes)
        self.counts = torch.zeros(L, E, dtype=torch.long)
        self.amax13 = torch.zeros(L, E, D)
        self.amax2 = torch.zeros(L, E, Fd)
        self.record_stats = True
        self.seq_counts: list[torch.Tensor] = []      # per forward: [B, L, E] (trunk and MTP layers)
        self._batch_counts = None
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(self.moes)]

    def close(self):
        for h in self._handles:
            h.remove()

    def _hook(self, layer: int):
        def hook(moe, args):
            x = args[0]
            B = x.shape[0] if x.dim() == 3 else 1
            x_TD = x.detach().reshape(-1, x.shape[-1]).float()
            _, _, ids_TK, _ = moe.router(x_TD)
            E = moe.num_experts
            per_seq = F.one_hot(ids_TK.reshape(B, -1), E).sum(1).cpu()          # [B, E]
            if self._batch_counts is not None:
                self._batch_counts[:, layer] += per_seq
            self.counts[layer] += per_seq.sum(0)
            if not self.record_stats:
                return
            self._expert_stats(moe, layer, x_TD, ids_TK, range(E))
        return hook

    @torch.no_grad()
    def _expert_stats(self, moe, layer, x_TD, ids_TK, experts, all_tokens: bool = False):
        w13 = moe.w13_EDF.float()
        for e in experts:
            rows = slice(None) if all_tokens else (ids_TK == e).any(-1)
            x_e = x_TD[rows]
            if x_e.shape[0] == 0:
                continue
            gate, up = (x_e @ w13[e]).chunk(2, dim=-1)
            a_e = F.silu(gate) * up
            self.amax13[layer, e] = torch.maximum(self.amax13[layer, e], x_e.abs().amax(0).cpu())
            self.amax2[layer, e] = torch.maximum(self.amax2[layer, e], a_e.abs().amax(0).cpu())

    @torch.no_grad()
    def run(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """One calibration forward (labels given, so the MTP layers see tokens too) -> [B, L, E]."""
        B = input_ids.shape[0]
        self._batch_counts = torch.zeros(B, len(self.moes), self.counts.shape[1], dtype=torch.long)
        model(input_ids, labels=input_ids if model.config.mtp_depth else None)
        out, self._batch_counts = self._batch_counts, None
        return out


def _as_batches(batches) -> list[torch.Tensor]:
    if batches is None:
        return []
    if isinstance(batches, torch.Tensor):
        batches = [batches]
    out = []
    for b in batches:
        b = torch.as_tensor(b)
        out.append(b[None] if b.dim() == 1 else b)
    return out


@torch.no_grad()
def calibrate(model: CompassForCausalLM, calibration_batches, *, min_tokens_per_expert: int = 0,
              oversample_pool=None, max_oversample: int | None = None,
              route_all_for_stats: bool = True) -> tuple[list[dict], dict]:
    """Run the full-precision model over the calibration batches (list of ``[B, S]`` token ids)
    and return (per-MoE-layer stats ``{"amax13": [E, D], "amax2": [E, F], "count": [E]}``,
    coverage report). See the module docstring for oversampling and ``route_all_for_stats``.

    Coverage report: ``before`` / ``after`` per-expert routed token counts ``[L, E]`` (lists),
    ``min_tokens_per_expert``, ``covered_before`` / ``covered_after`` (fraction of (layer, expert)
    pairs at the minimum), ``oversampled_sequences``, ``forced`` (``[layer, expert]`` pairs whose
    statistics came from all calibration tokens)."""
    was_training = model.training
    model.eval()
    base = _as_batches(calibration_batches)
    if not base:
        raise ValueError("calibration_batches is empty")
    rec = _Recorder(model)
    try:
        base_seq = [rec.run(model, b) for b in base]
        before = rec.counts.clone()
        # candidate sequences for oversampling and their per-sequence counts
        pool = _as_batches(oversample_pool)
        if pool:
            rec.record_stats = False
            saved = rec.counts.clone()
            pool_seq = [rec.run(model, b) for b in pool]
            rec.counts.copy_(saved)
            rec.record_stats = True
        else:
            pool, pool_seq = base, base_seq
        cand_ids = [row for b in pool for row in b]
        cand_counts = torch.cat(pool_seq).flatten(1).float() if cand_ids else torch.zeros(0)   # [N, L*E]
        counts = rec.counts.flatten().float().clone()
        chosen: list[int] = []
        limit = max_oversample if max_oversample is not None else 4 * max(len(cand_ids), 1)
        while min_tokens_per_expert > 0 and len(chosen) < limit and len(cand_ids):
            deficit = (min_tokens_per_expert - counts).clamp(min=0)
            if not (deficit > 0).any():
                break
            gain = torch.minimum(cand_counts, deficit).sum(1)
            best = int(gain.argmax())
            if gain[best] <= 0:
                break
            chosen.append(best)
            counts += cand_counts[best]
        if chosen:
            seqs = torch.stack([cand_ids[i] for i in chosen])
            for i in range(0, len(seqs), 8):
                rec.run(model, seqs[i:i + 8])
        after = rec.counts.clone()
        forced = []
        if route_all_for_stats and min_tokens_per_expert > 0:
            short = (after < min_tokens_per_expert).nonzero().tolist()
            if short:
                forced = short
                by_layer: dict[int, list[int]] = {}
                for layer, e in short:
                    by_layer.setdefault(layer, []).append(e)
                rec.close()
                hooks = []
                for layer, experts in by_layer.items():
                    def hook(moe, args, layer=layer, experts=experts):
                        x_TD = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                        rec._expert_stats(moe, layer, x_TD, None, experts, all_tokens=True)
                    hooks.append(rec.moes[layer].register_forward_pre_hook(hook))
                try:
                    for b in base:
                        model(b, labels=b if model.config.mtp_depth else None)
                finally:
                    for h in hooks:
                        h.remove()
    finally:
        rec.close()
        model.train(was_training)
    m = max(min_tokens_per_expert, 1)
    report = {
        "min_tokens_per_expert": min_tokens_per_expert,
        "before": before.tolist(),
        "after": after.tolist(),
        "covered_before": float((before >= m).float().mean()),
        "covered_after": float((after >= m).float().mean()),
        "min_before": int(before.min()),
        "min_after": int(after.min()),
        "oversampled_sequences": len(chosen),
        "forced": forced,
    }
    stats = [{"amax13": rec.amax13[i], "amax2": rec.amax2[i], "count": after[i]} for i in range(len(rec.moes))]
    return stats, report


# ---------------------------------------------------------------------------------------------
# conversion, save / load


def _replace_moes(model: CompassForCausalLM, qconfig: QuantConfig, make) -> None:
    index = {id(m): i for i, m in enumerate(model.moe_layers())}
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, MoE) and not isinstance(child, Fp8MoE):
                if type(child) is not MoE:
                    raise NotImplementedError(f"quantize_model converts plain MoE layers, got {type(child).__name__} "
                                              f"(quantize before sharding experts)")
                new = Fp8MoE(model.config, qconfig)
                make(new, child, index[id(child)])
                device = next(child.parameters()).device
                setattr(module, name, new.to(device))


@torch.no_grad()
def quantize_model(model: CompassForCausalLM, calibration_batches=None, *, method: str = "expert_aware",
                   activation: str | None = None, weight_granularity: str = "row",
                   smooth_alpha: float | None = 0.5, min_tokens_per_expert: int = 0,
                   oversample_pool=None, route_all_for_stats: bool = True,
                   block_size: int = 128) -> CompassForCausalLM:
    """Quantize the routed experts of every MoE layer to FP8 in place and return the model.

    ``method="expert_aware"`` (default activation "dynamic_row"; "dynamic_block"; "static") or
    ``"naive"`` (per-tensor weights, static per-layer activations, no smoothing; ``activation``
    and ``smooth_alpha`` are ignored). ``smooth_alpha=None`` disables SmoothQuant. Calibration
    (needed for smoothing and static scales) runs over ``calibration_batches``; its coverage report
    is left on ``model.quant_report``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "naive":
        qconfig = QuantConfig("naive", "static", "row", smooth=False, block_size=block_size)
    else:
        qconfig = QuantConfig("expert_aware", activation or "dynamic_row", weight_granularity,
                              smooth=smooth_alpha is not None, block_size=block_size)
    need_stats = qconfig.smooth or qconfig.activation == "static"
    stats, report = None, None
    if need_stats or calibration_batches is not None:
        if calibration_batches is None:
            raise ValueError(f"{method} with activation {qconfig.activation!r} needs calibration_batches")
        stats, report = calibrate(model, calibration_batches, min_tokens_per_expert=min_tokens_per_expert,
                                  oversample_pool=oversample_pool, route_all_for_stats=route_all_for_stats)

    def make(new, old, i):
        new.load_from(old, None if stats is None else stats[i], smooth_alpha)

    _replace_moes(model, qconfig, make)
    model.quant_config = qconfig
    model.quant_report = report
    return model


def save_quantized(model: CompassForCausalLM, directory) -> None:
    """``model.safetensors`` (FP8 codes and fp32 scales included), ``config.json`` and
    ``quant_config.json``."""
    from compass_model.checkpoint import save_pretrained

    if not hasattr(model, "quant_config"):
        raise ValueError("model is not quantized (quantize_model first)")
    save_pretrained(model, directory)
    (Path(directory) / QUANT_CONFIG_NAME).write_text(json.dumps(asdict(model.quant_config), indent=2))


def load_quantized(directory, device=None) -> CompassForCausalLM:
    """Rebuild a ``save_quantized`` model exactly (strict state-dict load)."""
    from safetensors.torch import load_file

    from compass_model.checkpoint import WEIGHTS_NAME, load_config

    path = Path(directory)
    qconfig = QuantConfig(**json.loads((path / QUANT_CONFIG_NAME).read_text()))
    model = CompassForCausalLM(load_config(path))
    _replace_moes(model, qconfig, lambda new, old, i: None)
    state = load_file(path / WEIGHTS_NAME)
    model.load_state_dict(state, strict=True)
    model.quant_config = qconfig
    model.eval()
    return model if device is None else model.to(device)


@torch.no_grad()
def logit_error(ref_logits: torch.Tensor, logits: torch.Tensor) -> dict[str, float]:
    """Relative L2 error ``||l - l_ref|| / ||l_ref||`` and top-1 agreement of two logit tensors."""
    ref, got = ref_logits.float(), logits.float()
    return {
        "rel_err": float((got - ref).norm() / ref.norm().clamp(min=1e-30)),
        "top1": float((got.argmax(-1) == ref.argmax(-1)).float().mean()),
    }


def _sqnr_db(ref: torch.Tensor, got: torch.Tensor) -> float:
    """``10 log10(||ref||^2 / ||ref - got||^2)`` in dB (inf when exact, nan for an empty ref)."""
    if ref.numel() == 0:
        return float("nan")
    noise = (ref.double() - got.double()).square().sum()
    return float(10 * torch.log10(ref.double().square().sum() / noise)) if noise > 0 else float("inf")


@torch.no_grad()
def expert_sqnr(model_fp: CompassForCausalLM, model_q: CompassForCausalLM, input_ids: torch.Tensor) -> list[dict]:
    """Per layer and expert, the SQNR (dB) of the quantized weights (``w13``, ``w2``, smoothing
    undone) and of the quantized GEMM inputs (``x13``: the routed tokens, ``x2``: the SwiGLU
    output from the full-precision weights) on ``input_ids``, as the FP8 module quantizes them.
    -> one dict per MoE layer: ``{"w13": [E], "w2": [E], "x13": [E], "x2": [E], "tokens": [E]}``
    (lists of floats; nan for an expert that got no token)."""
    fps, qs = model_fp.moe_layers(), model_q.moe_layers()
    if len(fps) != len(qs) or not all(isinstance(m, Fp8MoE) for m in qs):
        raise ValueError("model_q must be the FP8 version of model_fp")
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, m in enumerate(qs)]
    try:
        model_q(input_ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, (fp, q) in enumerate(zip(fps, qs)):
        E = q.num_experts
        w13 = fp.w13_EDF.float().transpose(1, 2)
        w2 = fp.w2_EFD.float().transpose(1, 2)
        d13 = ck.dequantize_fp8(q._w("w13")) / q.smooth13[:, None, :]
        d2 = ck.dequantize_fp8(q._w("w2")) / q.smooth2[:, None, :]
        row = {"w13": [_sqnr_db(w13[e], d13[e]) for e in range(E)],
               "w2": [_sqnr_db(w2[e], d2[e]) for e in range(E)], "x13": [], "x2": [], "tokens": []}
        if i not in inputs:
            row.update(x13=[float("nan")] * E, x2=[float("nan")] * E, tokens=[0] * E)
            out.append(row)
            continue
        x_TD = inputs[i].reshape(-1, inputs[i].shape[-1]).float()
        _, _, ids_TK, _ = q.router(x_TD)
        for e in range(E):
            x_e = x_TD[(ids_TK == e).any(-1)]
            gate, up = (x_e @ w13[e].T).chunk(2, dim=-1)
            a_e = F.silu(gate) * up
            offsets = torch.tensor([0] * (e + 1) + [x_e.shape[0]] * (E - e), dtype=torch.int64)
            for name, act, smooth, static in (("x13", x_e, q.smooth13, q.act13_scale),
                                              ("x2", a_e, q.smooth2, q.act2_scale)):
                if act.shape[0] == 0:
                    row[name].append(float("nan"))
                    continue
                deq = ck.dequantize_fp8(q._quantize_act(act, offsets, smooth, static))
                row[name].append(_sqnr_db(act, deq * smooth[e] if q.qconfig.smooth else deq))
            row["tokens"].append(int(x_e.shape[0]))
        out.append(row)
    return out


@torch.no_grad()
def time_moe_layers(moe_fp: MoE, moe_q: Fp8MoE, num_tokens: int = 4096, iters: int = 10,
                    warmup: int = 2) -> dict[str, float]:
    """Median wall time (ms) of one MoE layer forward on ``num_tokens`` random tokens, full
    precision vs FP8, on the layers' device (CUDA-synchronised there). -> ``{"fp_ms", "fp8_ms",
    "speedup"}``. On CPU expect little or no speed-up (the CPU FP8 GEMM dequantizes to fp32)."""
    import time

    p = moe_fp.w13_EDF
    x = torch.randn(num_tokens, moe_fp.w13_EDF.shape[1],
                    device=p.device, dtype=moe_fp.w13_EDF.dtype)
    sync = torch.cuda.synchronize if p.device.type == "cuda" else (lambda: None)

    def run(m):
        for _ in range(warmup):
            m(x)
        times = []
        for _ in range(iters):
            sync()
            t = time.perf_counter()
            m(x)
            sync()
            times.append(time.perf_counter() - t)
        return 1e3 * sorted(times)[len(times) // 2]

    fp_ms, q_ms = run(moe_fp), run(moe_q)
    return {"fp_ms": fp_ms, "fp8_ms": q_ms, "speedup": fp_ms / q_ms}
