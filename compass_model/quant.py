"""Expert-aware FP8 (W8A8) inference for the MoE experts: conversion, calibration, save/load.

``quantize_model(model, calibration_batches, ...)`` replaces every ``MoE`` of a
``CompassForCausalLM`` by an ``Fp8MoE``: the expert weights become FP8 codes plus fp32 scales and
the experts run through ``compass_kernels.grouped_gemm_fp8``; router, shared expert, attention,
embeddings, norms and head stay in the model's precision (bf16/fp32). Definitions:
docs/algorithms.md (FP8).

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

``smooth_alpha``: a float (one alpha for every expert and GEMM), None (no smoothing: s = 1) or
"auto" (the default), a per-expert alpha search like SmoothQuant's / AWQ's: calibration keeps the
first ``smooth_sample_rows`` routed input rows of every expert and layer (deterministic; CPU,
fp32, so L * E * rows * D floats) and ``search_smooth_alphas`` picks, for each expert and each GEMM
input (fc1: those rows; fc2: their SwiGLU output through the full-precision fc1), the alpha of
``AUTO_ALPHAS`` (None = no smoothing, 0.25, 0.5, 0.75) that minimises the relative error
``||Q(X/s) Q(W s)^T - X W^T|| / ||X W^T||`` of that expert's GEMM output on its rows, with weights
and activations quantized exactly as ``Fp8MoE`` does (same granularity, activation mode, static
scales, ``grouped_gemm_fp8``). Ties go to the earlier grid entry (no smoothing first); an expert
without sampled rows is not smoothed. Why: when the activations have no outlier channels a fixed
alpha only moves magnitude into the weights, where it costs precision, and can be worse than no
smoothing; with outliers it is what keeps the other channels. The chosen alphas are left in
``model.quant_report["smooth_alphas"]`` (per layer ``{"fc1": [E], "fc2": [E]}``, None = not
smoothed) with the search's errors (``"smooth_search"``: per layer and GEMM, ``[E][grid]``). The
resulting scales live in the ``smooth13`` / ``smooth2`` buffers, so save / load needs nothing else.

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
expert with dynamic activations needs are only SmoothQuant's per-channel amax (and, for
``smooth_alpha="auto"``, its sampled rows, which oversampled sequences do add to).
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
from compass_kernels.moe_blocks import grouped_mlp, row_experts
from compass_model.checkpoint_files import (
    QUANT_CONFIG_NAME,
    load_config,
    load_weights,
    save_pretrained,
)
from compass_model.config import CompassConfig
from compass_model.model import CompassForCausalLM
from compass_model.moe import MoE

__all__ = [
    "Fp8MoE",
    "QuantConfig",
    "calibrate",
    "load_quantized",
    "quantize_model",
    "save_quantized",
    "search_smooth_alphas",
]

METHODS = ("expert_aware", "naive")
ACTIVATIONS = ("dynamic_row", "dynamic_block", "static")
WEIGHT_GRANULARITIES = ("row", "block2d")
_FMAX = FP8_MAX[torch.float8_e4m3fn]
SMOOTH_MIN_GAIN = 0.05     # auto smoothing must cut an expert's calibration error by > 5%
AUTO_ALPHAS = (None, 0.25, 0.5, 0.75)      # smooth_alpha="auto": the grid searched per expert and GEMM


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


def _smooth_EK(amax_EK: torch.Tensor, w_ENK: torch.Tensor, alphas: list) -> torch.Tensor:
    """Per-expert SmoothQuant scales ``[E, K]`` for per-expert alphas (None: ones, no smoothing)."""
    return torch.stack([torch.ones(a.shape, device=w.device) if al is None
                        else ck.smooth_scales(a.to(w.device), w.abs().amax(0), al)
                        for a, w, al in zip(amax_EK, w_ENK, alphas)])


def _quantize_weight(w_ENK: torch.Tensor, q: QuantConfig) -> Fp8Tensor:
    """Expert weights ``[E, N, K]`` (smoothing applied) -> FP8 as ``Fp8MoE`` stores them."""
    if q.method == "naive":
        s = w_ENK.abs().amax().clamp(min=1e-12) / _FMAX
        data = (w_ENK / s).clamp(-_FMAX, _FMAX).to(torch.float8_e4m3fn)
        return Fp8Tensor(data, s.expand(w_ENK.shape[:2]).contiguous(), "row")
    return ck.quantize_fp8(w_ENK.contiguous(), granularity=q.weight_granularity, block_size=q.block_size)


def _static_scales(amax_EK: torch.Tensor, smooth_EK: torch.Tensor, q: QuantConfig) -> torch.Tensor:
    """Static per-expert activation scales ``[E]`` from the calibration amax of the smoothed input."""
    amax_E = (amax_EK.to(smooth_EK.device) / smooth_EK).amax(1)
    if q.method == "naive":
        amax_E = amax_E.amax().expand_as(amax_E)
    else:   # an expert that saw no token at all falls back on the layer's maximum
        amax_E = torch.where(amax_E > 0, amax_E, amax_E.amax())
    return amax_E.clamp(min=1e-12) / _FMAX


def _quantize_rows(x_MK: torch.Tensor, rows_M: torch.Tensor, smooth_EK: torch.Tensor, static_E: torch.Tensor,
                   q: QuantConfig) -> Fp8Tensor:
    """Activation rows (row i belongs to expert ``rows_M[i]``) -> FP8, smoothing divided out first."""
    x = x_MK.float()
    if q.smooth:
        x = x / smooth_EK[rows_M]
    if q.activation == "static":
        return _quantize_static(x, static_E[rows_M])
    gran = "row" if q.activation == "dynamic_row" else "block"
    return ck.quantize_fp8(x, granularity=gran, block_size=q.block_size)


@torch.no_grad()
def _gemm_alpha_errors(x_list: list, w_ENK: torch.Tensor, amax_EK: torch.Tensor, q: QuantConfig,
                       grid) -> torch.Tensor:
    """``[E, len(grid)]`` relative error of each expert's FP8 GEMM output on its rows ``x_list[e]``
    (``[n_e, K]``) for every alpha of ``grid`` (nan for an expert without rows)."""
    E = w_ENK.shape[0]
    sizes = [x.shape[0] for x in x_list]
    errs = torch.full((E, len(grid)), float("nan"), dtype=torch.float64)
    if sum(sizes) == 0:
        return errs
    dev = w_ENK.device
    offsets = torch.tensor([0] + sizes, dtype=torch.int64).cumsum(0).to(dev)
    x_MK = torch.cat([x.to(dev).float() for x in x_list])
    rows = row_experts(offsets, x_MK.shape[0])
    ref = torch.cat([x.to(dev).float() @ w.T for x, w in zip(x_list, w_ENK)]).double()

    def per_expert(sq_M):           # sum of squares per expert
        return torch.zeros(E, dtype=torch.float64, device=dev).index_add_(0, rows, sq_M.sum(1))

    ref_E = per_expert(ref.square())
    for g, alpha in enumerate(grid):
        s_EK = _smooth_EK(amax_EK, w_ENK, [alpha] * E)
        static = _static_scales(amax_EK, s_EK, q) if q.activation == "static" else None
        y = ck.grouped_gemm_fp8(_quantize_rows(x_MK, rows, s_EK, static, q),
                                _quantize_weight(w_ENK * s_EK[:, None, :], q), offsets, out_dtype=torch.float32)
        errs[:, g] = (per_expert((y.double() - ref).square()) / ref_E.clamp(min=1e-300)).sqrt().cpu()
    errs[torch.tensor(sizes) == 0] = float("nan")
    return errs


@torch.no_grad()
def search_smooth_alphas(moe: MoE, stats: dict, qconfig: QuantConfig, grid=AUTO_ALPHAS,
                         min_gain: float = SMOOTH_MIN_GAIN) -> dict:
    """``smooth_alpha="auto"``: per expert and GEMM input, the alpha of ``grid`` with the smallest
    FP8 output error on the expert's sampled calibration rows (``stats["samples13"]``; fc2: their
    SwiGLU output through the full-precision fc1), kept only if it beats no smoothing by more than
    ``min_gain`` (relative): at FP8's mantissa floor the alphas differ by a few percent and picking
    the minimum fits the calibration sample's noise. -> ``{"fc1": [E], "fc2": [E], "errors":
    {"fc1": [E][G], "fc2": [E][G]}}``; an expert without rows gets None (no smoothing)."""
    q = QuantConfig(qconfig.method, qconfig.activation, qconfig.weight_granularity, True, qconfig.block_size)
    w13 = moe.w13_EDF.detach().float().transpose(1, 2)          # [E, 2F, D]
    w2 = moe.w2_EFD.detach().float().transpose(1, 2)            # [E, D, F]
    x13 = stats["samples13"]
    x2 = []
    for x, w in zip(x13, w13):
        gate, up = (x.to(w.device).float() @ w.T).chunk(2, dim=-1)
        x2.append(F.silu(gate) * up)
    out = {"errors": {}}
    for name, xs, w, amax in (("fc1", x13, w13, stats["amax13"]), ("fc2", x2, w2, stats["amax2"])):
        errs = _gemm_alpha_errors(xs, w, amax, q, grid)
        base = grid.index(None)
        picks = []
        for e, x in enumerate(xs):
            best = int(errs[e].argmin())
            keep = x.shape[0] > 0 and errs[e, best] < (1 - min_gain) * errs[e, base]
            picks.append(grid[best] if keep else None)
        out[name] = picks
        out["errors"][name] = errs.tolist()
    return out


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
    def load_from(self, moe: MoE, stats: dict | None, smooth_alpha) -> None:
        """Quantize ``moe``'s experts into this module (router and shared expert copied exactly).
        ``stats``: this layer's calibration statistics (``calibrate``), needed for smoothing and
        static activation scales. ``smooth_alpha``: a float or None for every expert, or per-expert
        lists ``{"fc1": [E], "fc2": [E]}`` (entries float or None, from ``search_smooth_alphas``)."""
        self.router.load_state_dict(moe.router.state_dict())
        if self.shared is not None:
            self.shared.load_state_dict(moe.shared.state_dict())
        q = self.qconfig
        w13 = moe.w13_EDF.detach().float().transpose(1, 2)          # [E, 2F, D]
        w2 = moe.w2_EFD.detach().float().transpose(1, 2)            # [E, D, F]
        if q.smooth and smooth_alpha is not None:
            if stats is None:
                raise ValueError("smoothing needs calibration statistics")
            if not isinstance(smooth_alpha, dict):
                smooth_alpha = {"fc1": [smooth_alpha] * self.num_experts, "fc2": [smooth_alpha] * self.num_experts}
            s13 = _smooth_EK(stats["amax13"], w13, smooth_alpha["fc1"])
            s2 = _smooth_EK(stats["amax2"], w2, smooth_alpha["fc2"])
            w13, w2 = w13 * s13[:, None, :], w2 * s2[:, None, :]
            self.smooth13.copy_(s13)
            self.smooth2.copy_(s2)
        for name, w in (("w13", w13), ("w2", w2)):
            qt = _quantize_weight(w, q)
            getattr(self, f"{name}_q").copy_(qt.data)
            getattr(self, f"{name}_scale").copy_(qt.scale)
        if q.activation == "static":
            if stats is None:
                raise ValueError("static activation scales need calibration statistics")
            self.act13_scale.copy_(_static_scales(stats["amax13"], self.smooth13, q))
            self.act2_scale.copy_(_static_scales(stats["amax2"], self.smooth2, q))

    # -- forward -----------------------------------------------------------------------------

    def _quantize_act(self, x_MK: torch.Tensor, offsets: torch.Tensor, smooth_EK: torch.Tensor,
                      static_E: torch.Tensor) -> Fp8Tensor:
        return _quantize_rows(x_MK, row_experts(offsets, x_MK.shape[0]), smooth_EK, static_E, self.qconfig)

    def _w(self, name: str) -> Fp8Tensor:
        return Fp8Tensor(getattr(self, f"{name}_q"), getattr(self, f"{name}_scale"),
                         self.qconfig.weight_granularity, self.qconfig.block_size)

    def experts(self, x_MD: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The grouped-experts stage on FP8 weights: each GEMM input quantized per row (smoothing
        divided out), ``grouped_gemm_fp8`` with fp32 output for fc1 and the activation, the input's
        dtype out of fc2 (fp32 for other dtypes, then cast back)."""
        dtype = x_MD.dtype
        out_dtype = dtype if dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        fc1 = lambda x, w, off: ck.grouped_gemm_fp8(  # noqa: E731
            self._quantize_act(x, off, self.smooth13, self.act13_scale), w, off, out_dtype=torch.float32)
        fc2 = lambda a, w, off: ck.grouped_gemm_fp8(  # noqa: E731
            self._quantize_act(a, off, self.smooth2, self.act2_scale), w, off, out_dtype=out_dtype)
        return grouped_mlp(x_MD, offsets, self._w("w13"), self._w("w2"), gemms=(fc1, fc2)).to(dtype)


# ---------------------------------------------------------------------------------------------
# calibration


class _Recorder:
    """Forward pre-hooks on every MoE: per-expert counts and GEMM-input amax, per-sequence counts,
    and (``sample_rows`` > 0) the first ``sample_rows`` routed input rows of every expert."""

    def __init__(self, model: CompassForCausalLM, sample_rows: int = 0):
        self.moes = model.moe_layers()
        c = model.config
        E, D, Fd = c.num_experts, c.d_model, c.expert_ffn_dim
        L = len(self.moes)
        self.counts = torch.zeros(L, E, dtype=torch.long)
        self.amax13 = torch.zeros(L, E, D)
        self.amax2 = torch.zeros(L, E, Fd)
        self.record_stats = True
        self.sample_rows = sample_rows
        self.samples: list[list[list[torch.Tensor]]] = [[[] for _ in range(E)] for _ in range(L)]
        self.n_samples = torch.zeros(L, E, dtype=torch.long)
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
            take = min(self.sample_rows - int(self.n_samples[layer, e]), x_e.shape[0])
            if take > 0:
                self.samples[layer][e].append(x_e[:take].cpu())
                self.n_samples[layer, e] += take

    def sampled_rows(self, layer: int) -> list[torch.Tensor]:
        """The sampled fc1 input rows of every expert of ``layer``: E tensors ``[n_e, D]`` fp32."""
        D = self.amax13.shape[2]
        return [torch.cat(xs) if xs else torch.zeros(0, D) for xs in self.samples[layer]]

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
              route_all_for_stats: bool = True, sample_rows: int = 0) -> tuple[list[dict], dict]:
    """Run the full-precision model over the calibration batches (list of ``[B, S]`` token ids)
    and return (per-MoE-layer stats ``{"amax13": [E, D], "amax2": [E, F], "count": [E]}``,
    coverage report). See the module docstring for oversampling and ``route_all_for_stats``.
    ``sample_rows`` > 0 also keeps, as ``stats[i]["samples13"]`` (E tensors ``[n_e <= sample_rows,
    D]``), the first routed fc1 input rows of every expert (for ``smooth_alpha="auto"``; an expert
    whose statistics came from all tokens gets its rows from those).

    Coverage report: ``before`` / ``after`` per-expert routed token counts ``[L, E]`` (lists),
    ``min_tokens_per_expert``, ``covered_before`` / ``covered_after`` (fraction of (layer, expert)
    pairs at the minimum), ``oversampled_sequences``, ``forced`` (``[layer, expert]`` pairs whose
    statistics came from all calibration tokens)."""
    was_training = model.training
    model.eval()
    base = _as_batches(calibration_batches)
    if not base:
        raise ValueError("calibration_batches is empty")
    rec = _Recorder(model, sample_rows)
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
    if sample_rows > 0:
        for i, st in enumerate(stats):
            st["samples13"] = rec.sampled_rows(i)
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
                   smooth_alpha: float | str | None = "auto", min_tokens_per_expert: int = 0,
                   oversample_pool=None, route_all_for_stats: bool = True,
                   block_size: int = 128, smooth_sample_rows: int = 256) -> CompassForCausalLM:
    """Quantize the routed experts of every MoE layer to FP8 in place and return the model.

    ``method="expert_aware"`` (default activation "dynamic_row"; "dynamic_block"; "static") or
    ``"naive"`` (per-tensor weights, static per-layer activations, no smoothing; ``activation``
    and ``smooth_alpha`` are ignored). ``smooth_alpha``: "auto" (default: per-expert alpha search on
    up to ``smooth_sample_rows`` calibration rows per expert, see the module docstring), a float in
    [0, 1] for every expert, or None (no SmoothQuant). Calibration (needed for smoothing and static
    scales) runs over ``calibration_batches``; its coverage report (and for expert_aware the alphas,
    ``"smooth_alphas"``) is left on ``model.quant_report``."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if isinstance(smooth_alpha, str) and smooth_alpha != "auto":
        raise ValueError(f"smooth_alpha must be a float in [0, 1], None or 'auto', got {smooth_alpha!r}")
    auto = method == "expert_aware" and smooth_alpha == "auto"
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
                                  oversample_pool=oversample_pool, route_all_for_stats=route_all_for_stats,
                                  sample_rows=smooth_sample_rows if auto else 0)
    L, E = len(model.moe_layers()), model.config.num_experts
    alphas: list = [None] * L
    search: list = [None] * L

    def make(new, old, i):
        if auto:
            found = search_smooth_alphas(old, stats[i], qconfig)
            search[i] = found.pop("errors")
            alphas[i] = found
        elif method == "expert_aware":
            alphas[i] = {"fc1": [smooth_alpha] * E, "fc2": [smooth_alpha] * E}
        new.load_from(old, None if stats is None else stats[i], alphas[i] if auto else smooth_alpha)

    _replace_moes(model, qconfig, make)
    if report is not None and method == "expert_aware":
        report["smooth_alphas"] = alphas
        if auto:
            report["smooth_grid"] = list(AUTO_ALPHAS)
            report["smooth_search"] = search
    model.quant_config = qconfig
    model.quant_report = report
    return model


def save_quantized(model: CompassForCausalLM, directory) -> None:
    """``model.safetensors`` (FP8 codes and fp32 scales included), ``config.json`` and
    ``quant_config.json``."""
    if not hasattr(model, "quant_config"):
        raise ValueError("model is not quantized (quantize_model first)")
    save_pretrained(model, directory)
    (Path(directory) / QUANT_CONFIG_NAME).write_text(json.dumps(asdict(model.quant_config), indent=2))


def load_quantized(directory, device=None) -> CompassForCausalLM:
    """Rebuild a ``save_quantized`` model exactly (strict state-dict load)."""
    path = Path(directory)
    qconfig = QuantConfig(**json.loads((path / QUANT_CONFIG_NAME).read_text()))
    model = CompassForCausalLM(load_config(path))
    _replace_moes(model, qconfig, lambda new, old, i: None)
    model.load_state_dict(load_weights(path), strict=True)      # verified against its digest
    model.quant_config = qconfig
    model.eval()
    return model if device is None else model.to(device)
