"""Shared pieces of the paper experiments: machine info, output writing, timing, a small LM loop.

Every experiment writes ``<out_dir>/<name>.json`` (its result dict, with ``"machine"`` and
``"quick"``) and ``<out_dir>/<name>.png`` (matplotlib, Agg backend, imported only when plotting).
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch

from compass_kernels.benchmarking.timers import median_times  # noqa: F401 - the experiments' timer
from compass_model.config import CompassConfig

logger = logging.getLogger(__name__)


def machine_info() -> dict:
    """The machine, threads, library versions and CPU kernel backends a result was measured with."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES"),
        "kernel_backends": _cpu_backends(),
    }


def _cpu_backends() -> dict | None:
    try:
        import compass_kernels as ck
        return {k: v for k, v in ck.backend_info()["chosen"].items() if k.endswith("@cpu")}
    except Exception:  # noqa: BLE001 - informational only
        return None


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def finish(out_dir, name: str, result: dict, plot, *, quick: bool, t0: float) -> dict:
    """Add ``machine``/``quick``/``seconds`` to ``result``, write ``name.json`` and ``name.png``
    (``plot(fig_module, result, path)`` draws and saves it) and return the dict."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"experiment": name, "quick": bool(quick), "machine": machine_info(), **result}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result = _jsonable(result)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    png = out / f"{name}.png"
    try:
        plot(plt, result, png)
    finally:
        plt.close("all")
    logger.info(f"[{name}] wrote {out / (name + '.json')} and {png} ({result['seconds']:.1f} s)")
    return result


# ---- a small LM training loop ---------------------------------------------------------------------

def small_config(**overrides) -> CompassConfig:
    """The ``tiny`` preset cut down for experiments: no MTP, 64-token context by default, a constant
    aux coefficient (variants that study the decay set their own schedule)."""
    base = {"mtp_depth": 0, "max_seq_len": 128, "aux_loss_decay": "none"}
    base.update(overrides)
    return CompassConfig.from_preset("tiny", **base)


_DATA_CACHE: dict = {}


def stage_data(kind: str, seq_len: int, rows: int, seed: int, pool_size: int):
    """``StageData`` of the generated corpus (cached per arguments: generation takes a moment)."""
    from compass_model.data import ByteTokenizer
    from compass_model.train.data import StageData
    key = (kind, seq_len, rows, seed, pool_size)
    if key not in _DATA_CACHE:
        _DATA_CACHE[key] = StageData(kind, ByteTokenizer(), seq_len, rows, seed=seed, pool_size=pool_size)
    return _DATA_CACHE[key]


def train_lm(config: CompassConfig, data, steps: int, *, lr: float = 3e-3, warmup: int = 10, seed: int = 0,
             eval_batches: list | None = None, progress=False) -> dict:
    """A fresh model trained by the one training loop (``train.loop``: the shared ``make_optimizer``
    without weight decay, warmup + cosine ``lr_at``, clip 1.0) for ``steps`` steps of one micro-batch
    each, on the LM objective (lm + MTP at the config's weight + alpha(step) aux + z coef z; the
    aux-coefficient decay follows ``model.step``). Returns the model and per-step records: ``lm``,
    ``loss``, ``aux``, ``z``, ``aux_coef``, per-MoE-block ``counts`` (assignments per expert) and
    ``entropy`` (normalised load entropy, mean over blocks); ``eval_lm``: mean LM loss on
    ``eval_batches`` after training (None without them). ``progress``: as ``train_loop``'s."""
    from compass_model.model import CompassForCausalLM
    from compass_model.train.loop import LoopConfig, train_loop
    from compass_model.train.objectives import LMObjective, batch_inputs

    torch.manual_seed(seed)
    model = CompassForCausalLM(config)
    objective = LMObjective(data, mtp_weight=config.mtp_loss_weight if config.mtp_depth else 0.0,
                            per_block_load=True)
    cfg = LoopConfig("lm", steps, lr, min(warmup, max(steps - 1, 0)), 0.1, clip=1.0)
    records = [{"step": r["step"], "loss": r["loss"], "lm": r["lm"], "aux": r["aux"], "z": r["z"],
                "aux_coef": r["aux_coef"], "counts": r.get("block_counts", []), "entropy": r.get("load_entropy", 1.0)}
               for r in train_loop(model, objective, cfg, progress=progress)]
    eval_lm = None
    if eval_batches:
        model.eval()
        with torch.no_grad():
            eval_lm = sum(float(model(**batch_inputs(b)).losses["lm"]) for b in eval_batches) / len(eval_batches)
        model.train()
    return {"model": model, "records": records, "eval_lm": eval_lm}


def mean(xs):
    """The mean of ``xs`` (NaN if empty)."""
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
