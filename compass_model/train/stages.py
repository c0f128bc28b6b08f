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

STAGES = ("general", "ecommerce", "reasoning", "long_context", "mtp", "sft", "align")   # kinds, recipe order
PRETRAIN_STAGES = ("general", "ecommerce", "reasoning", "long_context", "mtp")
PRECISIONS = ("fp32", "bf16")
_LONG = "long_context"


def stage_kind(name: str) -> str:
    """``long_context_<anything>`` -> ``long_context``; other names are their own kind."""
    return _LONG if name.startswith(_LONG + "_") else name


@dataclass(frozen=True)
class StageConfig:
    """One stage of the recipe: its steps, batch shape, optimisation, precision, data kind and, for
    alignment, the preference settings (fields checked on construction)."""
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
    mtp_loss_weight: float | None = None  # lambda on MTP steps; None: the model config's (0: off)
    mtp_every: int = 1               # MTP loss on steps where step % mtp_every == 0
    rope_factor: float = 1.0         # > 1: YaRN, context x factor over the previous stage's
    save_every: int = 1              # checkpoint every n steps (and at the end)
    # pretraining and SFT: every ``retrieval_every``-th step adds a micro-batch of ``retrieval_rows`` rows
    # of ``retrieval_seq_len`` tokens (0: ``seq_len``) of voucher-code retrieval drawn afresh for the step
    # (train/data.py): at the curriculum lengths up to ``seq_len``, or, for rows longer than ``seq_len``,
    # at those above it (SFT at the base context keeps the 4x skill that way). 0 rows: off
    retrieval_rows: int = 0
    retrieval_seq_len: int = 0
    retrieval_every: int = 1
    # alignment only
    beta: float = 0.1
    sft_weight: float = 0.0          # RPO: + this x the chosen answers' NLL (0: pure DPO / OTPO, the paper)
    compare_nll: bool = False        # also align the other way (NLL weight 1 if sft_weight is 0, else 0) and
                                     # report both models' accuracy (report.json: alignment.nll_term)
    n_pairs: int = 64
    eval_pairs: int = 32

    def __post_init__(self):
        if stage_kind(self.name) not in STAGES or self.name == _LONG + "_":
            raise ValueError(f"stage name must be one of {STAGES} or long_context_<suffix>, got {self.name!r}")
        for f in ("steps", "rows", "grad_accum", "seq_len", "mtp_every", "save_every", "retrieval_rows",
                  "retrieval_seq_len", "retrieval_every"):
            v, low = getattr(self, f), 0 if f in ("steps", "retrieval_rows", "retrieval_seq_len") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"stage {self.name}: {f} must be an int >= {low}, got {v!r}")
        if self.retrieval_rows and self.kind == "align":
            raise ValueError(f"stage {self.name}: retrieval_rows needs a pretraining or sft stage, not alignment")
        if self.retrieval_seq_len and self.retrieval_seq_len < 64:
            raise ValueError(f"stage {self.name}: retrieval_seq_len must be 0 (the stage's seq_len) or >= 64 "
                             f"tokens, got {self.retrieval_seq_len}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"stage {self.name}: precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not self.lr > 0 or self.warmup_steps < 0 or not 0 <= self.min_lr_ratio <= 1 or self.clip <= 0:
            raise ValueError(f"stage {self.name}: need lr > 0, warmup_steps >= 0, 0 <= min_lr_ratio <= 1, clip > 0")
        if self.rope_factor < 1:
            raise ValueError(f"stage {self.name}: rope_factor must be >= 1, got {self.rope_factor}")
        if self.mtp_loss_weight is not None and not self.mtp_loss_weight >= 0:
            raise ValueError(f"stage {self.name}: mtp_loss_weight must be None or >= 0, got {self.mtp_loss_weight}")
        if not isinstance(self.compare_nll, bool):
            raise ValueError(f"stage {self.name}: compare_nll must be a bool, got {self.compare_nll!r}")
        if not self.sft_weight >= 0:
            raise ValueError(f"stage {self.name}: sft_weight must be >= 0, got {self.sft_weight}")

    @property
    def kind(self) -> str:
        """The stage kind (``stage_kind``): ``long_context`` for every ``long_context_*`` phase."""
        return stage_kind(self.name)

    @property
    def retrieval_len(self) -> int:
        """The row length of the stage's retrieval micro-batch (``retrieval_seq_len``, else ``seq_len``)."""
        return self.retrieval_seq_len or self.seq_len

    @property
    def data_kind(self) -> str:
        """The data the stage trains on (``data``, else its kind)."""
        return self.data or self.kind

    def mtp_weight(self, model_config) -> float:
        """The MTP loss weight this stage trains with: its own, else the model config's
        ``mtp_loss_weight`` in pretraining and SFT stages (0 without an MTP module)."""
        if model_config.mtp_depth == 0:
            return 0.0
        if self.mtp_loss_weight is not None:
            return self.mtp_loss_weight
        return model_config.mtp_loss_weight if self.kind in (*PRETRAIN_STAGES, "sft") else 0.0

    def replace(self, **changes) -> StageConfig:
        """A copy with ``changes`` applied (and checked)."""
        return dataclasses.replace(self, **changes)


def demo_stages(base_context: int = 256) -> list:
    """The tiny preset's schedule for ``compass demo`` (2-core CPU). Context: general/ecommerce at
    base/2, reasoning and SFT at base, then two YaRN phases: ``long_context_2x`` (x2 over the base)
    and ``long_context_4x`` (x2 over that, 4 x base in all). MTP at the preset's weight throughout
    (SFT included: the final model's draft module must match its trunk for speculative decoding).
    Voucher-code retrieval (``data/passkey.py``) runs through reasoning, both YaRN phases and SFT at
    the curriculum lengths (the context halved down to 64 tokens). general, ecommerce and reasoning
    add a micro-batch of fresh retrieval rows every step (3000 steps at lr 3e-3): at this size the
    search forms only after ~1000 steps of dense retrieval, mostly during reasoning's 1500 steps at
    the base context (docs/algorithms.md); SFT's extra 1024-token row every second step keeps the 4x
    skill while it trains at the base context.
    Alignment is the paper's (no NLL term) and is also run with the term, so ``report.json`` shows
    the accuracy both ways (``alignment.nll_term``)."""
    half = base_context // 2
    return [
        StageConfig("general", steps=500, rows=16, seq_len=half, lr=3e-3, warmup_steps=25, retrieval_rows=4),
        StageConfig("ecommerce", steps=1000, rows=16, seq_len=half, lr=3e-3, warmup_steps=20, retrieval_rows=8),
        StageConfig("reasoning", steps=1500, rows=4, seq_len=base_context, lr=3e-3, warmup_steps=20,
                    retrieval_rows=8),
        StageConfig("long_context_2x", steps=150, rows=4, seq_len=2 * base_context, lr=1e-3, warmup_steps=10,
                    rope_factor=2.0),
        StageConfig("long_context_4x", steps=150, rows=2, seq_len=4 * base_context, lr=1e-3, warmup_steps=10,
                    rope_factor=2.0),
        StageConfig("sft", steps=1000, rows=8, seq_len=base_context, lr=2e-3, warmup_steps=30,
                    retrieval_rows=1, retrieval_seq_len=4 * base_context, retrieval_every=2),
        StageConfig("align", steps=100, rows=8, seq_len=base_context, lr=1e-4, warmup_steps=10, n_pairs=128,
                    eval_pairs=48, compare_nll=True),
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
    """The stages named in ``names`` (a list or comma-separated string), in recipe order (stages of
    one kind, such as the ``long_context_*`` phases, keep the order of ``stages``)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in names if stage_kind(n) not in STAGES or n == _LONG + "_"]
    if bad:
        raise ValueError(f"unknown stages {bad}; expected names from {STAGES} or long_context_<suffix>")
    by_name = {s.name: s for s in stages}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise ValueError(f"no config for stages {missing}")
    picked = [s for s in stages if s.name in names]
    return sorted(picked, key=lambda s: STAGES.index(s.kind))      # stable: phases keep their order
