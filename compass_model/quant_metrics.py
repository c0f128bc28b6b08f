"""How far an FP8 model is from its full-precision source: logit error, per-expert SQNR of the
quantized weights and GEMM inputs, each MoE layer's output error on its real inputs, and the MoE
layer's speed (``compass_model.quant`` makes the FP8
model; ``compass_model.train.fp8_report`` and ``compass quantize`` report these)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import compass_kernels as ck
from compass_model.model import CompassForCausalLM
from compass_model.moe import MoE
from compass_model.quant import Fp8MoE

__all__ = ["expert_sqnr", "logit_error", "moe_output_error", "time_moe_layers"]


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
    from compass_kernels.benchmarking.timers import median_time

    p = moe_fp.w13_EDF
    x = torch.randn(num_tokens, moe_fp.w13_EDF.shape[1],
                    device=p.device, dtype=moe_fp.w13_EDF.dtype)

    def ms(layer) -> float:
        return 1e3 * median_time(lambda: layer(x), iters, warmup, p.device)

    fp_ms, q_ms = ms(moe_fp), ms(moe_q)
    return {"fp_ms": fp_ms, "fp8_ms": q_ms, "speedup": fp_ms / q_ms}


@torch.no_grad()
def moe_output_error(model_fp, model_q, input_ids: torch.Tensor) -> list:
    """Per MoE layer, ``||y_q - y|| / ||y||`` of the layer's output on the inputs that layer sees in
    the full-precision model: the quantization error of the experts alone, not compounded through
    the later layers (the logit error is, and on a small model it is noisy at the ~1% level)."""
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0].detach()))
             for i, m in enumerate(model_fp.moe_layers())]
    try:
        model_fp(input_ids)
    finally:
        for h in hooks:
            h.remove()
    out = []
    for i, (fp, q) in enumerate(zip(model_fp.moe_layers(), model_q.moe_layers())):
        if i not in inputs:
            continue
        y, yq = fp(inputs[i])[0].float(), q(inputs[i])[0].float()
        out.append(float((yq - y).norm() / y.norm().clamp(min=1e-30)))
    return out
