"""CompassConfig: presets, validation, JSON, and the cost model (compass-v3's 245B / 71B)."""

from __future__ import annotations

import pytest

from compass_model import PRESETS, CompassConfig
from compass_model.data import ByteTokenizer


def test_compass_v3_parameter_counts():
    c = CompassConfig.from_preset("compass-v3")
    assert (c.num_experts, c.top_k) == (16, 2)
    assert c.num_parameters() == pytest.approx(245e9, rel=0.01)
    assert c.active_parameters() == pytest.approx(71e9, rel=0.01)
    # by hand: see the arithmetic above PRESETS
    attn = 2 * 8192 * 128 * (64 + 8) + 2 * 8192
    expert, shared, router = 3 * 8192 * 11520, 3 * 8192 * 34560, 8192 * 16
    emb = 2 * 131072 * 8192 + 8192
    assert c.num_parameters() == emb + 44 * (attn + router + 16 * expert + shared)
    assert c.active_parameters() == emb + 44 * (attn + router + 2 * expert + shared)
    assert c.num_parameters(include_mtp=True) > c.num_parameters()


def test_compass_v3_top4_parameter_counts():
    """The top-4 reading: no shared expert, expert width solved from the 245B total."""
    c = CompassConfig.from_preset("compass-v3-top4")
    assert (c.num_experts, c.top_k, c.shared_expert_dim) == (16, 4, 0)
    assert round(c.num_parameters() / 1e9, 1) == 245.0
    assert round(c.active_parameters() / 1e9, 1) == 67.8
    attn = 2 * 8192 * 128 * (64 + 8) + 2 * 8192
    expert, router = 3 * 8192 * 13652, 8192 * 16
    emb = 2 * 131072 * 8192 + 8192
    assert c.num_parameters() == emb + 44 * (attn + router + 16 * expert)
    assert c.active_parameters() == emb + 44 * (attn + router + 4 * expert)
    # the rest of the shape is compass-v3's
    v3 = CompassConfig.from_preset("compass-v3")
    same = ("d_model", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "max_seq_len", "rope_factor", "mtp_depth")
    assert all(getattr(c, k) == getattr(v3, k) for k in same)
    # the EP traffic model follows top_k: twice the slots of top-2
    assert c.all_to_all_bytes_per_token(8) == 2 * v3.all_to_all_bytes_per_token(8)


def test_presets_are_valid_and_ordered():
    assert set(PRESETS) == {"tiny", "small", "proxy-2b", "compass-v3", "compass-v3-top4"}
    sizes = [CompassConfig.from_preset(n).num_parameters() for n in ("tiny", "small", "proxy-2b", "compass-v3")]
    assert sizes == sorted(sizes)
    assert CompassConfig.from_preset("proxy-2b").num_parameters() == pytest.approx(2e9, rel=0.1)
    tiny = CompassConfig.from_preset("tiny")
    assert tiny.vocab_size >= ByteTokenizer.vocab_size and tiny.head_dim == 16 and tiny.dense_ffn_dim == 128
    assert (tiny.n_heads, tiny.n_kv_heads) == (8, 8)                          # the demo's needle search
    assert CompassConfig.from_preset("tiny", d_model=128).head_dim == 16      # given by the preset
    assert CompassConfig.from_preset("small", d_model=1024).head_dim == 128   # derived from the override
    with pytest.raises(ValueError, match="unknown preset"):
        CompassConfig.from_preset("huge")


def test_json_round_trip_and_frozen():
    c = CompassConfig.from_preset("compass-v3")
    assert CompassConfig.from_json(c.to_json()) == c
    with pytest.raises(AttributeError):
        c.d_model = 3


@pytest.mark.parametrize("kw,match", [
    (dict(n_heads=4, n_kv_heads=3), "multiple of n_kv_heads"),
    (dict(top_k=20, num_experts=16), "top_k"),
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(head_dim=7), "even"),
    (dict(n_dense_layers=5), "n_dense_layers"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(aux_loss_decay="cosine"), "aux_loss_decay_steps"),
    (dict(aux_loss_decay="step"), "aux_loss_decay must be"),
    (dict(rope_factor=0.5), "rope_factor"),
    (dict(dtype="float8"), "dtype"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        CompassConfig(**kw)


def test_cost_model():
    c = CompassConfig.from_preset("compass-v3")
    S = 4096
    matmul = c.active_parameters() - c.vocab_size * c.d_model
    fwd = 2 * matmul + 4 * 44 * 64 * 128 * S
    assert c.flops_per_token(S, training=False) == fwd and c.flops_per_token(S) == 3 * fwd
    assert c.flops_per_token(S) == pytest.approx(6 * 71e9, rel=0.1)        # ~6 N at short context
    assert c.kv_cache_bytes(S) == 2 * 44 * 8 * 128 * S * 2
    assert c.moe_dispatch_bytes(1000) == 2 * 1000 * 8192 * 2 * (1 + 2) + 2000 * 12
    one = c.decode_step_bytes(1, S)
    assert one - c.kv_cache_bytes(S) == 2 * c.active_parameters()        # batch 1 reads the active weights
    assert c.decode_step_bytes(64, S) > one


def test_all_to_all_model():
    c = CompassConfig.from_preset("compass-v3")
    # 44 MoE layers x (dispatch + combine) x k=2 slots x 7/8 off-rank x 8192 x 2 bytes, x2 for backward
    assert c.all_to_all_bytes_per_token(8) == 44 * 2 * 2 * (7 / 8) * 8192 * 2 * 2
    assert c.all_to_all_bytes_per_token(1) == 0
    assert c.all_to_all_bytes_per_token(8, training=False, bytes_per_elem=1) == c.all_to_all_bytes_per_token(8) / 4
