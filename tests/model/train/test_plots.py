"""compass_model.train.plots: each plot writes a real PNG (checked by its pixels), empty inputs
write a "no data" PNG instead of failing."""

from __future__ import annotations

import numpy as np
import pytest

from compass_model.train.plots import plot_accuracy, plot_expert_load, plot_load_balance, plot_losses

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)      # matplotlib's first two line colours
VIRIDIS_TOP = (0xFD, 0xE7, 0x25)


def _pixels(path):
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    img = mpimg.imread(path)
    return np.round(img[..., :3] * 255).astype(int)


def _has(img, rgb, tol=6, at_least=20) -> bool:
    return int((np.abs(img - np.array(rgb)).max(axis=-1) <= tol).sum()) >= at_least


def test_plot_losses_one_line_per_stage(tmp_path):
    records = [{"stage": "general", "step": i, "loss": 5.0 - 0.1 * i} for i in range(20)]
    records += [{"stage": "sft", "step": i, "loss": 2.0 - 0.05 * i} for i in range(15)]
    records += [{"stage": "sft", "step": 15, "loss": "nan"}, {"stage": "sft", "step": 16}]   # skipped
    out = plot_losses(records, tmp_path / "sub" / "loss.png")
    assert out == tmp_path / "sub" / "loss.png"
    img = _pixels(out)
    assert _has(img, BLUE) and _has(img, ORANGE)                # two stages, two colours
    one = _pixels(plot_losses(records[:20], tmp_path / "one.png"))
    assert _has(one, BLUE) and not _has(one, ORANGE)


def test_plot_expert_load_heatmap(tmp_path):
    records = [{"stage": "general", "step": i, "loss": 1.0, "expert_load": [1.0] + [0.0] * 15} for i in range(10)]
    records.insert(3, {"stage": "general", "step": 99, "loss": 1.0})       # no expert_load: ignored
    img = _pixels(plot_expert_load(records, tmp_path / "load.png"))
    assert _has(img, VIRIDIS_TOP, at_least=200)                 # the overloaded expert's row
    flat = _pixels(plot_expert_load([{"expert_load": [1 / 16] * 16}, {"expert_load": [1 / 16] * 16}],
                                    tmp_path / "flat.png"))
    assert not _has(flat, VIRIDIS_TOP, at_least=200)          # balanced: no expert stands out


def test_plot_accuracy_bars(tmp_path):
    per_language = {"en": {"accuracy": 0.9, "n": 10}, "th": {"accuracy": 0.4, "n": 10}, "vi": {"accuracy": 0.0, "n": 5}}
    img = _pixels(plot_accuracy(per_language, tmp_path / "acc.png"))
    assert _has(img, BLUE, at_least=500)
    low = _pixels(plot_accuracy({"en": {"accuracy": 0.1, "n": 3}}, tmp_path / "low.png"))
    def blue(im):
        return int((np.abs(im - np.array(BLUE)).max(axis=-1) <= 6).sum())

    assert blue(img) > 3 * blue(low)                            # bar area follows the accuracy


def test_plot_load_balance_entropy_and_aux_coefficient(tmp_path):
    RED = (0xD6, 0x27, 0x28)                                    # tab:red, the coefficient's axis
    records = [{"stage": "general", "step": i, "load_entropy": 0.7 + 0.01 * i, "aux_coef": 0.1 - 0.002 * i}
               for i in range(30)]
    records += [{"stage": "sft", "step": 0, "loss": 1.0}]      # no load_entropy: skipped
    img = _pixels(plot_load_balance(records, tmp_path / "lb.png"))
    assert _has(img, BLUE) and _has(img, RED)
    no_coef = _pixels(plot_load_balance([{k: v for k, v in r.items() if k != "aux_coef"} for r in records[:30]],
                                        tmp_path / "lb2.png"))
    assert _has(no_coef, BLUE) and not _has(no_coef, RED)


@pytest.mark.parametrize("fn, arg", [(plot_losses, []), (plot_expert_load, [{"stage": "a", "loss": 1.0}]),
                                     (plot_load_balance, [{"stage": "a", "loss": 1.0}]),
                                     (plot_accuracy, {}), (plot_accuracy, None)])
def test_empty_inputs_write_no_data_png(tmp_path, fn, arg):
    img = _pixels(fn(arg, tmp_path / "empty.png"))
    assert not _has(img, BLUE) and not _has(img, ORANGE)
    assert (img < 100).all(axis=-1).sum() > 50                  # the dark "no data" text
