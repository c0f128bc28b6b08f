"""Whole tiny models of every family in the installed transformers whose experts use
``@use_experts_implementation`` (hf_models.families()), "compass" against "eager": the output
(logits, or the last hidden state of a text model) and every parameter's gradient in fp32; the bf16
output (the routing pinned to the fp32 model's, within hf_models.assert_bf16_close); greedy
``generate``; and torch.compile(fullgraph=True) of a decoder layer with experts (slow). Every family
runs in the default suite (CI) except the six that test_hf_models.py covers more fully; families
the generic tiny config cannot build are skipped with the reason (SKIP)."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

import compass_kernels.integrations.transformers as hf
from hf_families import experts_classes
from hf_models import assert_bf16_close, families, routing, tiny_model, to_dtype

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
    # the indexed-attention layer the shrink keeps needs the QSA indexer sizes (None by default)
    "qwen4_exp": {"indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 8, "indexer_budget": 8,
                  "indexer_compress_ratio": 4},
    # layer 0 attention (its default period 8 leaves 2 layers without any), experts in both layers
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 0, "expert_layer_period": 1, "expert_layer_offset": 0},
}
# arguments of the config class: no per-layer size overrides, so the shrunk global sizes apply everywhere
# (dots3_note validates its MLA sizes when constructed, so they are given there)
INIT = {
    "gemma4": {"per_layer_config": {}}, "diffusion_gemma": {"per_layer_config": {}},
    "dots3_note": {"per_layer_config": {}, "head_dim": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8,
                   "v_head_dim": 8, "num_attention_heads": 4, "num_key_value_heads": 4, "q_lora_rank": 16,
                   "kv_lora_rank": 16, "index_head_dim": 8},
}
SKIP: dict[str, str] = {}   # family -> why the generic tiny config cannot build it (none with transformers 5.25)
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


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(5))


@pytest.fixture
def compass_calls(monkeypatch) -> list:
    """Grows by one entry per call of the compass experts implementation."""
    calls = []
    from transformers.integrations.moe import ExpertsInterface
    monkeypatch.setitem(ExpertsInterface._global_mapping, NAME,
                        lambda *a, **k: calls.append(1) or hf.experts_forward(*a, **k))
    return calls


def _model(family: str, class_name: str | None = None):
    return tiny_model(family, OVERRIDES.get(family), INIT.get(family), class_name=class_name)


def _output(out) -> torch.Tensor:
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def _run(model, impl: str, ids: torch.Tensor):
    model.set_experts_implementation(impl)
    model.zero_grad(set_to_none=True)
    y = _output(model(ids, use_cache=False))
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * g).sum().backward()
    return y.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def test_every_decorated_family_has_a_model():
    fams = families()
    assert set(fams) == {q.split(".")[0] for q in experts_classes()}
    assert set(COVERED) <= set(fams) and len(fams) >= 20
    assert set(SKIP) | set(DEFAULT) | set(NOT_GENERATIVE) | set(GENERATE_WITH) <= set(fams)


@pytest.mark.parametrize("family", _params())
def test_model_matches_eager(family, compass_calls):
    model = _model(family)
    ref, ref_g = _run(model, "eager", IDS)
    assert not compass_calls
    got, got_g = _run(model, NAME, IDS)
    assert compass_calls, f"{family}: the compass experts implementation did not run"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref_g.keys() == got_g.keys()
    scale = max((g.abs().max().item() for g in ref_g.values() if g is not None), default=1.0)
    for n, want in ref_g.items():
        if want is None:
            assert got_g[n] is None, n
            continue
        torch.testing.assert_close(got_g[n], want, rtol=1e-4, atol=1e-6 * scale,
                                   msg=lambda s, n=n: f"{family} {n}: {s}")


def _forward(model, impl: str, replay=None):
    model.set_experts_implementation(impl)
    with routing(model, replay) as record, torch.no_grad():
        y = _output(model(IDS, use_cache=False)).float()
    return y, record


@pytest.mark.parametrize("family", _params())
def test_bf16_matches_eager(family, compass_calls):
    """The model in bf16 as from_pretrained(dtype=torch.bfloat16) loads it (modules the class keeps in
    fp32 stay fp32). Both bf16 runs get the fp32 model's routing: the router is the model's own, and
    a near tie between two experts' scores that rounding flips would change a token's experts, which
    no rounding tolerance covers."""
    model = _model(family)
    ref32, fp32_routing = _forward(model, "eager")
    m16 = to_dtype(model, torch.bfloat16)
    ref, _ = _forward(m16, "eager", fp32_routing)
    assert not compass_calls
    got, _ = _forward(m16, NAME, fp32_routing)
    assert compass_calls, f"{family}: the compass experts implementation did not run"
    assert_bf16_close(got, ref, ref32, family)


# families whose model class above has no LM head, and why their generative class is not built here
_VISION = "the generic shrink leaves its vision tower large"
NOT_GENERATIVE = {
    "deepseek_ocr2": "its text model has no LM head; DeepseekOcr2ForConditionalGeneration does not build from "
                     "the shrunk default config (its vision settings are None)",
    "diffusion_gemma": "a block-diffusion encoder: no autoregressive generate",
    "ernie4_5_vl_moe": "its text model has no LM head; Ernie4_5_VLMoeForConditionalGeneration fails on text-only "
                       "input with the shrunk default config (an empty vision position tensor)",
    "glm4v_moe": f"its text model has no LM head; Glm4vMoeForConditionalGeneration has 18M parameters: {_VISION}",
    "glm5_next": f"its text model has no LM head; Glm5NextForConditionalGeneration has 50M parameters: {_VISION}",
    "muse_spark": f"its text model has no LM head; MuseSparkForConditionalGeneration has 52M parameters: {_VISION}",
    "openai_privacy_filter": "a token classifier (encoder): no LM head, no generate",
    "qwen3_omni_moe": "its thinker's text model has no LM head; Qwen3OmniMoeThinkerForConditionalGeneration does "
                      "not build from the shrunk default config (a None audio setting)",
    "unlimited_ocr": f"its text model has no LM head; UnlimitedOcrForConditionalGeneration has 7M parameters: "
                     f"{_VISION}",
}
# vision-language families generated from text alone through their generative class
GENERATE_WITH = {"hy_v4_vl": "HYV4VLForConditionalGeneration",
                 "mistral_large4": "MistralLarge4ForConditionalGeneration",
                 "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
                 "step3p7": "Step3p7ForConditionalGeneration"}


@pytest.mark.parametrize("family", _params())
def test_generate_same_tokens(family, compass_calls):
    """Greedy decoding in fp32 (prefill, then one token at a time through the cache)."""
    if family in NOT_GENERATIVE:
        pytest.skip(f"{family}: {NOT_GENERATIVE[family]}")
    model = _model(family, GENERATE_WITH.get(family))
    ids, kw = IDS[:, :5], dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.set_experts_implementation("eager")
    ref = model.generate(ids, **kw)
    assert not compass_calls
    model.set_experts_implementation(NAME)
    got = model.generate(ids, **kw)
    assert len(compass_calls) >= 6, f"{family}: the compass experts implementation did not run at every step"
    assert ref.shape == (2, 11)
    assert torch.equal(got, ref), f"{family}: eager {ref[:, 5:].tolist()}, compass {got[:, 5:].tolist()}"


# families whose last decoder layer with experts does not compile with fullgraph=True for a reason
# outside the experts: (the layer compiled instead, why)
COMPILE_LAYER = {
    "qwen4_exp": (0, "layer 1's indexed attention (the QSA indexer) branches in Python on the size of a "
                     "torch.nonzero per query, a data-dependent guard fullgraph cannot trace; layer 0 has linear "
                     "attention and the same experts"),
}


def _experts_call(model, family: str):
    """(module, args, kwargs): the call of the last decoder layer that holds experts (or the one
    COMPILE_LAYER names) in a forward of the model, copied as it was made (a cache the layer fills is
    copied before it does)."""
    classes = tuple(experts_classes().values())
    name = [n for n, m in model.named_modules() if isinstance(m, classes)][COMPILE_LAYER.get(family, (-1,))[0]]
    parts = name.split(".")
    name = ".".join(parts[:next(i for i, p in enumerate(parts) if p.isdigit()) + 1])   # "model.layers.N"
    module = model.get_submodule(name)
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a, k: calls.append(copy.deepcopy((a, k))), with_kwargs=True)
    with torch.no_grad():
        model(IDS, use_cache=False)
    handle.remove()
    return module, *calls[-1]


@pytest.mark.slow
@pytest.mark.parametrize("family", _params())
def test_compile_fullgraph(family, compass_calls):
    """torch.compile(fullgraph=True) of a decoder layer with experts, under "compass", against the
    same layer in eager mode (backend aot_eager: dynamo's graph capture and AOT autograd without the
    time of code generation)."""
    model = _model(family)
    model.set_experts_implementation(NAME)
    module, args, kwargs = _experts_call(model, family)

    def call(kw):
        def run(*a):
            out = module(*a, **kw)
            return out[0] if isinstance(out, tuple) else out
        return run

    with torch.no_grad():
        ref = call(copy.deepcopy(kwargs))(*args)
        torch._dynamo.reset()
        del compass_calls[:]
        got = torch.compile(call(kwargs), fullgraph=True, backend="aot_eager")(*args)
    assert compass_calls, f"{family}: the compass experts implementation did not run"
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
