"""``compass train``'s model config and stage list: ``--preset`` or ``--config FILE``, ``--stages``,
``--steps``, ``--save-every``, ``--dtype``, each checked field by field so that a bad file says which
field holds what, and what was expected.

Config file: ``{"model": {"preset": NAME, field: value, ...}, "stages": [{"name": ..., field: ...}]}``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from pathlib import Path

STAGE_LIST = "general,ecommerce,reasoning,long_context_2x,long_context_4x,sft,align"
# the default checkpoint spacing: about 20 checkpoints per stage, at least one every 100 steps
AUTO_SAVES_PER_STAGE, AUTO_SAVE_MAX_EVERY = 20, 100


class UsageError(ValueError):
    """A bad command line or config file: the message is the whole story (cause and fix)."""


_TYPE_NAMES = {int: "an int", float: "a number", str: "a string", bool: "true or false"}


def _accepts(kinds: tuple, v) -> bool:
    if v is None:
        return type(None) in kinds
    if isinstance(v, bool):
        return bool in kinds
    if isinstance(v, int):
        return int in kinds or float in kinds
    if isinstance(v, float):
        return float in kinds
    return type(v) in kinds


def check_fields(cls, obj, where: str) -> dict:
    """``obj`` checked against the dataclass ``cls``: a JSON object, known keys, each value of its
    field's type (ints where an int is declared, numbers for floats, ``null`` where None is allowed)."""
    if not isinstance(obj, dict):
        raise UsageError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - fields)
    if unknown:
        raise UsageError(f"{where}: unknown field(s) {unknown}; known: {sorted(fields)}")
    for k, v in obj.items():
        kinds = typing.get_args(hints[k]) or (hints[k],)
        if not _accepts(kinds, v):
            want = " or ".join("null" if t is type(None) else _TYPE_NAMES.get(t, t.__name__) for t in kinds)
            raise UsageError(f"{where}: field {k!r} must be {want}, got {type(v).__name__} {v!r}")
        if isinstance(v, float) and not math.isfinite(v):
            raise UsageError(f"{where}: field {k!r} must be finite, got {v!r}")
    return obj


def read_config_file(path) -> dict:
    """Read a ``--config`` JSON file into a dict; a ``UsageError`` naming the file when it is missing or invalid."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {p}: no such file")
    try:
        obj = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"--config {p}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise UsageError(f'--config {p}: expected a JSON object {{"model": {{...}}, "stages": [...]}}, '
                         f"got a {type(obj).__name__}")
    unknown = sorted(set(obj) - {"model", "stages"})
    if unknown:
        raise UsageError(f'--config {p}: unknown top-level key(s) {unknown}; expected "model" and "stages"')
    return obj


def model_config(args):
    """(CompassConfig, the config file's dict or {})."""
    from compass_model import CompassConfig
    if not getattr(args, "config", None):
        return CompassConfig.from_preset(args.preset), {}
    obj = read_config_file(args.config)
    model = dict(obj.get("model") or {})
    preset = model.pop("preset", None)
    check_fields(CompassConfig, model, f"--config {args.config}: model")
    try:
        return (CompassConfig.from_preset(preset, **model) if preset else CompassConfig(**model)), obj
    except (TypeError, ValueError) as e:
        raise UsageError(f"--config {args.config}: model: {e}") from None


def stage_list(args, cfg_obj: dict) -> list:
    """The StageConfigs to train, in recipe order, with the command line's overrides."""
    from compass_model.train.stages import StageConfig, demo_stages, select_stages
    names = [n.strip() for n in (args.stages or "").split(",") if n.strip()]
    if not names:
        raise UsageError(f"--stages {args.stages!r} names no stage; give a comma-separated list from {STAGE_LIST}")
    stages = demo_stages()
    explicit_save = set()
    if cfg_obj.get("stages") is not None:
        if not isinstance(cfg_obj["stages"], list):
            raise UsageError(f"--config {args.config}: \"stages\" must be a list of objects")
        by = {s.name: s for s in stages}
        for i, d in enumerate(cfg_obj["stages"]):
            where = f"--config {args.config}: stages[{i}]"
            check_fields(StageConfig, d, where)
            try:
                base = by.get(d.get("name"))
                by[d["name"]] = base.replace(**d) if base is not None else StageConfig(**d)
            except (KeyError, TypeError, ValueError) as e:
                raise UsageError(f"{where}: {e}") from None
            if "save_every" in d:
                explicit_save.add(d["name"])
        stages = list(by.values())
    try:
        stages = select_stages(stages, names)
    except ValueError as e:
        raise UsageError(f"--stages: {e}") from None
    if args.steps is not None:
        stages = [s.replace(steps=args.steps, warmup_steps=min(s.warmup_steps, max(0, args.steps // 5)),
                            n_pairs=min(s.n_pairs, max(8, 4 * args.steps)), eval_pairs=min(s.eval_pairs, 8))
                  for s in stages]
    out = []
    for s in stages:
        if args.save_every is not None:
            s = s.replace(save_every=args.save_every)
        elif s.name not in explicit_save:
            s = s.replace(save_every=auto_save_every(s.steps))
        if getattr(args, "dtype", None):
            s = s.replace(precision=train_precision(args.dtype))
        out.append(s)
    return out


def auto_save_every(steps: int) -> int:
    """About ``AUTO_SAVES_PER_STAGE`` checkpoints per stage, at most ``AUTO_SAVE_MAX_EVERY`` steps apart."""
    return max(1, min(AUTO_SAVE_MAX_EVERY, -(-steps // AUTO_SAVES_PER_STAGE)))


def train_precision(dtype: str) -> str:
    """``--dtype`` for training: the stages' compute precision (weights and AdamW stay fp32)."""
    if dtype == "float16":
        raise UsageError("--dtype float16 cannot train (no loss scaling): use bfloat16 or float32")
    return "bf16" if dtype == "bfloat16" else "fp32"
