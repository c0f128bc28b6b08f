"""Shared pieces of the paper experiments: machine info, output writing, timing, a small LM loop.

Every experiment writes ``<out_dir>/<name>.json`` (its result dict, with ``"machine"`` and
``"quick"``) and ``<out_dir>/<name>.png`` (matplotlib, Agg backend, imported only when plotting).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path

import torch

from compass_kernels.benchmarking.timers import median_times  # noqa: F401 - the experiments' timer
from compass_model.config import CompassConfig


def machine_info() -> dict:
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


def finish(out_dir, name: str, result: dict, plot, *, quick: bool, t0: float, log=print) -> dict:
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
    log(f"[{name}] wrote {out / (name + '.json')} and {png} ({result['seconds']:.1f} s)")
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


def batch_kwargs(b) -> dict:
    return {"input_ids": b.input_ids, "labels": b.labels, "loss_mask": b.loss_mask(),
            "position_ids": b.position_ids, "attention_mask": b.attention_mask()}


def train_lm(config: CompassConfig, data, steps: int, *, lr: float = 3e-3, warmup: int = 10, seed: int = 0,
             eval_batches: list | None = None) -> dict:
    """AdamW (the trainer's ``make_optimizer``, warmup + cosine ``lr_at``, clip 1.0) for ``steps`` steps
    of one micro-batch each. The loss is the model's own total (lm + alpha(step) aux + z coef z), so
    the aux-coefficient decay follows ``model.step``. Returns the model and per-step records:
    ``lm``, ``loss``, ``aux``, ``z``, ``aux_coef``, per-MoE-block ``counts`` (assignments per expert)
    and ``entropy`` (normalised load entropy, mean over blocks); ``eval_lm``: mean LM loss on
    ``eval_batches`` after training (None without them)."""
    from compass_model.model import CompassForCausalLM
    from compass_model.moe import aux_loss_coefficient
    from compass_model.train.schedule import lr_at
    from compass_model.train.trainer import make_optimizer

    torch.manual_seed(seed)
    model = CompassForCausalLM(config)
    opt = make_optimizer(model, lr, 0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    records = []
    for step in range(steps):
        cur = lr_at(step, steps, lr, min(warmup, max(steps - 1, 0)), 0.1)
        for g in opt.param_groups:
            g["lr"] = cur
        (b,) = data.micro_batches(step, 1)
        coef = float(aux_loss_coefficient(config, model.step))
        out = model(**batch_kwargs(b))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        stats = out.router_stats[:config.n_moe_layers]
        # "load" is a fraction; times the assignment count T k gives counts
        n_assign = int((b.input_ids.numel()) * config.top_k)
        records.append({
            "step": step, "loss": float(out.loss.detach()), "lm": float(out.losses["lm"].detach()),
            "aux": float(out.losses["aux"].detach()), "z": float(out.losses["z"].detach()), "aux_coef": coef,
            "counts": [[round(float(v) * n_assign) for v in s["load"]] for s in stats],
            "entropy": float(torch.stack([s["entropy"] for s in stats]).mean()) if stats else 1.0,
        })
    eval_lm = None
    if eval_batches:
        model.eval()
        with torch.no_grad():
            eval_lm = sum(float(model(**batch_kwargs(b)).losses["lm"]) for b in eval_batches) / len(eval_batches)
        model.train()
    return {"model": model, "records": records, "eval_lm": eval_lm}


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")
