"""The "compass" experts implementation against transformers' "eager" one, on every experts class of
the installed transformers that uses @use_experts_implementation (found programmatically, built
tiny from its own config class): outputs and all gradients in fp32, bf16, EP sentinel slots,
routing-weight dtypes, layout errors, registration."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

import compass_kernels.integrations.transformers as hf
from hf_families import experts_classes, hidden_dim, tiny_experts

NAME = hf.register()
FAMILIES = sorted(experts_classes())


# experts classes whose callers pass one route per row with unit weights (ergo's caller splits
# the top-k, normalises each route and weights them itself; its eager forward squeezes the route
# dimension and ignores the weights): the test feeds them that contract
ONE_ROUTE = {"ergo.ErgoExpertProjections"}


def _inputs(m, T=13, seed=1, sentinel=False):
    g = torch.Generator().manual_seed(seed)
    E = m.num_experts
    one = any(type(m) is experts_classes().get(q) for q in ONE_ROUTE)
    k = 1 if one else 2
    x = torch.randn(T, hidden_dim(m), generator=g)
    ids = torch.rand(T, E, generator=g).argsort(-1)[:, :k]
    if sentinel:                         # other ranks' experts (EP): ids >= E, every other token
        ids[::2, k - 1] = E
    w = torch.rand(T, k, generator=g)
    return x, ids, torch.ones_like(w) if one else w


def _run(m, impl, x, ids, w):
    m.config._experts_implementation = impl
    x = x.clone().requires_grad_()
    w = w.clone().requires_grad_()
    out = m(x, ids, w)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype)
    params = [p for _, p in sorted(m.named_parameters())]
    grads = torch.autograd.grad((out * gy).sum(), [x, w, *params], allow_unused=True)
    return out, grads


def test_families_found():
    """The installed transformers has dozens of decorated families; the six most used are among them."""
    fams = {q.split(".")[0] for q in FAMILIES}
    assert {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss"} <= fams
    assert len(fams) >= 20


@pytest.mark.parametrize("qualname", FAMILIES)
def test_experts_match_eager_fp32(qualname):
    m = tiny_experts(qualname)
    x, ids, w = _inputs(m)
    ref, ref_g = _run(m, "eager", x, ids, w)
    got, got_g = _run(m, NAME, x, ids, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    names = ["x", "top_k_weights", *sorted(n for n, _ in m.named_parameters())]
    for n, a, b in zip(names, got_g, ref_g):
        if n == "top_k_weights" and qualname in ONE_ROUTE:    # eager ignores the (constant) unit weights
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda s, n=n: f"{qualname} grad {n}: {s}")


@pytest.mark.parametrize("qualname", FAMILIES)
def test_experts_match_eager_bf16(qualname):
    m = tiny_experts(qualname)
    x, ids, w = _inputs(m)
    ref32, _ = _run(m, "eager", x, ids, w)
    m = m.to(torch.bfloat16)
    ref, _ = _run(m, "eager", x.bfloat16(), ids, w.bfloat16())
    got, _ = _run(m, NAME, x.bfloat16(), ids, w.bfloat16())
    assert got.dtype == torch.bfloat16
    scale = ref32.abs().max()
    # compass accumulates in fp32 and rounds once: no further from fp32 than eager is, within bf16 steps
    assert (got.float() - ref.float()).abs().max() <= 3e-2 * scale
    assert (got.float() - ref32).abs().max() <= 1.5 * (ref.float() - ref32).abs().max() + 4e-3 * scale


@pytest.mark.parametrize("qualname", ["mixtral.MixtralExperts", "gpt_oss.GptOssExperts",
                                      "nemotron_h.NemotronHExperts", "qwen3_moe.Qwen3MoeExperts"])
def test_expert_parallel_sentinels(qualname):
    """Under transformers' EP, ids >= num_experts are other ranks' slots: no output, no gradient.
    Reference: eager with those slots sent to expert 0 at weight 0 (same output and parameter
    gradients; their weight's gradient must be 0 here)."""
    m = tiny_experts(qualname)
    m._is_expert_parallel = True
    x, ids, w = _inputs(m, sentinel=True)
    off = ids >= m.num_experts
    ref, ref_g = _run(m, "eager", x, ids.masked_fill(off, 0), w.masked_fill(off, 0))
    got, got_g = _run(m, NAME, x, ids, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    for i, (a, b) in enumerate(zip(got_g, ref_g)):
        if i == 1:                                         # top_k_weights
            assert (a[off] == 0).all()
            a, b = a[~off], b[~off]
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # any sentinel value >= E, not only E itself
    torch.testing.assert_close(_run(m, NAME, x, ids.masked_fill(off, m.num_experts + 5), w)[0], got)


@pytest.mark.parametrize("wdtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_any_routing_weight_dtype(wdtype):
    m = tiny_experts("mixtral.MixtralExperts")
    x, ids, w = _inputs(m)
    w = w.to(wdtype)
    m.config._experts_implementation = "eager"
    ref = m(x, ids, w)
    m.config._experts_implementation = NAME
    got = m(x, ids, w)
    assert got.dtype == x.dtype
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_interleaved_layout_without_own_gate_raises():
    m = tiny_experts("mixtral.MixtralExperts")
    m.is_concatenated = False                 # the default _apply_gate would split it wrongly
    m.config._experts_implementation = NAME
    with pytest.raises(NotImplementedError, match="is_concatenated"):
        m(*_inputs(m))


def test_unknown_layout_flag_raises(monkeypatch):
    """A decorator flag the adapter does not handle (here: pretend has_post_expert_norm is one),
    set away from its default, is refused by name, never answered wrongly."""
    m = tiny_experts("muse_spark.MuseSparkExperts")
    assert m.has_post_expert_norm
    monkeypatch.setattr(hf, "SUPPORTED_FLAGS", tuple(f for f in hf.SUPPORTED_FLAGS if f != "has_post_expert_norm"))
    monkeypatch.setattr(hf, "_UNHANDLED", None)
    m.config._experts_implementation = NAME
    with pytest.raises(NotImplementedError, match="has_post_expert_norm=True"):
        m(*_inputs(m))
    monkeypatch.undo()
    hf._UNHANDLED = None


def test_bad_flag_value_raises():
    m = tiny_experts("mixtral.MixtralExperts")
    m.is_transposed = "yes"
    m.config._experts_implementation = NAME
    with pytest.raises(ValueError, match="is_transposed must be a bool"):
        m(*_inputs(m))


def test_register_is_idempotent_and_selectable():
    from transformers import AutoModelForCausalLM, MixtralConfig
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert hf.register() == "compass" and hf.register("compass") == "compass"
    assert ALL_EXPERTS_FUNCTIONS["compass"] is hf.experts_forward
    cfg = MixtralConfig(vocab_size=32, hidden_size=16, intermediate_size=8, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4)
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation="compass")
    assert model.config._experts_implementation == "compass"
    model.config._experts_implementation = "eager"
    model.set_experts_implementation("compass")
    assert model.model.layers[0].mlp.experts.config._experts_implementation == "compass"
    with pytest.raises(ValueError, match="already an experts implementation"):
        hf.register("grouped_mm")
    with pytest.raises(ValueError, match="non-empty str"):
        hf.register("")


def test_missing_or_old_transformers(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.57.1")
    with pytest.raises(ImportError, match=r"transformers >= 5.*found 4\.57\.1"):
        hf.register()
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match=r"pip install 'compass-kernels\[hf\]'"):
        hf.register()


def test_import_compass_kernels_does_not_import_transformers():
    code = "import sys, compass_kernels; assert 'transformers' not in sys.modules, 'imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
