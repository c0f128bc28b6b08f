"""``compass export --format hf``: a Compass checkpoint that maps onto Mixtral loads in transformers
with equal logits; one that does not map is refused, naming the feature."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.checkpoint import save_pretrained
from compass_model.cli import main
from compass_model.export_hf import export_hf, mapping_problems


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    cfg = CompassConfig.from_preset("tiny", max_seq_len=32, **kw)
    model = CompassForCausalLM(cfg).eval()
    with torch.no_grad():          # norms and routers away from their init, so a swapped name shows
        for name, p in model.named_parameters():
            if p.dim() == 1 or "router" in name:
                p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    save_pretrained(model, tmp_path / "ckpt")
    return model


@pytest.mark.parametrize("rope", [{}, {"rope_scaling": "linear", "rope_factor": 2.0}])
def test_export_tiny_loads_in_transformers_with_equal_logits(tmp_path, rope):
    from transformers import AutoModelForCausalLM

    model = _saved(tmp_path, **rope)
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", experts_implementation="eager").eval()
    assert type(hf).__name__ == "MixtralForCausalLM"
    ids = torch.randint(0, 264, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        got = hf(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("preset,feature", [("small", "shared_expert_dim"), ("proxy-2b", "shared_expert_dim"),
                                            ("compass-v3", "rope_scaling='yarn'")])
def test_presets_that_do_not_map(preset, feature):
    problems = mapping_problems(CompassConfig.from_preset(preset))
    assert any(feature in p for p in problems)


@pytest.mark.parametrize("kw,feature", [(dict(shared_expert_dim=32), "shared_expert_dim"),
                                        (dict(n_dense_layers=1), "n_dense_layers"),
                                        (dict(rope_scaling="yarn", rope_factor=2.0), "rope_scaling")])
def test_export_refuses_what_does_not_map(tmp_path, capsys, kw, feature):
    _saved(tmp_path, **kw)
    with pytest.raises(ValueError, match=feature):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert main(["export", "--checkpoint", str(tmp_path / "ckpt"), "--format", "hf", "--out", str(tmp_path / "hf")]) == 1
    assert feature in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_nonzero_router_bias(tmp_path):
    model = _saved(tmp_path, router_bias_rate=1e-3)
    with torch.no_grad():
        model.layers[0].ffn.router.bias[0] = 0.5
    save_pretrained(model, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="router bias"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
