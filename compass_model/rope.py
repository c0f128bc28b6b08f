"""Rotary position embeddings with long-context scaling: none, linear (position interpolation),
NTK-aware, and YaRN (arXiv 2309.00071), switchable per training stage through the config.

Frequencies are computed in float64 and the cos / sin tables in float64 before the cast to fp32:
at position 131071 an fp32 angle is off by ~0.01 rad, enough to blur the lowest frequencies.
Rotation layout: half split (pairs i and i + hd/2), as Llama / Qwen / DeepSeek checkpoints use.
"""

from __future__ import annotations

import math

import torch

from compass_model.config import CompassConfig


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, original_max_len: int) -> float:
    """The (fractional) pair index i whose frequency base^(-2i/dim) turns ``num_rotations`` times
    over the original context: solve original_max_len * theta_i / (2 pi) = num_rotations for i."""
    return dim * math.log(original_max_len / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                     original_max_len: int = 4096, beta_fast: float = 32.0,
                     beta_slow: float = 1.0) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``theta [head_dim // 2]`` (float64) and the attention factor.

    none:   theta_i = base^(-2i/d)
    linear: theta_i / s                          (position interpolation)
    ntk:    base' = base * s^(d / (d - 2))       (NTK-aware)
    yarn:   per pair i, a linear ramp over the index between the original frequency (pairs that turn
            more than beta_fast times over the original context) and theta_i / s (fewer than
            beta_slow turns), the ends rounded outward (floor / ceil) as in the official YaRN code
            that deployed checkpoints use; attention factor 0.1 ln s + 1, applied to cos and sin,
            so logits scale by its square.
    """
    d = head_dim
    s = float(factor)
    if scaling == "ntk":
        base = base * s ** (d / (d - 2))
    theta = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)       # [d/2]
    if scaling in ("none", "ntk") or s == 1.0:
        return theta, 1.0
    if scaling == "linear":
        return theta / s, 1.0
    if scaling != "yarn":
        raise ValueError(f"rope scaling must be one of none, linear, ntk, yarn; got {scaling!r}")
    low = math.floor(_yarn_correction_dim(beta_fast, d, base, original_max_len))
    high = math.ceil(_yarn_correction_dim(beta_slow, d, base, original_max_len))
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001                                        # avoid 0 / 0 in the ramp
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    keep = 1.0 - ramp                                        # 1: original frequency, 0: interpolated
    theta = theta / s * (1 - keep) + theta * keep
    return theta, 0.1 * math.log(s) + 1.0


def rope_cache(config: CompassConfig, seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [seq_len, head_dim // 2]`` fp32 for positions 0..seq_len-1 (default max_seq_len),
    each multiplied by the attention factor."""
    theta, mscale = rope_frequencies(config.head_dim, config.rope_base, config.rope_scaling, config.rope_factor,
                                     config.rope_original_max_len, config.yarn_beta_fast, config.yarn_beta_slow)
    S = config.max_seq_len if seq_len is None else seq_len
    angles = torch.outer(torch.arange(S, dtype=torch.float64), theta)             # [S, d/2]
    return (angles.cos() * mscale).float(), (angles.sin() * mscale).float()


def apply_rope(x_BHSD: torch.Tensor, cos_SR: torch.Tensor, sin_SR: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of ``x [B, H, S, D]`` by the angles of each position (fp32 math)."""
    R = x_BHSD.shape[-1] // 2
    x = x_BHSD.float()
    x1, x2 = x[..., :R], x[..., R:]
    out = torch.cat([x1 * cos_SR - x2 * sin_SR, x2 * cos_SR + x1 * sin_SR], dim=-1)
    return out.to(x_BHSD.dtype)
