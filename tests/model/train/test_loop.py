"""The one training loop (compass_model.train.loop) and its objectives: the optimizer's groups, a
pluggable objective, the stages and the experiments sharing one loop, alignment's optimizer groups,
progress and logging."""

from __future__ import annotations

import logging

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.data import ByteTokenizer
from compass_model.experiments.common import small_config, train_lm
from compass_model.train import align
from compass_model.train.data import StageData
from compass_model.train.loop import LoopConfig, make_optimizer, train_loop
from compass_model.train.metrics import MetricsWriter, read_metrics
from compass_model.train.objectives import LMObjective
from compass_model.train.stages import StageConfig
from compass_model.train.state import latest_checkpoint, stage_done, trainer_state
from compass_model.train.trainer import train_stage

TOK = ByteTokenizer()
PAIRS = [
    {"prompt": "Color of sky?", "chosen": "blue", "rejected": "grass"},
    {"prompt": "2+2=", "chosen": "4", "rejected": "five"},
    {"prompt": "Say hi", "chosen": "hi", "rejected": "bye"},
    {"prompt": "Animal that barks?", "chosen": "dog", "rejected": "cat"},
]


def _model(seed=0, **over):
    torch.manual_seed(seed)
    return CompassForCausalLM(CompassConfig.from_preset("tiny", n_layers=1, max_seq_len=64, **over))


def test_make_optimizer_decays_matrices_only():
    model = _model()
    opt = make_optimizer(model, 1e-3, 0.1)
    decay, other = opt.param_groups
    assert decay["weight_decay"] == 0.1 and other["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in other["params"])
    assert "embed.weight" in {names[id(p)] for p in decay["params"]}               # as the stages always had it
    assert any("norm" in names[id(p)] for p in other["params"])
    assert len(decay["params"]) + len(other["params"]) == sum(1 for p in model.parameters() if p.requires_grad)
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_loop_config_rejects_bad_values():
    with pytest.raises(ValueError, match="save_every >= 1"):
        LoopConfig("x", steps=2, lr=1e-3, save_every=0)
    with pytest.raises(ValueError, match="steps >= 0"):
        LoopConfig("x", steps=-1, lr=1e-3)


class _MeanLogit:
    """A made-up objective: push the mean logit of a fixed batch down, in two micro-batches."""

    def __init__(self):
        torch.manual_seed(1)
        self.ids = torch.randint(0, 200, (4, 16))

    def micro_batches(self, step):
        return [self.ids[:2], self.ids[2:]]

    def begin_step(self, model, micro, step):
        self.n = len(micro)

    def loss(self, model, ids):
        loss = model(ids).logits.float().mean() / self.n
        return loss, {"loss": float(loss.detach())}

    def end_step(self, sums):
        return sums


def test_a_new_objective_plugs_in(tmp_path):
    model = _model()
    metrics = MetricsWriter(tmp_path / "m.jsonl")
    cfg = LoopConfig("custom", steps=4, lr=1e-2, warmup_steps=1, save_every=2)
    recs = train_loop(model, _MeanLogit(), cfg, stage_dir=tmp_path / "ckpt", metrics=metrics)
    assert [r["step"] for r in recs] == [0, 1, 2, 3] and all(r["stage"] == "custom" for r in recs)
    assert {"loss", "lr", "grad_norm", "seconds"} <= set(recs[0])
    assert recs[-1]["loss"] < recs[0]["loss"]
    assert read_metrics(metrics.path) == recs
    assert stage_done(tmp_path / "ckpt") and trainer_state(latest_checkpoint(tmp_path / "ckpt"))["step"] == 4
    assert int(model.step) == 4                              # after_optimizer_step once per step


def test_stages_and_experiments_share_the_loop(tmp_path):
    """The experiments' ``train_lm`` and a pretraining stage with the same settings are one loop:
    the same losses, bit for bit."""
    cfg = small_config(n_layers=1, max_seq_len=64)
    data = StageData("ecommerce", TOK, 64, 2, seed=3, pool_size=60)
    lm = train_lm(cfg, data, 4, lr=3e-3, warmup=2, seed=0)
    stage = StageConfig("ecommerce", steps=4, rows=2, seq_len=64, lr=3e-3, warmup_steps=2)
    torch.manual_seed(0)
    model = CompassForCausalLM(cfg)
    metrics = MetricsWriter(tmp_path / "m.jsonl")
    train_stage(model, stage, data, tmp_path / "ckpt", metrics, progress=False)
    assert [r["loss"] for r in read_metrics(metrics.path)] == [r["loss"] for r in lm["records"]]
    for (k, a), b in zip(model.state_dict().items(), lm["model"].state_dict().values()):
        assert torch.equal(a, b), k


def test_lm_objective_counts_assignments_per_block():
    model = _model(num_experts=4, top_k=2)
    data = StageData("general", TOK, 32, 2, pool_size=20)
    obj = LMObjective(data, grad_accum=2, per_block_load=True)
    micro = obj.micro_batches(0)
    obj.begin_step(model, micro, 0)
    sums = {}
    for b in micro:
        _, m = obj.loss(model, b)
        sums = {k: sums.get(k, 0.0) + v for k, v in m.items()}
    fields = obj.end_step(sums)
    assert fields["tokens"] == sum(float(b.loss_mask()[b.labels != -100].sum()) for b in micro)
    (counts,) = fields["block_counts"]                       # one MoE block
    assert sum(counts) == 2 * 2 * 32 * 2                     # micro-batches x rows x seq_len x top_k
    assert len(fields["expert_load"]) == 4 and sum(fields["expert_load"]) == pytest.approx(1.0, abs=1e-4)


def test_alignment_decays_matrices_only():
    """Alignment builds its optimizer with the shared groups: weight decay moves matrices, never the
    norm weights (which a single AdamW group over ``model.parameters()`` decayed)."""
    batch = align.encode_pairs(PAIRS, TOK, 64)
    base = _model()
    ref = align.reference_logprobs(base, batch)
    out = {}
    for wd in (0.0, 0.5):
        model = _model()
        align.train_preference(model, batch, ref, method="dpo", steps=1, lr=1e-2, micro_batch=4, weight_decay=wd)
        out[wd] = dict(model.named_parameters())
    vectors = [n for n, p in out[0.0].items() if p.dim() < 2]
    matrices = [n for n, p in out[0.0].items() if p.dim() >= 2]
    assert any("norm" in n for n in vectors)
    for n in vectors:
        assert torch.equal(out[0.0][n], out[0.5][n]), n
    decayed = [n for n in matrices if not torch.equal(out[0.0][n], out[0.5][n])]   # those with a gradient
    assert "embed.weight" in decayed and len(decayed) > len(matrices) // 2


def test_alignment_training_reports_progress(caplog):
    batch = align.encode_pairs(PAIRS, TOK, 64)
    model = _model()
    ref = align.reference_logprobs(model, batch)
    with caplog.at_level(logging.INFO, logger="compass"):
        align.train_preference(model, batch, ref, method="otpo", steps=2, lr=1e-3, micro_batch=2, progress=True)
        align.preference_accuracy(model, batch, ref, desc="preference accuracy")
    msgs = [r.getMessage().strip() for r in caplog.records]
    assert any(m.startswith("align-otpo: 2/2") and "loss=" in m for m in msgs), msgs
    assert any(m.startswith("preference accuracy: 4/4") for m in msgs), msgs


def test_resuming_a_one_group_optimizer_state_names_the_checkpoint(tmp_path):
    """Alignment once kept one AdamW group; such a checkpoint cannot resume into the shared groups."""
    from compass_model.train.state import save_checkpoint
    batch = align.encode_pairs(PAIRS, TOK, 64)
    model = _model()
    ref = align.reference_logprobs(model, batch)
    old = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, model, old, 1)
    with pytest.raises(ValueError, match="1 parameter group.*start the stage afresh") as e:
        align.train_preference(model, batch, ref, method="dpo", steps=2, lr=1e-3, micro_batch=4,
                               stage_dir=tmp_path, resume=True)
    assert str(tmp_path) in str(e.value)
