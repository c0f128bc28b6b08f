"""CompassForCausalLM: shapes, dtypes, parameter count, losses (LM, MTP, router), masks, RoPE
switching, and torch.compile(fullgraph=True) of a block."""

from __future__ import annotations

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM, aux_loss_coefficient
from compass_model.model import Block
from compass_model.rope import rope_cache

TINY = CompassConfig.from_preset("tiny", vocab_size=256, max_seq_len=64)  # the shapes below assume these


def _batch(B=2, S=12, V=256):
    ids = torch.randint(0, V, (B, S + 1))
    return ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_shapes_and_dtypes(dtype):
    model = CompassForCausalLM(TINY.replace(dtype=dtype))
    x, y = _batch()
    out = model(x, labels=y)
    dt = getattr(torch, dtype)
    assert out.logits.shape == (2, 12, 256) and out.logits.dtype == dt
    assert out.hidden.shape == (2, 12, 64) and out.hidden.dtype == dt
    assert set(out.losses) == {"lm", "mtp", "aux", "z"}
    assert all(v.dtype == torch.float32 and v.dim() == 0 and torch.isfinite(v) for v in out.losses.values())
    assert out.loss.dtype == torch.float32
    assert len(out.router_stats) == TINY.n_moe_layers + TINY.mtp_depth
    for s in out.router_stats:
        assert s["load"].shape == (16,) and 0 <= s["entropy"] <= 1
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if name.endswith("router.weight") else dt), name
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_no_labels_gives_router_losses_only():
    out = CompassForCausalLM(TINY)(_batch()[0])
    assert out.loss is None and set(out.losses) == {"aux", "z"}


@pytest.mark.parametrize("kw", [
    dict(),
    dict(n_layers=3, n_dense_layers=1, shared_expert_dim=32, mtp_depth=2),
    dict(n_dense_layers=2, mtp_depth=1),                   # fully dense trunk: MTP block dense too
    dict(n_kv_heads=1, head_dim=8, num_experts=4, top_k=4),
])
def test_parameter_count_matches_the_model(kw):
    cfg = TINY.replace(**kw)
    model = CompassForCausalLM(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters(include_mtp=True)
    trunk = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert trunk == cfg.num_parameters()


def test_total_loss_composition_and_mtp():
    cfg = TINY.replace(mtp_depth=2, mtp_loss_weight=0.3, aux_loss_coef=0.01, z_loss_coef=0.001)
    model = CompassForCausalLM(cfg)
    x, y = _batch(S=16)
    out = model(x, labels=y)
    lo = out.losses
    assert torch.isfinite(lo["mtp"]) and lo["mtp"] > 0
    torch.testing.assert_close(out.loss, lo["lm"] + 0.3 * lo["mtp"] + 0.01 * lo["aux"] + 0.001 * lo["z"])
    assert len(out.router_stats) == cfg.n_moe_layers + 2
    # MTP depth 1 is a real next-next-token loss: it must move with the MTP module's weights
    (g,) = torch.autograd.grad(lo["mtp"], model.mtp[0].proj.weight)
    assert g.abs().sum() > 0
    assert CompassForCausalLM(TINY.replace(mtp_depth=0))(x, labels=y).losses["mtp"] == 0


def test_loss_mask_and_ignore_index():
    model = CompassForCausalLM(TINY.replace(mtp_depth=0))
    x, y = _batch(S=10)
    full = model(x, labels=y).losses["lm"]
    mask = torch.zeros(2, 10)
    mask[:, 5:] = 1
    y_ign = y.clone()
    y_ign[:, :5] = -100
    torch.testing.assert_close(model(x, labels=y, loss_mask=mask).losses["lm"],
                               model(x, labels=y_ign).losses["lm"])
    torch.testing.assert_close(model(x, labels=y, loss_mask=torch.ones(2, 10)).losses["lm"], full)


def test_aux_coefficient_follows_the_step_counter():
    cfg = TINY.replace(aux_loss_decay="linear", aux_loss_decay_steps=10, aux_loss_coef=0.1, aux_loss_min_coef=0.0,
                       z_loss_coef=0.0, mtp_depth=0)
    model = CompassForCausalLM(cfg)
    x, y = _batch()
    before = model(x, labels=y)
    for _ in range(5):
        model.after_optimizer_step()
    assert model.step == 5 and aux_loss_coefficient(cfg, model.step).item() == pytest.approx(0.05)
    after = model(x, labels=y)
    torch.testing.assert_close(before.loss - after.loss, 0.05 * before.losses["aux"])


def test_set_rope_switches_stage():
    model = CompassForCausalLM(TINY)
    model.set_rope(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=64, max_seq_len=256)
    cos, _ = rope_cache(model.config)
    assert model.rope_cos.shape == (256, 8) and torch.equal(model.rope_cos, cos)
    out = model(torch.randint(0, 256, (1, 200)))
    assert out.logits.shape == (1, 200, 256)
    with pytest.raises(ValueError, match="RoPE fields only"):
        model.set_rope(d_model=8)
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.randint(0, 256, (1, 257)))


# inductor's own use of torch.jit.script_method warns on torch 2.13; not ours to fix
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated")
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_compile_fullgraph_block(capacity_factor):
    """A MoE block (router, route/permute, grouped GEMMs, unpermute, shared expert, capacity) traces
    as one graph with dynamic shapes: a second sequence length needs no graph break."""
    cfg = TINY.replace(shared_expert_dim=16, capacity_factor=capacity_factor)
    block = Block(cfg, moe=True)
    with torch.no_grad():
        for p in block.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.1)
    cos, sin = rope_cache(cfg)
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, dynamic=True)
    for S in (24, 13):
        x = torch.randn(2, S, 64, requires_grad=True)
        out_c, r_c = compiled(x, cos[:S], sin[:S])
        out_e, r_e = block(x, cos[:S], sin[:S])
        torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)   # inductor fuses the fp32 pointwise ops
        torch.testing.assert_close(r_c["aux"], r_e["aux"])
        torch.testing.assert_close(r_c["stats"]["load"], r_e["stats"]["load"])
        torch.testing.assert_close(r_c["stats"]["dropped"], r_e["stats"]["dropped"])
        g = torch.randn_like(out_e)
        params = [x, *block.parameters()]
        for a, b in zip(torch.autograd.grad((out_c * g).sum() + r_c["aux"], params),
                        torch.autograd.grad((out_e * g).sum() + r_e["aux"], params)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
