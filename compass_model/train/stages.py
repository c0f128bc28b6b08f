"""The seven stages of the Compass-v3 recipe, one ``StageConfig`` each (docs/algorithms.md).

  1 general       general + some commerce text, base context
  2 ecommerce     SEA e-commerce enhancement: commerce corpus + task texts
  3 reasoning     worked price reasoning, longer context
  4 long_context  context x4 by YaRN RoPE scaling (the paper's 32K -> 128K, scaled down)
  5 mtp           multi-token prediction interleaved (MTP loss on every ``mtp_every``-th step)
  6 sft           unified mixed loss: full sequence on e-commerce samples, answer-only on general
  7 align         mixed-policy pairs, per-token reference log-probs, OTPO (and DPO as the baseline)

``demo_stages()`` sizes them for the ``tiny`` preset on a 2-core CPU (``compass demo``); a config
file (JSON: ``{"stages": [{"name": ..., "steps": ...}, ...]}``) or CLI flags override the fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

STAGES = ("general", "ecommerce", "reasoning", "long_context", "mtp", "sft", "align")
PRECISIONS = ("fp32", "bf16")


@dataclass(frozen=True)
class StageConfig:
    name: str
    steps: int
    rows: int = 8                    # rows per micro-batch
    grad_accum: int = 1              # micro-batches per optimizer step
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    clip: float = 1.0
    precision: str = "fp32"          # bf16: autocast (CUDA; slow on CPUs without bf16 units)
    data: str | None = None          # data kind (train/data.py); None -> the stage's name
    mtp_loss_weight: float = 0.0     # lambda on MTP steps
    mtp_every: int = 1               # MTP loss on steps where step % mtp_every == 0
    rope_factor: float = 1.0         # > 1: switch RoPE to YaRN with this factor, context x factor
    save_every: int = 1              # checkpoint every n steps (and at the end)
    # alignment only
    beta: float = 0.1
    sft_weight: float = 1.0          # RPO: + this x the chosen answers' NLL (0: pure DPO / OTPO)
    n_pairs: int = 64
    eval_pairs: int = 32

    def __post_init__(self):
        if self.name not in STAGES:
            raise ValueError(f"stage name must be one of {STAGES}, got {self.name!r}")
        for f in ("steps", "rows", "grad_accum", "seq_len", "mtp_every", "save_every"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if f == "steps" else 1):
                raise ValueError(f"stage {self.name}: {f} must be an int >= {0 if f == 'steps' else 1}, got {v!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"stage {self.name}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.clip <= 0:
            raise ValueError(f"stage {self.name}: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1, clip > 0")
        if self.rope_factor < 1:
            raise ValueError(f"stage {self.name}: rope_factor must be >= 1, got {self.rope_factor}")

    @property
    def data_kind(self) -> str:
        return self.data or self.name

    def replace(self, **changes) -> StageConfig:
        return dataclasses.replace(self, **changes)


def demo_stages(base_context: int = 256) -> list:
    """The tiny preset's schedule for ``compass demo`` (~7 minutes on 2 idle CPU cores). Context:
    general/ecommerce at base/2, reasoning and SFT at base, long_context at 4 x base by YaRN."""
    half = base_context // 2
    return [
        StageConfig("general", steps=500, rows=16, seq_len=half, lr=3e-3, warmup_steps=25),
        StageConfig("ecommerce", steps=1000, rows=16, seq_len=half, lr=3e-3, warmup_steps=20),
        StageConfig("reasoning", steps=500, rows=8, seq_len=base_context, lr=2e-3, warmup_steps=20),
        StageConfig("long_context", steps=200, rows=2, seq_len=4 * base_context, lr=1e-3, warmup_steps=10,
                    rope_factor=4.0),
        StageConfig("mtp", steps=300, rows=8, seq_len=base_context, lr=1e-3, warmup_steps=10, data="ecommerce",
                    mtp_loss_weight=0.3, mtp_every=2),
        StageConfig("sft", steps=3000, rows=8, seq_len=base_context, lr=2e-3, warmup_steps=30),
        StageConfig("align", steps=100, rows=8, seq_len=base_context, lr=1e-4, warmup_steps=10, n_pairs=128,
                    eval_pairs=48),
    ]


def load_stages(path) -> list:
    """``{"stages": [{"name": "general", "steps": 100, ...}, ...]}`` -> StageConfigs (unknown keys raise)."""
    obj = json.loads(Path(path).read_text())
    items = obj.get("stages") if isinstance(obj, dict) else None
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON object with a 'stages' list")
    fields = {f.name for f in dataclasses.fields(StageConfig)}
    out = []
    for i, d in enumerate(items):
        bad = set(d) - fields
        if bad:
            raise ValueError(f"{path}: stage {i} has unknown keys {sorted(bad)}; known: {sorted(fields)}")
        out.append(StageConfig(**d))
    return out


def select_stages(stages: list, names) -> list:
    """The stages named in ``names`` (a list or comma-separated string), in recipe order."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if n not in STAGES]
    if bad:
        raise ValueError(f"unknown stages {bad}; expected names from {STAGES}")
    by_name = {s.name: s for s in stages}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no config for stages {missing}")
    return [by_name[n] for n in STAGES if n in names]
