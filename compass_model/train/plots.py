"""PNG plots of a training run: loss per stage, expert load over steps, the load-balance curve
(load entropy and the decaying aux coefficient), accuracy per language.

matplotlib is imported lazily, with the non-interactive Agg backend, so importing this module costs
nothing and works on a headless machine. Every function writes a PNG at ``path`` (parent folders are
created) and returns the path; with no data it writes a PNG saying "no data" instead of failing.
"""

from __future__ import annotations

import math
from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend, or an ImportError naming the ``[plots]`` extra."""
    from compass_model._deps import require

    matplotlib = require("matplotlib", "plots", "plotting")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    pyplot().close(fig)
    return path


def _no_data(path, title: str) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=16, transform=ax.transAxes)
    ax.set_title(title)
    ax.set_axis_off()
    return _save(fig, path)


def _number(v) -> float | None:
    """A finite float, or None (metrics files keep NaN / inf as strings)."""
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def plot_losses(records, path) -> Path:
    """Loss against the global step index (position in file order among records with a numeric
    ``"loss"``), one line per ``"stage"``, with a dashed line where each new stage starts."""
    points = [(r.get("stage", "?"), _number(r.get("loss"))) for r in records if isinstance(r, dict) and "loss" in r]
    points = [(s, v) for s, v in points if v is not None]
    if not points:
        return _no_data(path, "training loss")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    series: dict = {}
    for i, (stage, loss) in enumerate(points):
        xs, ys = series.setdefault(str(stage), ([], []))
        xs.append(i)
        ys.append(loss)
    for stage, (xs, ys) in series.items():
        ax.plot(xs, ys, label=stage, linewidth=1.2)
    for i in range(1, len(points)):
        if points[i][0] != points[i - 1][0]:
            ax.axvline(i - 0.5, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.set_title("training loss by stage")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_expert_load(records, path) -> Path:
    """Heatmap of per-expert load fractions (rows: experts, columns: the records that carry an
    ``"expert_load"`` list, in file order). A uniform router is flat at 1/E."""
    loads = [r["expert_load"] for r in records
             if isinstance(r, dict) and isinstance(r.get("expert_load"), (list, tuple)) and r["expert_load"]]
    if not loads:
        return _no_data(path, "expert load")
    E = max(len(x) for x in loads)
    grid = [[(_number(x[e]) if e < len(x) else None) for x in loads] for e in range(E)]
    grid = [[float("nan") if v is None else v for v in row] for row in grid]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.25 * E + 1)))
    im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax, label="fraction of routing decisions")
    ax.set_xlabel("logged step (file order)")
    ax.set_ylabel("expert")
    ax.set_title(f"expert load ({E} experts, uniform = {1 / E:.3f})")
    return _save(fig, path)


def plot_load_balance(records, path) -> Path:
    """The load-balance curve: normalised load entropy (1 = uniform) of the records that carry
    ``"load_entropy"``, in file order, with the aux-loss coefficient (``"aux_coef"``, its decay
    schedule) on a second axis and a dashed line where each new stage starts."""
    rows = [(r.get("stage", "?"), _number(r.get("load_entropy")), _number(r.get("aux_coef")))
            for r in records if isinstance(r, dict) and "load_entropy" in r]
    rows = [x for x in rows if x[1] is not None]
    if not rows:
        return _no_data(path, "load balance")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(range(len(rows)), [h for _, h, _ in rows], color="tab:blue", linewidth=1.0, label="load entropy")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("logged step (file order)")
    ax.set_ylabel("load entropy / log E", color="tab:blue")
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:
            ax.axvline(i - 0.5, color="gray", linestyle="--", linewidth=0.8)
    coef = [(i, a) for i, (_, _, a) in enumerate(rows) if a is not None]
    if coef:
        ax2 = ax.twinx()
        ax2.plot([i for i, _ in coef], [a for _, a in coef], color="tab:red", linewidth=1.2)
        ax2.set_ylabel("aux-loss coefficient", color="tab:red")
        ax2.set_ylim(bottom=0)
    ax.set_title("load balance: router entropy and the aux-loss decay")
    return _save(fig, path)


def plot_accuracy(per_language: dict, path) -> Path:
    """One bar per language (``{lang: {"accuracy", "n"}}``), labelled with the accuracy and n."""
    items = [(str(k), v) for k, v in (per_language or {}).items()
             if isinstance(v, dict) and _number(v.get("accuracy")) is not None]
    if not items:
        return _no_data(path, "accuracy per language")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(items) + 2), 3.5))
    langs = [k for k, _ in items]
    acc = [_number(v["accuracy"]) for _, v in items]
    bars = ax.bar(langs, acc, color="tab:blue")
    for b, (_, v), a in zip(bars, items, acc):
        ax.text(b.get_x() + b.get_width() / 2, a + 0.02, f"{a:.2f}\nn={v.get('n', '?')}", ha="center",
                va="bottom", fontsize=7)
    ax.set_ylim(0, 1.15)
    ax.set_ylabel("accuracy")
    ax.set_title("task accuracy per language")
    return _save(fig, path)
