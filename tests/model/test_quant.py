"""Expert-aware FP8 (W8A8) inference: compass_model.quant on the tiny preset in fp32 (CPU)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from safetensors import safe_open

import compass_kernels as ck
from compass_kernels.fp8_ref import quantize_fp8_ref
from compass_model import CompassConfig, CompassForCausalLM
from compass_model.moe import MoE
from compass_model.quant import (
    Fp8MoE,
    calibrate,
    load_quantized,
    quantize_model,
    save_quantized,
)
from compass_model.quant_metrics import expert_sqnr, logit_error, time_moe_layers


def _model(seed: int = 0) -> CompassForCausalLM:
    torch.manual_seed(seed)
    return CompassForCausalLM(CompassConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def base():
    model = _model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (4, 32), generator=g)
    cal = [torch.randint(0, 256, (4, 32), generator=g) for _ in range(2)]
    with torch.no_grad():
        ref = model(ids).logits
    return model, ids, cal, ref


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("kw", [
    {},                                                           # dynamic_row, row weights, smoothing
    {"smooth_alpha": None},
    {"activation": "dynamic_block", "weight_granularity": "block2d"},
    {"activation": "static"},
])
def test_expert_aware_logits_close(base, kw):
    model, ids, cal, ref = base
    q = quantize_model(copy.deepcopy(model), cal, **kw)
    err = logit_error(ref, _logits(q, ids))
    print(kw, err)
    assert err["rel_err"] < 0.02
    assert err["top1"] > 0.9
    assert all(isinstance(m, Fp8MoE) for m in q.moe_layers())
    assert len(q.moe_layers()) == len(model.moe_layers())


def test_naive_logits_close_on_benign_model(base):
    model, ids, cal, ref = base
    q = quantize_model(copy.deepcopy(model), cal, method="naive")
    err = logit_error(ref, _logits(q, ids))
    assert err["rel_err"] < 0.05 and err["top1"] > 0.85
    moe = q.moe_layers()[0]
    # one weight scale per tensor, one static activation scale per layer
    assert moe.w13_scale.unique().numel() == 1 and moe.w2_scale.unique().numel() == 1
    assert moe.act13_scale.unique().numel() == 1 and moe.act2_scale.unique().numel() == 1


def test_per_expert_weight_scales_match_kernel_reference(base):
    model, _, cal, _ = base
    q = quantize_model(copy.deepcopy(model), cal, smooth_alpha=None)
    for old, new in zip(model.moe_layers(), q.moe_layers()):
        for w_EKN, codes, scale in ((old.w13_EDF, new.w13_q, new.w13_scale), (old.w2_EFD, new.w2_q, new.w2_scale)):
            data, ref_scale = quantize_fp8_ref(w_EKN.detach().transpose(1, 2), "row", 128, torch.float8_e4m3fn)
            assert scale.shape == ref_scale.shape == w_EKN.shape[::2]          # [E, N]
            torch.testing.assert_close(scale, ref_scale, rtol=0, atol=0)
            assert torch.equal(codes.view(torch.uint8), data.view(torch.uint8))
    # with smoothing the scales are those of the smoothed weights W * s (input columns)
    qs = quantize_model(copy.deepcopy(model), cal, smooth_alpha=0.5)
    old, new = model.moe_layers()[0], qs.moe_layers()[0]
    assert not torch.allclose(new.smooth13, torch.ones_like(new.smooth13))
    w = old.w13_EDF.detach().transpose(1, 2) * new.smooth13[:, None, :]
    _, ref_scale = quantize_fp8_ref(w, "row", 128, torch.float8_e4m3fn)
    torch.testing.assert_close(new.w13_scale, ref_scale)


def test_router_embeddings_attention_head_untouched(base):
    model, _, cal, _ = base
    q = quantize_model(copy.deepcopy(model), cal)
    ref_state, q_state = model.state_dict(), q.state_dict()
    for k, v in ref_state.items():
        if "w13_EDF" in k or "w2_EFD" in k:
            assert k not in q_state                                      # the fp32 experts are gone
            continue
        assert torch.equal(q_state[k], v), k                             # router, head, attention, norms...
        assert q_state[k].dtype == v.dtype
    assert any(".router.weight" in k for k in q_state)
    for moe in q.moe_layers():
        assert moe.w13_q.dtype == moe.w2_q.dtype == torch.float8_e4m3fn
        assert moe.router.weight.dtype == torch.float32


def _outlier_expert_model():
    """Expert 0 of every MoE layer sees fc2 inputs ~1e6 x larger (its w13 x 1000, its w2 / 1e6):
    a per-layer activation scale and a per-tensor weight scale flush the other experts to zero."""
    model = _model()
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.w13_EDF[0] *= 1000
            moe.w2_EFD[0] /= 1e6
    return model


def test_expert_aware_beats_naive_with_outlier_expert(base):
    _, ids, cal, _ = base
    model = _outlier_expert_model()
    ref = _logits(model, ids)
    naive = logit_error(ref, _logits(quantize_model(copy.deepcopy(model), cal, method="naive"), ids))
    aware = logit_error(ref, _logits(quantize_model(copy.deepcopy(model), cal), ids))
    static = logit_error(ref, _logits(quantize_model(copy.deepcopy(model), cal, activation="static"), ids))
    print("naive", naive, "expert_aware", aware, "expert_aware static", static)
    assert aware["rel_err"] < 0.02 and aware["top1"] > 0.9
    assert aware["rel_err"] * 4 < naive["rel_err"]
    assert static["rel_err"] * 4 < naive["rel_err"]


def _skewed_model():
    """Experts 12..15 of every layer are rare for tokens < 200 and common for tokens >= 200. The shift
    stays small against an embedding row's own norm (~0.16): a larger one makes every token of a
    side route alike, and experts the skew does not aim at become unreachable too."""
    model = _model()
    with torch.no_grad():
        u = torch.randn(model.config.d_model, generator=torch.Generator().manual_seed(3))
        u /= u.norm()
        model.embed.weight[:200] += 0.03 * u
        model.embed.weight[200:] -= 0.03 * u
        for moe in model.moe_layers():
            moe.router.weight[12:] -= 1.0 * u
    return model


def test_oversampling_covers_rare_experts():
    model = _skewed_model()
    g = torch.Generator().manual_seed(4)
    base = [torch.randint(0, 200, (4, 32), generator=g) for _ in range(2)]
    pool = [torch.randint(0, 256, (8, 32), generator=g) for _ in range(2)] + [torch.randint(200, 256, (2, 32), generator=g)]
    minimum = 32
    stats, rep = calibrate(model, base, min_tokens_per_expert=minimum, oversample_pool=pool)
    before, after = torch.tensor(rep["before"]), torch.tensor(rep["after"])
    print({k: v for k, v in rep.items() if k not in ("before", "after")})
    L, E = before.shape
    assert (L, E) == (len(model.moe_layers()), 16)
    assert (before < minimum).any() and rep["covered_before"] < 1       # the skew made rare experts
    assert (after >= minimum).all() and rep["covered_after"] == 1.0 and rep["min_after"] >= minimum
    assert rep["oversampled_sequences"] > 0 and rep["forced"] == []
    assert (after >= before).all()
    # the statistics include the oversampled tokens: every expert has a nonzero amax now
    for s in stats:
        assert (s["amax13"].amax(1) > 0).all() and (s["amax2"].amax(1) > 0).all()
    # and the quantized model built from it runs and stays close
    ids = torch.randint(0, 256, (2, 32), generator=g)
    ref = _logits(model, ids)
    q = quantize_model(copy.deepcopy(model), base, min_tokens_per_expert=minimum, oversample_pool=pool,
                       activation="static")
    assert q.quant_report["covered_after"] == 1.0
    err = logit_error(ref, _logits(q, ids))
    assert err["rel_err"] < 0.02 and err["top1"] > 0.9


def test_unreachable_expert_gets_statistics_from_all_tokens():
    model = _model()
    with torch.no_grad():
        for moe in model.moe_layers():
            # experts 0..13 in +-w pairs: 7 logits > 0 = expert 15's logit, so 15 is never in the top-2
            moe.router.weight[1:14:2] = -moe.router.weight[0:14:2]
            moe.router.weight[15] = 0
    cal = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))]
    stats, rep = calibrate(model, cal, min_tokens_per_expert=1)
    assert all(row[15] == 0 for row in rep["after"])
    after = torch.tensor(rep["after"])
    assert sorted(rep["forced"]) == (after < 1).nonzero().tolist()          # 15 of every layer, and any other empty one
    assert all([layer, 15] in rep["forced"] for layer in range(after.shape[0]))
    assert all((s["amax2"][15] > 0).any() for s in stats)
    stats, rep = calibrate(model, cal, min_tokens_per_expert=1, route_all_for_stats=False)
    assert rep["forced"] == [] and all((s["amax2"][15] == 0).all() for s in stats)


@pytest.mark.parametrize("kw", [{}, {"method": "naive"},
                                {"activation": "static", "weight_granularity": "block2d"},
                                {"smooth_alpha": "auto", "activation": "static"}, {"smooth_alpha": 0.5}])
def test_save_load_round_trip_exact(base, tmp_path, kw):
    model, ids, cal, _ = base
    q = quantize_model(copy.deepcopy(model), cal, **kw)
    save_quantized(q, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        names = list(f.keys())
        key = next(k for k in names if k.endswith("w13_q"))
        assert f.get_tensor(key).dtype == torch.float8_e4m3fn
        assert any(k.endswith("w13_scale") for k in names)
    r = load_quantized(tmp_path)
    assert r.quant_config == q.quant_config
    s1, s2 = q.state_dict(), r.state_dict()
    assert s1.keys() == s2.keys()
    for k in s1:
        assert s1[k].dtype == s2[k].dtype and torch.equal(s1[k].view(torch.uint8) if s1[k].dtype.itemsize == 1
                                                          else s1[k], s2[k].view(torch.uint8)
                                                          if s2[k].dtype.itemsize == 1 else s2[k]), k
    assert torch.equal(_logits(q, ids), _logits(r, ids))


def test_bad_arguments(base):
    model, _, cal, _ = base
    with pytest.raises(ValueError, match="method"):
        quantize_model(copy.deepcopy(model), cal, method="int8")
    with pytest.raises(ValueError, match="activation"):
        quantize_model(copy.deepcopy(model), cal, activation="per_tensor")
    with pytest.raises(ValueError, match="calibration_batches"):
        quantize_model(copy.deepcopy(model), None)
    with pytest.raises(ValueError, match="smooth_alpha"):
        quantize_model(copy.deepcopy(model), cal, smooth_alpha="best")
    # dynamic activations without smoothing need no calibration
    q = quantize_model(copy.deepcopy(model), None, smooth_alpha=None)
    assert q.quant_report is None and isinstance(q.moe_layers()[0], MoE)


def test_expert_sqnr_reports_naive_failure_on_outlier_expert(base):
    _, ids, cal, _ = base
    model = _outlier_expert_model()
    aware = expert_sqnr(model, quantize_model(copy.deepcopy(model), cal), ids)
    naive = expert_sqnr(model, quantize_model(copy.deepcopy(model), cal, method="naive"), ids)
    assert len(aware) == len(model.moe_layers())
    def worst(rows, key):
        return min(v for r in rows for v in r[key] if not math.isnan(v))
    print({k: (round(worst(aware, k), 1), round(worst(naive, k), 1)) for k in ("w13", "w2", "x13", "x2")})
    for k in ("w13", "w2", "x13", "x2"):
        assert worst(aware, k) > 20                  # e4m3 row-wise: ~30 dB
    assert worst(naive, "w2") < worst(aware, "w2") - 10 and worst(naive, "x2") < worst(aware, "x2") - 10


def test_time_moe_layers(base):
    model, _, _, _ = base
    q = quantize_model(copy.deepcopy(model), None, smooth_alpha=None)
    t = time_moe_layers(model.moe_layers()[0], q.moe_layers()[0], num_tokens=256, iters=3, warmup=1)
    print(t)
    assert t["fp_ms"] > 0 and t["fp8_ms"] > 0 and t["speedup"] > 0


def test_bf16_model_with_shared_expert_round_trip(tmp_path):
    torch.manual_seed(0)
    config = CompassConfig.from_preset("tiny", dtype="bfloat16", shared_expert_dim=32, n_dense_layers=1,
                                       n_layers=2, mtp_depth=0)
    model = CompassForCausalLM(config).eval()
    ids = torch.randint(0, 256, (2, 32))
    ref = _logits(model, ids)
    q = quantize_model(copy.deepcopy(model), [torch.randint(0, 256, (4, 32))])
    out = _logits(q, ids)
    assert out.dtype == torch.bfloat16
    err = logit_error(ref, out)
    assert err["rel_err"] < 0.03 and err["top1"] > 0.9
    moe = q.moe_layers()[0]
    assert moe.shared.w1.weight.dtype == torch.bfloat16 and moe.router.weight.dtype == torch.float32
    save_quantized(q, tmp_path)
    r = load_quantized(tmp_path)
    assert r.moe_layers()[0].shared.w1.weight.dtype == torch.bfloat16
    assert torch.equal(_logits(r, ids), out)


# ---------------------------------------------------------------------------------------------
# smooth_alpha="auto": per-expert alpha search on the calibration rows


def _gemm_errors(model_fp, model_q, samples):
    """Per layer, GEMM ("fc1", "fc2") and expert: ``||y_q - y|| / ||y||`` of the quantized module's
    GEMM (its own activation quantization, smoothing and weights) on ``samples[layer][e]`` rows
    (fc2: their SwiGLU output through the full-precision fc1); nan for an expert without rows."""
    out = []
    for fp, q, rows in zip(model_fp.moe_layers(), model_q.moe_layers(), samples):
        E = q.num_experts
        w13 = fp.w13_EDF.detach().float().transpose(1, 2)
        w2 = fp.w2_EFD.detach().float().transpose(1, 2)
        errs = {"fc1": [], "fc2": []}
        for e, x in enumerate(rows):
            if x.shape[0] == 0:
                errs["fc1"].append(float("nan"))
                errs["fc2"].append(float("nan"))
                continue
            offsets = torch.tensor([0] * (e + 1) + [x.shape[0]] * (E - e), dtype=torch.int64)
            gate, up = (x @ w13[e].T).chunk(2, dim=-1)
            a = torch.nn.functional.silu(gate) * up
            for name, wname, act, w, smooth, static in (("fc1", "w13", x, w13, q.smooth13, q.act13_scale),
                                                        ("fc2", "w2", a, w2, q.smooth2, q.act2_scale)):
                y = ck.grouped_gemm_fp8(q._quantize_act(act, offsets, smooth, static), q._w(wname), offsets,
                                        out_dtype=torch.float32)
                ref = act @ w[e].T
                errs[name].append(float((y.double() - ref.double()).norm() / ref.double().norm()))
        out.append(errs)
    return out


def _samples(model, cal):
    stats, _ = calibrate(model, cal, sample_rows=256)
    return [s["samples13"] for s in stats]


def _fc2_outlier_model(mult: float = 1e6):
    """Expert 0 of every MoE layer: fc2 input channel 3 ~1e6 x larger than the others (its up
    projection column x 1e6, w2's input row / 1e6; the product is unchanged)."""
    model = _model()
    Fd = model.config.expert_ffn_dim
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.w13_EDF[0, :, Fd + 3] *= mult
            moe.w2_EFD[0, 3, :] /= mult
    return model


def test_auto_smoothing_picks_alpha_for_outlier_channel(base):
    _, ids, cal, _ = base
    model = _fc2_outlier_model()
    auto = quantize_model(copy.deepcopy(model), cal)                 # "auto" is the default
    plain = quantize_model(copy.deepcopy(model), cal, smooth_alpha=None)
    rep = auto.quant_report
    assert len(rep["smooth_alphas"]) == len(model.moe_layers()) and rep["smooth_grid"][0] is None
    samples = _samples(model, cal)
    e_auto, e_plain = _gemm_errors(model, auto, samples), _gemm_errors(model, plain, samples)
    for layer, (alphas, a, p) in enumerate(zip(rep["smooth_alphas"], e_auto, e_plain)):
        assert len(alphas["fc1"]) == len(alphas["fc2"]) == model.config.num_experts
        print(layer, alphas["fc2"][0], a["fc2"][0], p["fc2"][0])
        assert alphas["fc2"][0] is not None and alphas["fc2"][0] > 0
        assert a["fc2"][0] < 0.25 * p["fc2"][0]                      # the outlier flushes the other channels
        assert not torch.allclose(auto.moe_layers()[layer].smooth2[0], torch.ones(model.config.expert_ffn_dim))
    # the model as a whole: auto smoothing recovers the logits no smoothing loses
    ref = _logits(model, ids)
    assert logit_error(ref, _logits(auto, ids))["rel_err"] < logit_error(ref, _logits(plain, ids))["rel_err"]


@pytest.mark.parametrize("kw", [{}, {"activation": "static"},
                                {"activation": "dynamic_block", "weight_granularity": "block2d"}])
def test_auto_smoothing_never_worse_than_none_on_calibration_rows(base, kw):
    model, _, cal, _ = base
    auto = quantize_model(copy.deepcopy(model), cal, smooth_alpha="auto", **kw)
    plain = quantize_model(copy.deepcopy(model), cal, smooth_alpha=None, **kw)
    e_auto, e_plain = _gemm_errors(model, auto, _samples(model, cal)), _gemm_errors(model, plain, _samples(model, cal))
    n = 0
    for layer, (a, p, search) in enumerate(zip(e_auto, e_plain, auto.quant_report["smooth_search"])):
        for g in ("fc1", "fc2"):
            for e, (ea, ep) in enumerate(zip(a[g], p[g])):
                if math.isnan(ep):
                    continue
                assert ea <= ep * (1 + 1e-9), (layer, g, e, ea, ep)
                # the search measured the same thing as the module does
                pick = auto.quant_report["smooth_alphas"][layer][g][e]
                assert ea == pytest.approx(search[g][e][list(auto.quant_report["smooth_grid"]).index(pick)], rel=1e-9)
                assert ep == pytest.approx(search[g][e][0], rel=1e-9)
                n += 1
    assert n > 0


def test_auto_smoothing_expert_without_rows_is_not_smoothed():
    model = _model()
    with torch.no_grad():
        for moe in model.moe_layers():      # expert 15 is never in the top-2 (see the test above)
            moe.router.weight[1:14:2] = -moe.router.weight[0:14:2]
            moe.router.weight[15] = 0
    cal = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(5))]
    q = quantize_model(copy.deepcopy(model), cal, activation="static")
    for alphas, moe in zip(q.quant_report["smooth_alphas"], q.moe_layers()):
        assert alphas["fc1"][15] is None and alphas["fc2"][15] is None
        assert torch.equal(moe.smooth13[15], torch.ones_like(moe.smooth13[15]))
        assert torch.equal(moe.smooth2[15], torch.ones_like(moe.smooth2[15]))


def test_auto_sample_rows_bounded(base):
    model, _, cal, _ = base
    stats, _ = calibrate(model, cal, sample_rows=8)
    for s in stats:
        assert all(x.shape[0] == min(8, int(c)) for x, c in zip(s["samples13"], s["count"]))
    stats2, _ = calibrate(model, cal, sample_rows=8)
    assert all(torch.equal(x, y) for s, t in zip(stats, stats2) for x, y in zip(s["samples13"], t["samples13"]))
