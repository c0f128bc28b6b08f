"""Whole tiny models of the six most used MoE families through the "compass" experts implementation
against "eager": logits and every parameter's gradient (fp32), logits in bf16, greedy ``generate``,
and torch.compile(fullgraph=True) of one decoder layer."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers", minversion="5")

import compass_kernels.integrations.transformers as hf
from hf_models import assert_bf16_close

NAME = hf.register()
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def _configs():
    import transformers as t

    return {
        "mixtral": t.MixtralConfig(**COMMON, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2),
        "qwen2_moe": t.Qwen2MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                                      num_experts_per_tok=2, shared_expert_intermediate_size=24),
        "qwen3_moe": t.Qwen3MoeConfig(**COMMON, intermediate_size=24, moe_intermediate_size=16, num_experts=8,
                                      num_experts_per_tok=2, head_dim=8),
        "olmoe": t.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=8, num_experts_per_tok=2),
        "deepseek_v3": t.DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8,
                                          num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                          first_k_dense_replace=0, q_lora_rank=16, kv_lora_rank=16,
                                          qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8),
        "gpt_oss": t.GptOssConfig(**COMMON, intermediate_size=24, num_local_experts=8, num_experts_per_tok=2,
                                  head_dim=8, layer_types=["sliding_attention", "full_attention"], sliding_window=8),
    }


FAMILIES = sorted(_configs())


def _model(family: str, impl: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = _configs()[family]
    model = AutoModelForCausalLM.from_config(cfg, experts_implementation=impl)
    with torch.no_grad():
        for name, p in model.named_parameters():   # random everything, biases and correction biases too
            p.normal_(0, 0.2 if p.dim() > 1 else 0.5)
        for name, b in model.named_buffers():
            if "correction_bias" in name:
                b.normal_(0, 0.1)
    return model.to(dtype).eval()


def _ids(batch=2, seq=9):
    return torch.randint(0, 64, (batch, seq), generator=torch.Generator().manual_seed(5))


def _uses_compass(model, monkeypatch) -> list:
    calls = []
    real = hf.experts_forward
    monkeypatch.setattr(hf, "experts_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    from transformers.integrations.moe import ExpertsInterface
    monkeypatch.setitem(ExpertsInterface._global_mapping, NAME, hf.experts_forward)
    return calls


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_all_gradients_match_eager(family, monkeypatch):
    ids = _ids()
    out = {}
    for impl in ("eager", NAME):
        model = _model(family, impl)
        calls = _uses_compass(model, monkeypatch) if impl == NAME else None
        res = model(ids, labels=ids)
        res.loss.backward()
        out[impl] = (res.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
        if calls is not None:
            assert calls, "the compass implementation did not run"
    (ref, ref_g), (got, got_g) = out["eager"], out[NAME]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert ref_g.keys() == got_g.keys()
    for n in ref_g:
        if ref_g[n] is None:
            assert got_g[n] is None, n
            continue
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-4, atol=1e-6, msg=lambda s, n=n: f"{family} {n}: {s}")


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_match_eager(family):
    ids = _ids()
    ref32 = _model(family, "eager")(ids).logits
    ref = _model(family, "eager", torch.bfloat16)(ids).logits.float()
    got = _model(family, NAME, torch.bfloat16)(ids).logits.float()
    assert_bf16_close(got, ref, ref32, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_same_tokens(family):
    ids = _ids(batch=2, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = _model(family, "eager").generate(ids, **kw)
    got = _model(family, NAME).generate(ids, **kw)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_compile_decoder_layer_fullgraph(family):
    model = _model(family, NAME)
    inner = model.model
    layer = inner.layers[-1]
    h = torch.randn(1, 7, 32, generator=torch.Generator().manual_seed(2))
    pos = torch.arange(7)[None]
    pe = inner.rotary_emb(h, pos)

    def run(h):
        out = layer(h, attention_mask=None, position_ids=pos, position_embeddings=pe)
        return out[0] if isinstance(out, tuple) else out

    ref = run(h)
    torch._dynamo.reset()
    got = torch.compile(run, fullgraph=True, backend="aot_eager")(h)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
