"""Each CLI error is one line with the cause and the fix (--debug: the traceback); outputs are checked
before the work and results are printed before they are written."""

from __future__ import annotations

import json

import pytest

import compass_model.train.evaluate as evaluate_mod
import compass_model.train.fp8_report as fp8_mod
from compass_model.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("compass: error: "), err
    return err[-1]


def _never(*a, **k):
    raise AssertionError("the work started before the output path was checked")


def test_output_paths_are_checked_before_the_work(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_mod, "evaluate_model", _never)
    monkeypatch.setattr(fp8_mod, "fp8_report", _never)
    missing = tmp_path / "missing" / "x.json"
    assert main(["eval", "--checkpoint", str(tiny_run), "--out", str(missing)]) == 1
    assert f"directory {missing.parent} does not exist" in _err(capsys)
    assert main(["quantize", "--checkpoint", str(tiny_run), "--out", str(missing)]) == 1
    assert "does not exist" in _err(capsys)
    assert main(["eval", "--checkpoint", str(tiny_run), "--out", str(tmp_path)]) == 1
    assert "is a directory" in _err(capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "a").write_text("x")
    assert main(["quantize", "--checkpoint", str(tiny_run), "--save", str(tmp_path / "full")]) == 1
    assert "is not empty" in _err(capsys)


def test_eval_prints_before_writing(tiny_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(evaluate_mod, "evaluate_model", lambda *a, **k: {"accuracy": 0.5})
    out = tmp_path / "gone" / "ev.json"
    (tmp_path / "gone").mkdir()
    import compass_model.cli_commands as cc
    real = cc.check_output_file

    def check_then_remove(path, flag):          # the directory disappears while the work runs
        real(path, flag)
        (tmp_path / "gone").rmdir()
    monkeypatch.setattr(cc, "check_output_file", check_then_remove)
    assert main(["eval", "--checkpoint", str(tiny_run), "--out", str(out)]) == 1
    cap = capsys.readouterr()
    assert json.loads(cap.out) == {"accuracy": 0.5}                    # the results were not lost
    assert "No such file" in cap.err


def test_eval_follows_latest_of_a_run_dir(tiny_run, monkeypatch, capsys):
    seen = {}

    def fake(model, tok, **kw):
        seen["step"] = int(model.step)
        return {"ok": True}
    monkeypatch.setattr(evaluate_mod, "evaluate_model", fake)
    assert main(["eval", "--checkpoint", str(tiny_run)]) == 0
    assert main(["eval", "--checkpoint", str(tiny_run / "checkpoints" / "general")]) == 0
    assert seen["step"] == 2


def test_argument_errors(tiny_run, tmp_path, capsys):
    for argv in (["eval", "--checkpoint", str(tiny_run), "--n-tasks", "0"],
                 ["quantize", "--checkpoint", str(tiny_run), "--n-tasks", "-3"],
                 ["generate", "--checkpoint", str(tiny_run), "--prompt", "x", "--max-new-tokens", "0"],
                 ["train", "--preset", "tiny", "--keep-last", "0"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "expected an integer >= 1" in capsys.readouterr().err
    assert main(["train", "--preset", "tiny", "--stages", "", "--out", str(tmp_path / "o")]) == 1
    assert "names no stage" in _err(capsys)
    assert main(["train", "--preset", "tiny", "--stages", "generl", "--out", str(tmp_path / "o")]) == 1
    assert "unknown stages ['generl']" in _err(capsys)
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_route_demo_help_is_its_own(capsys):
    with pytest.raises(SystemExit) as e:
        main(["route-demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: compass route-demo" in out and "--tokens" in out


@pytest.mark.parametrize("obj, says", [
    ({"model": {"preset": "tiny", "d_model": "64"}}, "field 'd_model' must be an int, got str '64'"),
    ({"model": {"preset": "tiny", "capacity_factor": "big"}}, "field 'capacity_factor' must be a number or null"),
    ({"model": {"preset": "tiny", "d_modle": 64}}, "unknown field(s) ['d_modle']"),
    ({"stages": [{"name": "general", "steps": "2"}]}, "stages[0]: field 'steps' must be an int"),
    ({"stages": [{"name": "general", "lr": "fast"}]}, "field 'lr' must be a number"),
    ({"stages": {"name": "general"}}, '"stages" must be a list'),
    ([{"model": {}}], "expected a JSON object"),
    ({"modle": {}}, "unknown top-level key(s) ['modle']"),
])
def test_config_errors_name_the_field(tmp_path, capsys, obj, says):
    (tmp_path / "c.json").write_text(json.dumps(obj))
    assert main(["train", "--config", str(tmp_path / "c.json"), "--stages", "general",
                 "--out", str(tmp_path / "o")]) == 1
    assert says in _err(capsys)


def test_prompt_too_long_and_missing_tokenizer(tiny_run, tmp_path, capsys):
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "x" * 300]) == 1
    err = _err(capsys)
    assert "--prompt is 301 tokens" in err and "context is 128" in err and "at most 127" in err
    assert main(["generate", "--checkpoint", str(tiny_run), "--prompt", "x",
                 "--tokenizer", str(tmp_path / "tok.json")]) == 1
    err = _err(capsys)
    assert "tok.json: no such file" in err and "tokenizers" not in err.split("no such file")[0]


def test_debug_shows_the_traceback(tiny_run, tmp_path):
    from compass_model.cli_config import UsageError
    with pytest.raises(UsageError, match="no such file"):
        main(["generate", "--checkpoint", str(tiny_run), "--prompt", "x", "--tokenizer",
              str(tmp_path / "tok.json"), "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["eval", "--debug", "--checkpoint", str(tmp_path / "nowhere")])
