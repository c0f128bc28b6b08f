"""Per-stage data checked before training; --device / --dtype plumbing (meta and CPU devices);
progress of long jobs through logging when stderr is not a terminal."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch

import compass_model.train.evaluate as evaluate_mod
from compass_model.cli import main
from compass_model.cli_commands import resolve_device
from compass_model.data import ByteTokenizer
from compass_model.train import pipeline
from compass_model.train.data import data_files_for
from compass_model.train.evaluate import evaluate_model
from compass_model.train.objectives import batch_inputs
from compass_model.train.state import resolve_checkpoint

generate_mod = importlib.import_module("compass_model.generate")   # the package exports a same-named function


def _jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


# ---- per-stage data ----------------------------------------------------------------------------------

def test_data_flag_forms():
    names = ["general", "sft"]
    assert data_files_for(None, names) == {}
    assert data_files_for(["a.jsonl"], names) == {"general": "a.jsonl", "sft": "a.jsonl"}
    assert data_files_for(["sft=s.jsonl", "g.jsonl"], names) == {"general": "g.jsonl", "sft": "s.jsonl"}
    assert data_files_for({"sft": "s.jsonl"}, names) == {"sft": "s.jsonl"}
    assert data_files_for(["x=y.jsonl"], names) == {"general": "x=y.jsonl", "sft": "x=y.jsonl"}  # not a stage
    with pytest.raises(ValueError, match="does not train stage 'align'"):
        data_files_for(["align=p.jsonl"], names)
    with pytest.raises(ValueError, match="more than one file for all stages"):
        data_files_for(["a.jsonl", "b.jsonl"], names)
    with pytest.raises(ValueError, match="two files for stage 'sft'"):
        data_files_for(["sft=a.jsonl", "sft=b.jsonl"], names)


def test_every_stage_file_is_checked_before_training(train, tmp_path, capsys):
    sft = _jsonl(tmp_path / "sft.jsonl", [{"prompt": "Hi", "response": "Hello", "domain": "general"}] * 4)
    text = _jsonl(tmp_path / "text.jsonl", [{"text": "Sepatu lari murah."}] * 4)
    out = tmp_path / "run"
    assert train(out, "--data", sft, stages=("general", "sft"), steps=1) == 1    # one SFT file for both
    err = capsys.readouterr().err.splitlines()[-1]
    assert "stage general" in err and "missing field 'text'" in err and "--data STAGE=FILE" in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()   # nothing trained
    assert train(out, "--data", f"general={text}", "--data", f"sft={sft}", stages=("general", "sft"),
                 steps=1) == 0
    stages = [json.loads(x)["stage"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["general", "sft"]


def test_align_file_is_checked_before_training(train, tmp_path, capsys):
    pairs = _jsonl(tmp_path / "pairs.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 2)
    out = tmp_path / "run"
    assert train(out, "--data", f"align={pairs}", stages=("sft", "align"), steps=1) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert "stage align" in err and "need more than eval_pairs" in err
    assert not (out / "checkpoints").exists()


# ---- device and dtype --------------------------------------------------------------------------------

class _Stop(Exception):
    pass


def test_default_device_is_cuda_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")


def test_unavailable_device_is_an_error(tiny_run, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert main(["eval", "--checkpoint", str(tiny_run), "--device", "cuda"]) == 1
    assert "CUDA is not available here; use --device cpu" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(tiny_run), "--device", "gpu0"]) == 1
    assert "is not a torch device" in capsys.readouterr().err


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_train_puts_model_and_batches_on_the_device(train, tmp_path, monkeypatch, device):
    seen = {}

    def fake_train_stage(model, stage, data, sdir, metrics, **kw):
        dev = next(model.parameters()).device
        batch = batch_inputs(data.micro_batches(0, 1)[0], dev)         # what the LM objective feeds the model
        seen.update(model=dev, buffers={b.device for b in model.buffers()},
                    batch={t.device for t in batch.values()}, precision=stage.precision)
        raise _Stop
    monkeypatch.setattr(pipeline, "train_stage", fake_train_stage)
    with pytest.raises(_Stop):
        train(tmp_path / "run", "--device", device, "--dtype", "bfloat16", "--debug")
    want = torch.device(device)
    assert seen["model"] == want and seen["buffers"] == {want} and seen["batch"] == {want}
    assert seen["precision"] == "bf16"                    # --dtype bfloat16 on train: bf16 autocast


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_checkpoint_commands_put_the_model_on_the_device(tiny_run, monkeypatch, device):
    seen = {}

    def fake_eval(model, tok, **kw):
        seen["eval"] = {p.device for p in model.parameters()}
        seen["dtypes"] = {n: p.dtype for n, p in model.named_parameters()}
        return {}

    def fake_generate(model, ids, n, **kw):
        seen["generate"] = ({p.device for p in model.parameters()}, ids.device)
        raise _Stop
    monkeypatch.setattr(evaluate_mod, "evaluate_model", fake_eval)
    monkeypatch.setattr(generate_mod, "generate", fake_generate)
    want = torch.device(device)
    assert main(["eval", "--checkpoint", str(tiny_run), "--device", device, "--dtype", "bfloat16"]) == 0
    assert seen["eval"] == {want}
    assert seen["dtypes"]["embed.weight"] == torch.bfloat16
    assert all(v == torch.float32 for k, v in seen["dtypes"].items() if k.endswith("router.weight"))
    with pytest.raises(_Stop):
        main(["generate", "--checkpoint", str(tiny_run), "--prompt", "x", "--device", device, "--debug"])
    assert seen["generate"] == ({want}, want)


def test_bf16_eval_runs_on_cpu(tiny_run, capsys):
    assert main(["eval", "--checkpoint", str(tiny_run), "--n-tasks", "2", "--dtype", "bfloat16",
                 "--device", "cpu", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


# ---- progress ----------------------------------------------------------------------------------------

def test_eval_progress_is_logged_off_a_terminal(tiny_run, caplog):
    from compass_model.checkpoint import from_pretrained
    model = from_pretrained(resolve_checkpoint(tiny_run))
    with caplog.at_level(logging.INFO, logger="compass"):
        evaluate_model(model, ByteTokenizer(), n_tasks=7, n_long=1, n_docs=2)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("eval: ")]
    assert lines and lines[-1].startswith("eval: 10/10")            # 7 tasks + 2 long-context + 1 pass
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="compass"):
        evaluate_model(model, ByteTokenizer(), n_tasks=7, n_long=1, n_docs=2, progress=False)
    assert not caplog.records
    with pytest.raises(ValueError, match="n_tasks must be an int >= 1"):
        evaluate_model(model, ByteTokenizer(), n_tasks=0)


def test_training_progress_is_logged_off_a_terminal(train, tmp_path, caplog):
    from compass_model.cli_config import STAGE_LIST  # noqa: F401  (the CLI module set up logging)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"preset": "tiny", "n_layers": 1, "max_seq_len": 128},
                               "stages": [{"name": "general", "steps": 3, "rows": 2, "seq_len": 64}]}))
    with caplog.at_level(logging.INFO, logger="compass"):
        assert main(["train", "--config", str(cfg), "--stages", "general", "--no-eval", "--device", "cpu",
                     "--out", str(tmp_path / "run")]) == 0
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.strip().startswith("general: 3/3") and "loss=" in m for m in msgs), msgs


def test_pair_building_progress_is_logged(caplog):
    from compass_model import CompassConfig, CompassForCausalLM
    from compass_model.data import make_tasks
    from compass_model.train.pairs import build_pairs
    torch.manual_seed(0)
    model = CompassForCausalLM(CompassConfig.from_preset("tiny", n_layers=1, max_seq_len=256))
    tasks = make_tasks(3, seed=0, n_items=2)
    with caplog.at_level(logging.INFO, logger="compass"):
        build_pairs(model, ByteTokenizer(), tasks, max_new_tokens=4, tries=1)
    msgs = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("building preference pairs (tasks sampled): 3/3") for m in msgs), msgs
