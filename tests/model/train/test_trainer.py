"""The stage trainer: schedule, global token normalisation under gradient accumulation, resume after
a kill gives the uninterrupted run's next steps exactly, atomic checkpoints, stage configs."""

from __future__ import annotations

import json
import math

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.data import ByteTokenizer, PackedBatch
from compass_model.train.data import StageData
from compass_model.train.metrics import MetricsWriter, read_metrics
from compass_model.train.schedule import lr_at
from compass_model.train.stages import (
    STAGES,
    StageConfig,
    demo_stages,
    load_stages,
    select_stages,
)
from compass_model.train.state import (
    latest_checkpoint,
    load_model,
    save_checkpoint,
    stage_done,
    trainer_state,
)
from compass_model.train.trainer import (
    accumulate_gradients,
    make_optimizer,
    train_stage,
)

TOK = ByteTokenizer()
CFG = CompassConfig.from_preset("tiny", n_layers=1, max_seq_len=64)


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return CompassForCausalLM(CFG.replace(**over))


def test_lr_schedule():
    lrs = [lr_at(s, 20, 1.0, warmup_steps=4, min_ratio=0.1) for s in range(20)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))          # cosine decays monotonically
    assert lrs[-1] == pytest.approx(0.1)
    assert lr_at(10, 20, 1.0, 0, 0.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 10 / 19)))
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, 0, 1.0)


def _cat(a: PackedBatch, b: PackedBatch) -> PackedBatch:
    return PackedBatch(*(torch.cat([x, y]) for x, y in zip(
        (a.input_ids, a.labels, a.position_ids, a.doc_ids, a.prompt_mask, a.response_mask, a.prompt_weight),
        (b.input_ids, b.labels, b.position_ids, b.doc_ids, b.prompt_mask, b.response_mask, b.prompt_weight))))


def test_global_token_normalisation():
    """Two micro-batches with different token counts give the gradient of one batch holding both
    (the token mean over the step), not the mean of the two batch means: the LM and the MTP term
    (on at the preset's weight, as SFT trains it)."""
    model = _model(aux_loss_coef=0.0, z_loss_coef=0.0, max_seq_len=256).double()
    stage = StageConfig("sft", steps=1, rows=2, seq_len=256)
    assert stage.mtp_weight(model.config) > 0
    data = StageData("sft", TOK, 256, 2, pool_size=50)
    b1, b2 = data.micro_batches(0, 2)
    n1, n2 = (float(b.loss_mask()[b.labels != -100].sum()) for b in (b1, b2))
    assert n1 != n2
    accumulate_gradients(model, [b1, b2], stage, 0)
    g_acc = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    accumulate_gradients(model, [_cat(b1, b2)], stage, 0)
    g_one = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    for a, b in zip(g_acc, g_one):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)       # the CE is fp32
    # the control: averaging per-batch means is a different gradient
    model.zero_grad()
    for b in (b1, b2):
        out = model(b.input_ids, b.labels, b.loss_mask(), b.position_ids, b.attention_mask())
        (out.losses["lm"] / 2).backward()
    g_means = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    assert max((a - b).abs().max().item() for a, b in zip(g_means, g_one)) > 1e-3


def _run(tmp_path, name, stop_after=None, resume=False, steps=6):
    stage = StageConfig("ecommerce", steps=steps, rows=2, seq_len=64, warmup_steps=2, grad_accum=2)
    data = StageData("ecommerce", TOK, 64, 2, seed=3, pool_size=60)
    sdir = tmp_path / name / "ckpt"
    metrics = MetricsWriter(tmp_path / name / "metrics.jsonl")
    ckpt = latest_checkpoint(sdir) if resume else None
    model = load_model(ckpt) if ckpt is not None else _model(1)
    train_stage(model, stage, data, sdir, metrics, resume=resume, progress=False, stop_after=stop_after)
    return read_metrics(metrics.path), sdir, model


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    full, _, m_full = _run(tmp_path, "full")
    part, sdir, _ = _run(tmp_path, "part", stop_after=3)                   # "killed" after 3 steps
    assert [r["step"] for r in part] == [0, 1, 2] and not stage_done(sdir)
    # a stray metrics line of a step that never reached its checkpoint is dropped on resume
    MetricsWriter(tmp_path / "part" / "metrics.jsonl").write({"stage": "ecommerce", "step": 3, "loss": 99.0})
    resumed, sdir, m_res = _run(tmp_path, "part", resume=True)
    assert [r["step"] for r in resumed] == list(range(6)) and stage_done(sdir)
    for a, b in zip(full, resumed):
        assert a["loss"] == b["loss"], (a["step"], a["loss"], b["loss"])   # bit-identical next steps
    for (k, a), b in zip(m_full.state_dict().items(), m_res.state_dict().values()):
        assert torch.equal(a, b), k
    assert int(m_res.step) == 6


def test_checkpoint_is_atomic(tmp_path):
    model = _model()
    opt = make_optimizer(model, 1e-3, 0.0)
    save_checkpoint(tmp_path, model, opt, 2)
    (tmp_path / ".tmp-step-000003").mkdir()              # a save killed before its rename
    assert latest_checkpoint(tmp_path).name == "step-000002"
    save_checkpoint(tmp_path, model, opt, 3, done=True)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-000003"]
    assert trainer_state(latest_checkpoint(tmp_path))["done"] is True
    (tmp_path / "LATEST").write_text("step-000009\n")
    with pytest.raises(FileNotFoundError, match="corrupt"):
        latest_checkpoint(tmp_path)


def test_stage_configs(tmp_path):
    stages = demo_stages()
    assert [s.kind for s in stages] == [k for k in STAGES if k != "mtp"][:3] + ["long_context"] * 2 + ["sft", "align"]
    assert select_stages(stages, "sft,general")[0].name == "general"          # recipe order
    with pytest.raises(ValueError, match="unknown stages"):
        select_stages(stages, "general,pretrain")
    with pytest.raises(ValueError, match="steps must be an int"):
        StageConfig("general", steps=-1)
    with pytest.raises(ValueError, match="stage name"):
        StageConfig("warmup", steps=1)
    p = tmp_path / "stages.json"
    p.write_text(json.dumps({"stages": [{"name": "general", "steps": 3, "lr": 1e-3}]}))
    assert load_stages(p)[0].lr == 1e-3
    p.write_text(json.dumps({"stages": [{"name": "general", "steps": 3, "lr_max": 1e-3}]}))
    with pytest.raises(ValueError, match="unknown keys"):
        load_stages(p)


def test_stage_data_is_deterministic_and_masked():
    d = StageData("sft", TOK, 256, 4, seed=0, pool_size=100)
    a, b = d.micro_batches(5, 1)[0], d.micro_batches(5, 1)[0]
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, d.micro_batches(6, 1)[0].input_ids)
    # general samples: answer-only (prompt weight 0); generated tasks: full sequence (weight 1)
    weights = set(d.samples[i][2] for i in range(len(d.samples)))
    assert weights == {0.0, 1.0}
    m = a.loss_mask()
    assert ((m > 0) <= (a.labels != -100)).all()


def test_user_text_data(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "hello world"}\n{"text": "selamat pagi"}\n')
    d = StageData("general", TOK, 32, 2, data_file=str(p))
    assert len(d.docs) == 2 and d.micro_batches(0, 1)[0].input_ids.shape == (2, 32)
    p.write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    with pytest.raises(ValueError, match="t.jsonl:2"):
        StageData("general", TOK, 32, 2, data_file=str(p))


def test_metrics_ignore_a_partial_last_line(tmp_path):
    """A run killed mid-append (or a reader racing the append) leaves a line without its newline:
    readers skip it and a resumed run's truncation drops it."""
    m = MetricsWriter(tmp_path / "metrics.jsonl")
    for step in range(3):
        m.write({"stage": "general", "step": step, "loss": 1.0})
    with m.path.open("a") as f:
        f.write('{"stage": "general", "step": 3, "')
    assert [r["step"] for r in read_metrics(m.path)] == [0, 1, 2]
    m.truncate_after("general", 2)
    assert m.path.read_text().endswith("\n")
    assert [r["step"] for r in read_metrics(m.path)] == [0, 1]
