"""CLI tests run single-threaded (tests/helpers.py: ``one_thread``) on a one-layer tiny model."""

import json

import pytest

from helpers import one_thread  # noqa: F401  (an autouse fixture)

from compass_model.cli import main


def tiny_config(path, stages=("general",), steps=2, **model):
    """A config file: the tiny preset with one layer and a 128-token context; each stage in
    ``stages`` gets ``steps`` steps of 2 rows x 64 tokens (align: 4 pairs, 2 held out)."""
    spec = []
    for name in stages:
        s = {"name": name, "steps": steps, "rows": 2, "seq_len": 64, "warmup_steps": 0}
        if name == "align":
            s.update(n_pairs=4, eval_pairs=2)
        spec.append(s)
    obj = {"model": {"preset": "tiny", "n_layers": 1, "max_seq_len": 128, **model}, "stages": spec}
    path.write_text(json.dumps(obj))
    return str(path)


def _train(tmp_path, out, *extra, stages=("general",), steps=2):
    cfg = tiny_config(tmp_path / "cfg.json", stages=stages, steps=steps)
    return main(["train", "--config", cfg, "--stages", ",".join(stages), "--no-eval", "--no-progress",
                 "--device", "cpu", "--out", str(out), *extra])


@pytest.fixture
def train(tmp_path):
    """``train(out, *extra_args, stages=..., steps=...)`` -> the exit code of ``compass train``."""
    return lambda out, *extra, **kw: _train(tmp_path, out, *extra, **kw)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A finished two-step run of the general stage (a module's shared, read-only checkpoint)."""
    tmp = tmp_path_factory.mktemp("tiny_run")
    assert _train(tmp, tmp / "run") == 0
    return tmp / "run"
