"""Experiment ``balance``: router load balancing on the tiny proxy (experiment 1).

Variants (same data, seed and schedule; only the router-loss settings differ):
  no-aux        aux 0, z 0                          (the collapse control)
  aux           constant aux coefficient, z 0
  aux+z         constant aux coefficient + z-loss
  aux-cosine+z  aux coefficient cosine-decayed to aux_min over the run + z-loss
  aux-exp+z     aux coefficient with exponential decay (half-life steps / 4) to aux_min + z-loss

Per variant: normalised expert-load entropy per step (mean over MoE blocks; 1 = uniform),
MaxVio = max_i load_i / mean load - 1 per block and step, averaged over the last ``k`` steps and the
blocks; dead experts = experts with zero assignments summed over the last ``k`` steps (per block,
summed over blocks); final LM loss (mean over the last ``k`` steps) and held-out LM loss.
"""

from __future__ import annotations

import logging
import time

import torch

from compass_model.experiments.common import (
    finish,
    mean,
    small_config,
    stage_data,
    train_lm,
)
from compass_model.train.progress import progress

logger = logging.getLogger(__name__)
NAME = "balance"


def variants(aux: float, aux_min: float, z: float, steps: int) -> dict:
    """The router-loss settings of each variant (see the module docstring)."""
    return {
        "no-aux": {"aux_loss_coef": 0.0, "z_loss_coef": 0.0},
        "aux": {"aux_loss_coef": aux, "z_loss_coef": 0.0},
        "aux+z": {"aux_loss_coef": aux, "z_loss_coef": z},
        "aux-cosine+z": {"aux_loss_coef": aux, "z_loss_coef": z, "aux_loss_decay": "cosine",
                         "aux_loss_decay_steps": steps, "aux_loss_min_coef": aux_min},
        "aux-exp+z": {"aux_loss_coef": aux, "z_loss_coef": z, "aux_loss_decay": "exp",
                      "aux_loss_decay_steps": max(1, steps // 4), "aux_loss_min_coef": aux_min},
    }


def max_vio(counts: list) -> float:
    """``max_i c_i / mean(c) - 1`` for one block's assignment counts (0 when there are none)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    return max(counts) * len(counts) / total - 1.0


def dead_experts(records: list, last: int) -> int:
    """Experts with no assignment in any of the last ``last`` steps, summed over MoE blocks."""
    window = records[-last:]
    n_blocks = len(window[0]["counts"])
    dead = 0
    for blk in range(n_blocks):
        sums = [sum(col) for col in zip(*(r["counts"][blk] for r in window))]
        dead += sum(1 for s in sums if s == 0)
    return dead


def summarize(records: list, last: int) -> dict:
    """A variant's curves and its statistics over the last ``last`` steps."""
    window = records[-last:]
    return {
        "entropy": [round(r["entropy"], 5) for r in records],
        "lm": [round(r["lm"], 5) for r in records],
        "aux_coef": [r["aux_coef"] for r in records],
        "final_entropy": mean(r["entropy"] for r in window),
        "max_vio": mean(mean(max_vio(c) for c in r["counts"]) for r in window),
        "dead_experts": dead_experts(records, last),
        "final_lm": mean(r["lm"] for r in window),
        "final_z": mean(r["z"] for r in window),
        "final_load": [round(sum(col) / max(1, sum(sum(r["counts"][0]) for r in window)), 4)
                       for col in zip(*(r["counts"][0] for r in window))],
    }


def run(out_dir, *, quick: bool = False, seed: int = 0) -> dict:
    """Train every variant, write ``balance.json`` and ``balance.png`` under ``out_dir``."""
    t0 = time.perf_counter()
    if quick:
        steps, rows, seq_len, n_layers, pool, last = 30, 4, 64, 1, 200, 5
    else:
        steps, rows, seq_len, n_layers, pool, last = 500, 8, 128, 2, 2000, 50
    aux, aux_min, z = 0.1, 0.01, 1e-3
    data = stage_data("ecommerce", seq_len, rows, seed, pool)
    eval_data = stage_data("ecommerce", seq_len, rows, seed + 1000, pool)
    eval_batches = eval_data.micro_batches(0, 2 if quick else 8)
    results = {}
    runs = variants(aux, aux_min, z, steps)
    bar = progress(len(runs) * steps, f"[{NAME}] training")
    for name, over in runs.items():
        t = time.perf_counter()
        cfg = small_config(n_layers=n_layers, max_seq_len=seq_len, **over)
        r = train_lm(cfg, data, steps, seed=seed, eval_batches=eval_batches, progress=bar)
        res = summarize(r["records"], last)
        res["eval_lm"] = r["eval_lm"]
        res["config"] = over
        res["seconds"] = round(time.perf_counter() - t, 2)
        results[name] = res
        logger.info(f"[{NAME}] {name:>13}: entropy {res['final_entropy']:.3f}  MaxVio {res['max_vio']:.2f}  "
                   f"dead {res['dead_experts']}  lm {res['final_lm']:.3f}  eval {res['eval_lm']:.3f}  ({res['seconds']} s)")
    bar.close()
    result = {
        "setup": {"preset": "tiny", "n_layers": n_layers, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
                  "steps": steps, "rows": rows, "seq_len": seq_len, "data": "ecommerce", "last_k": last,
                  "aux_coef": aux, "aux_min_coef": aux_min, "z_coef": z, "seed": seed,
                  "threads": torch.get_num_threads()},
        "variants": results,
        "summary": {k: {m: v[m] for m in ("final_entropy", "max_vio", "dead_experts", "final_lm", "eval_lm")}
                    for k, v in results.items()},
    }
    return finish(out_dir, NAME, result, _plot, quick=quick, t0=t0)


def _plot(plt, result, path):
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, v in result["variants"].items():
        a.plot(v["entropy"], label=name, lw=1)
        b.plot(v["lm"], label=name, lw=1)
    a.set_xlabel("step")
    a.set_ylabel("normalised load entropy")
    a.set_ylim(0, 1.02)
    a.set_title("expert load entropy (1 = uniform)")
    b.set_xlabel("step")
    b.set_ylabel("LM loss")
    b.set_title("LM loss")
    a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
