"""RoPE scaling: YaRN against its published definition, NTK and linear scaling, rotation properties."""

from __future__ import annotations

import math

import pytest
import torch

from compass_model import CompassConfig
from compass_model.rope import apply_rope, rope_cache, rope_frequencies


def yarn_published(d: int, base: float, s: float, L: int, beta_fast=32.0, beta_slow=1.0):
    """YaRN as published (arXiv 2309.00071, Sec. 3.2-3.4, with the official code's rounding of the ramp
    ends): pair i has wavelength lambda_i = 2 pi base^(2i/d) and turns r_i = L / lambda_i times over
    the original context L. The ramp runs over the pair index between the (fractional) indices where
    r = beta_fast and r = beta_slow, floor / ceil-ed and clipped to [0, d - 1]; gamma = 1 keeps
    theta_i, gamma = 0 interpolates to theta_i / s. Attention factor sqrt(1/t) = 0.1 ln s + 1."""
    def index_where_turns(r):                              # solve L / (2 pi base^(2i/d)) = r for i
        return d / 2 * math.log(L / (2 * math.pi * r)) / math.log(base)

    lo = max(math.floor(index_where_turns(beta_fast)), 0)
    hi = min(math.ceil(index_where_turns(beta_slow)), d - 1)
    out = []
    for i in range(d // 2):
        theta = base ** (-2 * i / d)
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        gamma = 1 - ramp
        out.append((1 - gamma) * theta / s + gamma * theta)
    return out, 0.1 * math.log(s) + 1


@pytest.mark.parametrize("d,base,s,L", [(128, 1e6, 4.0, 32768), (128, 10000.0, 4.0, 4096), (64, 10000.0, 8.0, 2048),
                                        (16, 10000.0, 4.0, 64)])
def test_yarn_matches_published_formula(d, base, s, L):
    theta, mscale = rope_frequencies(d, base, "yarn", s, L)
    want, want_mscale = yarn_published(d, base, s, L)
    torch.testing.assert_close(theta, torch.tensor(want, dtype=torch.float64), rtol=1e-14, atol=0)
    assert mscale == pytest.approx(want_mscale)
    # the paper's regimes: many turns over L -> untouched; less than one turn -> fully interpolated
    orig = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    turns = L * orig / (2 * math.pi)
    assert torch.equal(theta[turns > 32], orig[turns > 32])
    torch.testing.assert_close(theta[turns < 1], orig[turns < 1] / s, rtol=1e-15, atol=0)
    assert ((theta <= orig) & (theta >= orig / s * (1 - 1e-15))).all()


def test_yarn_attention_factor_for_factor_4():
    assert rope_frequencies(128, 1e6, "yarn", 4.0, 32768)[1] == pytest.approx(1.1386, abs=1e-4)
    cfg = CompassConfig.from_preset("tiny", rope_scaling="yarn", rope_factor=4.0, max_seq_len=256,
                                    rope_original_max_len=64)
    cos, sin = rope_cache(cfg)
    torch.testing.assert_close(cos.square() + sin.square(), torch.full_like(cos, (0.1 * math.log(4) + 1) ** 2))


def test_linear_and_ntk():
    d, base, s = 64, 10000.0, 4.0
    plain = [base ** (-2 * i / d) for i in range(d // 2)]
    torch.testing.assert_close(rope_frequencies(d, base)[0], torch.tensor(plain, dtype=torch.float64))
    torch.testing.assert_close(rope_frequencies(d, base, "linear", s)[0], torch.tensor(plain, dtype=torch.float64) / s)
    base_ntk = base * s ** (d / (d - 2))
    ntk = [base_ntk ** (-2 * i / d) for i in range(d // 2)]
    got, mscale = rope_frequencies(d, base, "ntk", s)
    torch.testing.assert_close(got, torch.tensor(ntk, dtype=torch.float64))
    assert mscale == 1.0
    assert got[0] == 1.0 and got[-1] == pytest.approx(plain[-1] / s)   # NTK: high freq kept, lowest interpolated
    with pytest.raises(ValueError, match="rope_scaling"):
        CompassConfig(rope_scaling="dynamic")


@pytest.mark.parametrize("scaling", ["none", "linear", "ntk", "yarn"])
def test_rotation_is_relative(scaling):
    """<R_m q, R_n k> depends on n - m only, and (at attention factor 1) rotation keeps norms."""
    cfg = CompassConfig.from_preset("tiny", rope_scaling=scaling, rope_factor=4.0, max_seq_len=64,
                                    rope_original_max_len=16)
    cos, sin = rope_cache(cfg)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)

    def rot(x, pos):
        return apply_rope(x.view(1, 1, 1, 16), cos[pos:pos + 1].double(), sin[pos:pos + 1].double()).flatten()

    a = rot(q, 3) @ rot(k, 10)
    b = rot(q, 40) @ rot(k, 47)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)          # fp32 tables
    mscale = rope_frequencies(16, 10000.0, scaling, 4.0, 16)[1]
    torch.testing.assert_close(rot(q, 33).norm(), q.norm() * mscale, rtol=1e-5, atol=0)
