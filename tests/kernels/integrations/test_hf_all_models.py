"""Whole tiny models of every family in the installed transformers whose experts use
``@use_experts_implementation`` (hf_models.families()), "compass" against "eager": the output
(logits, or the last hidden state of a text model) and every parameter's gradient in fp32. Every
family runs in the default suite (CI) except the six that test_hf_models.py covers more fully;
families the generic tiny config cannot build are skipped with the reason (SKIP)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

import compass_kernels.integrations.transformers as hf
from kernels.integrations.hf_families import experts_classes
from kernels.integrations.hf_models import families, tiny_model

NAME = hf.register()

# per-family settings on top of the generic shrink (dotted keys reach into the config)
OVERRIDES = {
    "dots1": {"n_shared_experts": 1},                                  # its default None is not usable
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},            # no default
    "deepseek_ocr2": {"mlp_layer_types": ["sparse", "sparse"]},        # no default
    "mistral4": {"head_dim": 16},                                       # qk_nope_head_dim + qk_rope_head_dim
    "glm4v_moe": {"rope_parameters.mrope_section": [1, 1, 0]},          # half the rotary dims (4 of head_dim 8)
    "ernie4_5_vl_moe": {"rope_parameters.mrope_section": [1, 1, 2]},    # head_dim / 2
    "granitemoehybrid": {"mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16},  # 4 x 16 = 2 x hidden
    "gemma4": {"vocab_size_per_layer_input": 64, "hidden_size_per_layer_input": 8},
    "dots3_note": {"head_dim": 16},                                     # qk_nope_head_dim + qk_rope_head_dim
}
# arguments of the config class: no per-layer size overrides, so the shrunk global sizes apply everywhere
# (dots3_note validates its MLA sizes when constructed, so they are given there)
INIT = {
    "gemma4": {"per_layer_config": {}}, "diffusion_gemma": {"per_layer_config": {}},
    "dots3_note": {"per_layer_config": {}, "head_dim": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                   "v_head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16,
                   "kv_lora_rank": 16, "index_head_dim": 8},
}
SKIP: dict[str, str] = {}   # family -> why the generic tiny config cannot build it (none with transformers 5.24)
# families with a layout or an architecture the six of test_hf_models.py lack (checked to exist)
DEFAULT = ("deepseek_v2", "jamba", "nemotron_h", "qwen3_next", "qwen3_vl_moe", "granitemoe")
# the six most used families have their own, fuller tests in test_hf_models.py
COVERED = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss")


def _params():
    out = []
    for fam in sorted(families()):
        marks = []
        if fam in SKIP:
            marks.append(pytest.mark.skip(reason=SKIP[fam]))
        elif fam in COVERED:                          # run by default in test_hf_models.py
            marks.append(pytest.mark.slow)
        out.append(pytest.param(fam, marks=marks, id=fam))
    return out


def _run(model, impl: str, ids: torch.Tensor):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    out = model(ids, use_cache=False)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * g).sum().backward()
    return y.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_every_decorated_family_has_a_model():
    fams = families()
    assert set(fams) == {q.split(".")[0] for q in experts_classes()}
    assert set(COVERED) <= set(fams) and len(fams) >= 20
    assert set(SKIP) | set(DEFAULT) <= set(fams)


@pytest.mark.parametrize("family", _params())
def test_model_matches_eager(family, monkeypatch):
    model = tiny_model(family, OVERRIDES.get(family), INIT.get(family))
    calls = []
    from transformers.integrations.moe import ExpertsInterface
    monkeypatch.setitem(ExpertsInterface._global_mapping, NAME,
                        lambda *a, **k: calls.append(1) or hf.experts_forward(*a, **k))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))
    ref, ref_g = _run(model, "eager", ids)
    assert not calls
    got, got_g = _run(model, NAME, ids)
    assert calls, f"{family}: the compass experts implementation did not run"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref_g.keys() == got_g.keys()
    scale = max((g.abs().max().item() for g in ref_g.values() if g is not None), default=1.0)
    for n, want in ref_g.items():
        if want is None:
            assert got_g[n] is None, n
            continue
        torch.testing.assert_close(got_g[n], want, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda s, n=n: f"{family} {n}: {s}")
