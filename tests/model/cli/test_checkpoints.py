"""Checkpoints the commands write load in every command that takes --checkpoint; damaged weights are
refused naming the file; a full disk leaves the previous checkpoint valid and no partial files."""

from __future__ import annotations

import errno
import json

import pytest
import torch

from compass_model import CompassConfig, CompassForCausalLM
from compass_model.checkpoint import CheckpointError, from_pretrained, save_pretrained
from compass_model.cli import main
from compass_model.train import state
from compass_model.train.state import CheckpointWriteError, latest_checkpoint, resolve_checkpoint, save_checkpoint
from compass_model.train.trainer import make_optimizer


def _model():
    torch.manual_seed(0)
    return CompassForCausalLM(CompassConfig.from_preset("tiny", n_layers=1, max_seq_len=128))


def test_quantized_save_loads_in_every_command(tiny_run, tmp_path, capsys):
    fp8 = tmp_path / "fp8"
    assert main(["quantize", "--checkpoint", str(tiny_run), "--n-tasks", "2", "--no-progress", "--device", "cpu",
                 "--save", str(fp8)]) == 0
    assert (fp8 / "quant_config.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(fp8), "--prompt", "Listing:", "--max-new-tokens", "4",
                 "--device", "cpu"]) == 0
    assert main(["eval", "--checkpoint", str(fp8), "--n-tasks", "2", "--no-progress", "--device", "cpu",
                 "--out", str(tmp_path / "ev.json")]) == 0
    assert "perplexity" in json.loads((tmp_path / "ev.json").read_text())
    capsys.readouterr()
    assert main(["quantize", "--checkpoint", str(fp8), "--n-tasks", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert "already an FP8 model" in err and len(err.splitlines()) == 1
    model = from_pretrained(fp8)                      # the library loader tells the kinds apart too
    assert hasattr(model, "quant_config")


def test_checkpoint_may_name_a_run_or_stage_directory(tiny_run):
    final = tiny_run / "checkpoints" / "general" / "step-000002"
    assert resolve_checkpoint(tiny_run) == final                          # report.json's final checkpoint
    assert resolve_checkpoint(tiny_run / "checkpoints" / "general") == final     # LATEST
    assert resolve_checkpoint(final) == final
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        resolve_checkpoint(tiny_run / "plots")


def test_damaged_weights_are_refused_naming_the_file(tmp_path, capsys):
    save_pretrained(_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-256:-128] = b"\xff" * 128                   # NaN words over the last tensor
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch") as e:
        from_pretrained(tmp_path / "m")
    assert str(weights) in str(e.value)
    assert main(["generate", "--checkpoint", str(tmp_path / "m"), "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and "checksum" in err and len(err.splitlines()) == 1
    weights.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read the weights"):
        from_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json: cannot read"):
        from_pretrained(tmp_path / "m")


def test_digest_round_trip_and_old_files(tmp_path):
    model = _model()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    # a file written before the digest existed still loads (no digest to check)
    from safetensors.torch import load_file, save_file
    w = tmp_path / "m" / "model.safetensors"
    save_file(load_file(w), w, metadata={"format": "pt"})
    from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("exc", [OSError(errno.ENOSPC, "No space left on device"),
                                 RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64")])
def test_disk_full_keeps_the_previous_checkpoint(tmp_path, monkeypatch, exc):
    model = _model()
    opt = make_optimizer(model, 1e-3, 0.0)
    save_checkpoint(tmp_path, model, opt, 1)
    before = from_pretrained(latest_checkpoint(tmp_path)).state_dict()

    def full(*a, **k):
        raise exc
    if isinstance(exc, RuntimeError):                  # torch.save's zip writer: no errno to go by
        monkeypatch.setattr(state.torch, "save", full)
        monkeypatch.setattr(state.shutil, "disk_usage", lambda p: type("U", (), {"free": 0})())
    else:                                              # the weights' writer
        monkeypatch.setattr("compass_model.checkpoint_files.save_file", full)
    with pytest.raises(CheckpointWriteError, match=f"no space left on {tmp_path}") as e:
        save_checkpoint(tmp_path, model, opt, 2)
    assert e.value.errno == errno.ENOSPC and "step-000001 is intact" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "step-000001"]     # no partial temp dir
    monkeypatch.undo()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000001" and state.trainer_state(ckpt)["step"] == 1
    for k, v in from_pretrained(ckpt).state_dict().items():
        assert torch.equal(v, before[k]), k


def test_disk_full_in_the_cli_is_one_line(train, tmp_path, monkeypatch, capsys):
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr("compass_model.checkpoint_files.save_file", full)
    assert train(tmp_path / "run") == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("compass: error: no space left on ") and "--resume" in err
    assert not list((tmp_path / "run" / "checkpoints" / "general").glob(".tmp-*"))


def test_other_write_errors_are_not_called_disk_full(tmp_path, monkeypatch):
    model = _model()

    def broken(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("compass_model.checkpoint_files.save_file", broken)
    with pytest.raises(PermissionError):
        save_checkpoint(tmp_path, model, None, 1)
    assert not list(tmp_path.glob(".tmp-*"))
