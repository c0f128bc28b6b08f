"""Stage configs: long_context_* phases, recipe order, the MTP weight each stage trains with, and
YaRN phases that compound against the pre-extension length."""

from __future__ import annotations

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.train.pipeline import extend_context
from compass_model.train.stages import StageConfig, demo_stages, select_stages

TINY = CompassConfig.from_preset("tiny", max_seq_len=64)


def test_long_context_phases_are_one_kind_in_given_order():
    a, b = StageConfig("long_context_4x", steps=1), StageConfig("long_context_2x", steps=1)
    assert a.kind == b.kind == "long_context" and a.data_kind == "long_context"
    sft, gen = StageConfig("sft", steps=1), StageConfig("general", steps=1)
    picked = select_stages([sft, a, gen, b], "sft,long_context_2x,general,long_context_4x")
    assert [s.name for s in picked] == ["general", "long_context_4x", "long_context_2x", "sft"]
    for bad in ("long_context_", "pretrain", "long-context"):
        with pytest.raises(ValueError, match="long_context_<suffix>"):
            StageConfig(bad, steps=1)
    with pytest.raises(ValueError, match="unknown stages"):
        select_stages([sft], "sft,warmup")


def test_demo_has_two_yarn_phases_and_no_separate_mtp_stage():
    stages = demo_stages()
    assert [s.name for s in stages] == ["general", "ecommerce", "reasoning", "long_context_2x", "long_context_4x",
                                        "sft", "align"]
    assert [s.rope_factor for s in stages if s.kind == "long_context"] == [2.0, 2.0]
    assert [s.seq_len for s in stages if s.kind == "long_context"] == [512, 1024]
    assert stages[-1].sft_weight == 0.0                      # the NLL term is off unless asked for


def test_mtp_weight_follows_the_preset_in_pretraining_and_sft():
    cfg = CompassConfig.from_preset("tiny")
    for name in ("general", "ecommerce", "reasoning", "long_context_2x", "mtp", "sft"):
        assert StageConfig(name, steps=1).mtp_weight(cfg) == cfg.mtp_loss_weight
    assert StageConfig("align", steps=1).mtp_weight(cfg) == 0.0
    assert StageConfig("sft", steps=1, mtp_loss_weight=0.0).mtp_weight(cfg) == 0.0        # SFT may turn it off
    assert StageConfig("general", steps=1, mtp_loss_weight=0.5).mtp_weight(cfg) == 0.5
    assert StageConfig("general", steps=1).mtp_weight(cfg.replace(mtp_depth=0)) == 0.0    # no MTP module
    with pytest.raises(ValueError, match="mtp_loss_weight"):
        StageConfig("general", steps=1, mtp_loss_weight=-0.1)


def test_yarn_phases_compound_against_the_original_length():
    torch.manual_seed(0)
    model = CompassForCausalLM(TINY)
    extend_context(model, 2.0)
    c = model.config
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len, c.max_seq_len) == ("yarn", 2.0, 64, 128)
    extend_context(model, 2.0)
    c = model.config
    assert (c.rope_scaling, c.rope_factor, c.rope_original_max_len, c.max_seq_len) == ("yarn", 4.0, 64, 256)
    direct = CompassForCausalLM(TINY.replace(rope_scaling="yarn", rope_factor=4.0, rope_original_max_len=64,
                                             max_seq_len=256))
    torch.testing.assert_close(model.rope_cos, direct.rope_cos, rtol=0, atol=0)
    torch.testing.assert_close(model.rope_sin, direct.rope_sin, rtol=0, atol=0)
