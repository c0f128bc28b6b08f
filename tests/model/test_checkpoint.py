"""save_pretrained / from_pretrained: an exact round trip of weights, buffers and config."""

from __future__ import annotations

import json

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM, from_pretrained


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_exact(tmp_path, dtype):
    cfg = CompassConfig.from_preset("tiny", dtype=dtype, router_bias_rate=1e-3, shared_expert_dim=16,
                                    n_layers=3, n_dense_layers=1, rope_scaling="yarn", rope_factor=2.0)
    model = CompassForCausalLM(cfg)
    x = torch.randint(0, 256, (2, 10))
    model(x)                                   # training mode: accumulates router load
    model.after_optimizer_step()               # non-zero router biases and step
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == dtype
    loaded = CompassForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert loaded.step == 1 and loaded.layers[1].ffn.router.bias.abs().sum() > 0
    model.eval(), loaded.eval()
    assert torch.equal(model(x).logits, loaded(x).logits)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        from_pretrained(tmp_path)
