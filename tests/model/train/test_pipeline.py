"""Every stage end to end (a few steps each), the report's documented keys, resume skipping finished
stages, and the CLI entry points (train / eval / generate / quantize) on the result."""

from __future__ import annotations

import json

import pytest

from compass_model import CompassConfig
from compass_model.cli import main
from compass_model.data import ByteTokenizer
from compass_model.train.pipeline import run_pipeline
from compass_model.train.stages import demo_stages

CFG = CompassConfig.from_preset("tiny")
EVAL = {"n_tasks": 14, "n_long": 2, "n_docs": 8, "n_speculative": 2}
NAMES = ["general", "ecommerce", "reasoning", "long_context_2x", "long_context_4x", "sft", "align"]


def _stages():
    small = {"general": dict(rows=2), "ecommerce": dict(rows=2), "reasoning": dict(rows=2),
             "long_context_2x": dict(rows=1), "long_context_4x": dict(rows=1), "sft": dict(rows=2),
             "align": dict(rows=2, n_pairs=4, eval_pairs=3)}
    return [s.replace(steps=2, warmup_steps=1, **small[s.name]) for s in demo_stages()]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline")
    report = run_pipeline(out, CFG, _stages(), ByteTokenizer(), progress=False, eval_kwargs=EVAL, fp8=True)
    return out, report


def test_every_stage_runs_and_reports(run):
    out, report = run
    assert [s["name"] for s in report["stages"]] == NAMES
    for s in report["stages"]:
        assert s["steps"] == 2 and s["loss_first"] > 0 and s["seconds"] > 0, s
    on_disk = json.loads((out / "report.json").read_text())
    assert set(on_disk) >= {"stages", "eval", "alignment", "router", "fp8"}
    assert set(on_disk["eval"]) >= {"per_language", "long_context", "speculative", "perplexity"}
    assert set(on_disk["alignment"]) >= {"dpo", "otpo"} and on_disk["alignment"]["sft_weight"] == 0.0
    assert set(on_disk["eval_sft"]) == {"accuracy", "per_language", "per_family"}   # before alignment
    lc = on_disk["eval"]["long_context"]
    assert set(lc) == {"1x", "4x", "4x_without_extension"}
    assert "accuracy" in lc["4x"] and lc["4x"]["context"] == 1024          # the YaRN phases made room for 4x
    no_ext = lc["4x_without_extension"]                                    # reasoning's model, plain RoPE
    assert "accuracy" in no_ext and no_ext["rope_scaling"] == "none" and "reasoning" in no_ext["checkpoint"]
    spec = on_disk["eval"]["speculative"]
    assert 0 <= spec["acceptance_rate"] <= 1 and spec["speedup"] > 0 and spec["identical"] is True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "loss" in r for r in metrics)
    assert {r["stage"] for r in metrics} >= set(NAMES[:-1]) | {"align-dpo", "align-otpo"}
    # two YaRN phases, each extending the previous stage's context: 256 -> 512 (x2) -> 1024 (x4 over 256)
    for stage, factor, length in (("long_context_2x", 2.0, 512), ("long_context_4x", 4.0, 1024), ("sft", 4.0, 1024)):
        cfg = json.loads((out / "checkpoints" / stage / "step-000002" / "config.json").read_text())
        assert cfg["rope_scaling"] == "yarn" and cfg["rope_factor"] == factor and cfg["max_seq_len"] == length
        assert cfg["rope_original_max_len"] == 256
    # the MTP loss at the preset's weight on every step of every pretraining stage and of SFT
    assert all(r["mtp_weight"] == CFG.mtp_loss_weight and r["mtp"] > 0 for r in metrics if r["stage"] in NAMES[:-1])
    # the aux coefficient follows the preset's decay (the step counter runs on across stages)
    coef = [r["aux_coef"] for r in metrics if r["stage"] in NAMES[:-1]]
    assert coef[0] == pytest.approx(CFG.aux_loss_coef) and all(a > b for a, b in zip(coef, coef[1:]))
    for name in ("loss.png", "expert_load.png", "load_balance.png", "accuracy.png"):
        assert (out / "plots" / name).stat().st_size > 1000


def test_alignment_reports_the_nll_term_both_ways(run):
    """The demo aligns once as the paper does (no NLL term on chosen answers) and once with it, from the
    same SFT model and pairs, and says in report.json which one the final model used and why."""
    out, report = run
    nll = json.loads((out / "report.json").read_text())["alignment"]["nll_term"]
    assert nll["used"] is False and nll["weight"] == 1.0 and "paper" in nll["why"]
    assert nll["accuracy_without"] == report["eval"]["accuracy"]          # the final model is the one without
    assert 0 <= nll["accuracy_with"] <= 1 and set(nll["with"]) == {"accuracy", "retrieval_1x", "retrieval_4x"}
    assert (out / "align-nll-other" / "pairs.json").read_text() == (out / "pairs.json").read_text()


def test_resume_skips_finished_stages(run):
    out, report = run
    before = (out / "metrics.jsonl").read_text()
    again = run_pipeline(out, CFG, _stages(), ByteTokenizer(), resume=True, progress=False, evaluate=False)
    assert (out / "metrics.jsonl").read_text() == before                  # nothing retrained
    assert [s["loss_last"] for s in again["stages"]] == [s["loss_last"] for s in report["stages"]]


def test_partial_run_still_reports_4x_without_extension(run):
    """A later call that trains only the last stages (here: resumes align) evaluates against the
    checkpoint the earlier call's YaRN phases started from."""
    out, _ = run
    again = run_pipeline(out, CFG, [s for s in _stages() if s.name == "align"], ByteTokenizer(), resume=True,
                         progress=False, eval_kwargs={**EVAL, "n_tasks": 7, "n_speculative": 0})
    no_ext = again["eval"]["long_context"]["4x_without_extension"]
    assert "reasoning" in no_ext["checkpoint"] and no_ext["rope_scaling"] == "none"


def test_cli_on_the_run(run, capsys, tmp_path):
    out, report = run
    ckpt = report["final_checkpoint"]
    assert main(["generate", "--checkpoint", ckpt, "--prompt", "Listing: Milo", "--max-new-tokens", "8"]) == 0
    assert main(["eval", "--checkpoint", ckpt, "--n-tasks", "7", "--out", str(tmp_path / "ev.json")]) == 0
    assert "per_language" in json.loads((tmp_path / "ev.json").read_text())
    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--stages", "general", "--steps", "2", "--no-eval",
                 "--no-progress", "--out", str(tmp_path / "t")]) == 0
    assert "general" in capsys.readouterr().out
    lines = (tmp_path / "t" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1]


def test_stage_context_must_fit(tmp_path):
    bad = [demo_stages()[2].replace(steps=1, seq_len=512)]               # reasoning at 2x without YaRN
    with pytest.raises(ValueError, match="max_seq_len"):
        run_pipeline(tmp_path, CFG, bad, ByteTokenizer(), progress=False, evaluate=False)


def test_train_from_config_file_and_bf16(tmp_path, capsys):
    cfg = {"model": {"preset": "tiny", "n_layers": 1, "max_seq_len": 128},
           "stages": [{"name": "general", "steps": 2, "rows": 2, "seq_len": 64, "precision": "bf16"}]}
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--stages", "general", "--no-eval",
                 "--no-progress", "--out", str(tmp_path / "o")]) == 0
    rec = [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 2 and all(0 < r["loss"] < 10 for r in rec)
    saved = json.loads((tmp_path / "o" / "checkpoints" / "general" / "step-000002" / "config.json").read_text())
    assert saved["n_layers"] == 1
    (tmp_path / "bad.json").write_text(json.dumps({"stages": [{"name": "general", "stepz": 2}]}))
    assert main(["train", "--config", str(tmp_path / "bad.json"), "--stages", "general",
                 "--out", str(tmp_path / "b")]) == 1
    assert "stepz" in capsys.readouterr().err


def test_kernel_commands(capsys):
    assert main(["info"]) == 0
    assert "chosen" in capsys.readouterr().out
    assert main(["route-demo", "--tokens", "64", "--hidden", "32", "--reps", "1", "--system-malloc"]) == 0
    assert "speed-up" in capsys.readouterr().out
