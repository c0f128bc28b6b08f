"""The CLI shows the model layer's log lines: module loggers under ``compass_model`` and the
``compass`` progress logger go to stderr as bare messages; results stay on stdout."""

from __future__ import annotations

import logging

from compass_model.cli import main


def test_library_log_lines_reach_stderr(capsys):
    assert main(["plan", "--preset", "tiny", "--gpus", "1"]) == 0          # any command sets logging up
    out = capsys.readouterr().out
    assert out.strip()
    logging.getLogger("compass_model.experiments.balance").info("[balance] a result line")
    logging.getLogger("compass_model.train.state").warning("checkpoint x is unusable")
    logging.getLogger("compass").info("general: 3/3 (1 s)")
    captured = capsys.readouterr()
    assert captured.err.splitlines() == ["[balance] a result line", "checkpoint x is unusable", "general: 3/3 (1 s)"]
    assert captured.out == ""
