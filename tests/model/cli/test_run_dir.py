"""The run directory: --out rules, the lock, the config+seed fingerprint on --resume, and a partial
run (--stages align) continuing an earlier run's SFT model."""

from __future__ import annotations

import json
import shutil

from compass_model.cli import main
from compass_model.train import rundir


def _steps(out):
    return [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_non_empty_out_needs_resume_or_overwrite(train, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out) == 0
    capsys.readouterr()
    assert train(out) == 1                                   # a fresh run into an old run's directory
    err = capsys.readouterr().err
    assert "not empty" in err and "--resume" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert _steps(out) == [0, 1]                             # the old run is untouched
    assert train(out, "--overwrite", steps=3) == 0
    assert _steps(out) == [0, 1, 2]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert train(tmp_path / "other") == 1                    # any non-empty directory, not only runs
    assert train(tmp_path / "other", "--overwrite") == 0
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"   # --overwrite removes run files only


def test_second_trainer_into_the_same_dir_fails(train, tmp_path, capsys):
    out = tmp_path / "run"
    with rundir.locked(out):                                 # another trainer holds the directory
        assert train(out) == 1
        assert train(out, "--resume") == 1
    err = capsys.readouterr().err
    assert err.count("in use by another compass train") == 2
    assert not (out / "metrics.jsonl").exists()
    assert train(out) == 0                                   # the holder left: the lock is free


def test_resume_refuses_another_config_or_seed(train, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out) == 0
    capsys.readouterr()
    assert main(["train", "--preset", "small", "--stages", "general", "--steps", "1", "--no-eval",
                 "--no-progress", "--device", "cpu", "--resume", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "another model config or seed" in err and "d_model" in err
    assert train(out, "--resume", "--seed", "1") == 1
    assert "seed 0 -> 1" in capsys.readouterr().err
    (out / "run.json").unlink()                               # the checkpoints carry the fingerprint too
    assert train(out, "--resume", "--seed", "1") == 1
    assert "step-000002" in capsys.readouterr().err
    assert train(out, "--resume") == 0                        # the same run resumes (nothing left to do)
    assert _steps(out) == [0, 1]


def test_align_resume_on_a_finished_sft_run(train, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, stages=("sft",), steps=1) == 0
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Price of item {i}?", "chosen": f"{i} USD",
                                         "rejected": "no idea"}) + "\n" for i in range(6)))
    assert train(out, "--resume", "--data", f"align={pairs}", stages=("align",), steps=1) == 0  # was: TypeError
    report = json.loads((out / "report.json").read_text())
    assert report["stages"][0]["name"] == "align" and "otpo" in report["alignment"]
    assert report["final_checkpoint"].endswith("step-000001") and "align" in report["final_checkpoint"]
    capsys.readouterr()
    assert train(tmp_path / "empty", stages=("align",), steps=1) == 1    # nothing to align
    assert "starts from an SFT model" in capsys.readouterr().err


def test_keep_last_and_save_every(train, tmp_path):
    out = tmp_path / "run"
    assert train(out, "--save-every", "1", "--keep-last", "2", steps=4) == 0
    sdir = out / "checkpoints" / "general"
    assert sorted(p.name for p in sdir.glob("step-*")) == ["step-000003", "step-000004"]
    out2 = tmp_path / "run2"
    assert train(out2, "--save-every", "3", "--keep-last", "5", steps=4) == 0
    assert sorted(p.name for p in (out2 / "checkpoints" / "general").glob("step-*")) == \
        ["step-000003", "step-000004"]                   # every 3 steps, and at the stage's end


def test_resume_falls_back_past_a_damaged_checkpoint(train, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--save-every", "1", "--stop-after", "3", steps=4) == 0
    sdir = out / "checkpoints" / "general"
    assert (sdir / "LATEST").read_text().strip() == "step-000003"
    weights = sdir / "step-000003" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-64:-32] = b"\xff" * 32                             # NaN words over a tensor's bytes
    weights.write_bytes(bytes(data))
    capsys.readouterr()
    assert train(out, "--resume", steps=4) == 0
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and str(weights) in err
    assert _steps(out) == [0, 1, 2, 3]                        # step 2 ran again from step-000002
    assert (sdir / ".damaged-step-000003").is_dir()


def test_damaged_everywhere_is_an_error(train, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, "--stop-after", "1", steps=2) == 0
    for w in (out / "checkpoints" / "general").glob("step-*/model.safetensors"):
        w.write_bytes(w.read_bytes()[:100])                  # truncated copies
    capsys.readouterr()
    assert train(out, "--resume") == 1
    err = capsys.readouterr().err
    last = err.splitlines()[-1]
    assert last.startswith("compass: error:") and "no checkpoint of this stage verifies" in last
    shutil.rmtree(out)
