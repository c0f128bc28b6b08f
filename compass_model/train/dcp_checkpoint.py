"""Distributed checkpoints: the model and the optimizer state with ``torch.distributed.checkpoint``.

A distributed run's checkpoint directory ``step-NNNNNN`` holds ``config.json``, ``trainer.pt``
(step, layout, the run's fingerprint) and two DCP directories, each tensor saved as its global
tensor: ``model/``, the model's state dict under the dense model's names (every parameter and
persistent buffer), and ``optimizer/``, the AdamW state keyed ``<param name>.<exp_avg|exp_avg_sq|step>``:

  FSDP2-sharded parameters     their DTensor states (Shard(0) over the world)
  expert shards (EPMoE)        viewed as DTensors of all E experts on the (dp, ep) mesh:
                               (Shard(1), Shard(0)) under FSDP2, (Replicate(), Shard(0)) without
  replicated parameters        plain tensors (DCP writes one copy)

so every rank writes only its shards (nothing is gathered), and a resume at another layout (other
dp / ep) reads the slices it now owns: DCP reshards. One process (``from_pretrained``, export,
evaluation, a single-process resume) consolidates ``model/`` into the dense model
(``checkpoint.load_sharded_weights``). Both directories are written under temporary names by all
ranks, then moved into the step directory by rank 0 before ``LATEST`` names it
(``state.save_checkpoint``), so a kill at any point leaves the previous checkpoint in place.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from compass_model.checkpoint import SHARDED_WEIGHTS_DIR
from compass_model.distributed import is_expert_param
from compass_model.train.state import save_checkpoint

OPTIMIZER_DIR = "optimizer"


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _named_params(model, opt) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) in the optimizer's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(names[id(p)], p) for g in opt.param_groups for p in g["params"]]


def _global_view(t: torch.Tensor, name: str, model, ctx):
    """An expert shard's tensor as a DTensor of all E experts on the (dp, ep) mesh: dim 0 over ep,
    dim 1 over dp under FSDP2 (replicated over dp otherwise); anything else unchanged."""
    if ctx is None or ctx.ep == 1 or not is_expert_param(name, model) or t.dim() == 0:
        return t
    from torch.distributed.tensor import DTensor, Replicate, Shard

    shape = (t.shape[0] * ctx.ep, *t.shape[1:])                 # t.shape: global over dp already
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(_local(t), ctx.mesh, [Shard(1) if ctx.fsdp else Replicate(), Shard(0)],
                              run_check=False, shape=shape, stride=stride)


def model_state(model, ctx) -> dict:
    """The model's state dict (dense names) as global (DTensor) views of this rank's shards."""
    return {k: _global_view(v, k, model, ctx) for k, v in model.state_dict().items()}


def optimizer_state(model, opt, ctx) -> dict:
    """The optimizer state keyed ``<param>.<field>`` as global (DTensor) views; see the module doc."""
    out = {}
    for name, p in _named_params(model, opt):
        for field, t in opt.state.get(p, {}).items():
            out[f"{name}.{field}"] = _global_view(t, name, model, ctx)
    return out


def save_distributed_checkpoint(stage_dir, model, opt, step: int, done: bool, ctx, keep_last: int = 1,
                                run: dict | None = None, extra: dict | None = None) -> None:
    """Collective: every rank writes its model and optimizer shards, atomically (``keep_last``, the
    run fingerprint ``run`` and the trainer's ``extra``: as ``state.save_checkpoint``)."""
    import torch.distributed.checkpoint as dcp

    stage_dir = Path(stage_dir)
    tmp_model, tmp_opt = stage_dir / f".model-{step:06d}", stage_dir / f".opt-{step:06d}"
    if ctx.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    dcp.save(model_state(model, ctx), checkpoint_id=str(tmp_model))
    dcp.save(optimizer_state(model, opt, ctx), checkpoint_id=str(tmp_opt))
    dist.barrier()
    if ctx.is_main:
        save_checkpoint(stage_dir, model, None, step, done, extra={**(extra or {}), "dp": ctx.dp, "ep": ctx.ep},
                        extra_files={SHARDED_WEIGHTS_DIR: tmp_model, OPTIMIZER_DIR: tmp_opt},
                        keep_last=keep_last, run=run, weights=False)
    dist.barrier()


def laid_out_model(src, ctx, *, config=None, stage=None, device=None, prepare=None):
    """The model of checkpoint ``src`` (None: a fresh ``config`` model; the caller seeded) laid out
    for ``ctx`` (``parallel.shard``, ``stage`` for its precision). ``prepare(model)`` runs on the
    dense-shaped model before sharding (e.g. a RoPE extension). Under ``ctx`` a sharded checkpoint is
    read shard by shard into the laid-out model; otherwise ``from_pretrained`` (which consolidates
    a sharded one in this process)."""
    from compass_model.checkpoint import from_pretrained, has_sharded_weights, load_config
    from compass_model.model import CompassForCausalLM
    from compass_model.train.parallel import shard

    sharded = ctx is not None and src is not None and has_sharded_weights(src)
    if src is None or sharded:
        model = CompassForCausalLM(load_config(src) if sharded else config)
        model = model if device is None else model.to(device)
    else:
        model = from_pretrained(src, device)
    if prepare is not None:
        prepare(model)
    model = shard(model, ctx, stage)
    if sharded:
        load_model_shards(src, model, ctx)
    return model


@torch.no_grad()
def load_model_shards(ckpt_dir, model, ctx) -> None:
    """Fill ``model`` (already laid out for ``ctx``) from a distributed checkpoint's ``model/``:
    each rank reads only the slices it owns, whatever layout wrote them."""
    import torch.distributed.checkpoint as dcp

    own = model.state_dict()
    targets = model_state(model, ctx)
    dcp.load(targets, checkpoint_id=str(Path(ckpt_dir) / SHARDED_WEIGHTS_DIR))
    for k, t in targets.items():
        if t is not own[k]:                 # an expert shard's view: copy its local part back
            _local(own[k]).copy_(_local(t))


def load_optimizer(ckpt_dir, trainer: dict, model, opt, ctx) -> None:
    """Load a checkpoint's optimizer state into ``opt`` for this rank's layout (any dp / ep, or one
    process: DCP reads the slices this rank owns)."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / OPTIMIZER_DIR).is_dir():
        if ctx is not None:
            raise ValueError(f"{ckpt_dir} is a single-process checkpoint (optimizer state in trainer.pt); "
                             "resume it in one process, or start the stage afresh with --dp / --ep")
        saved = trainer.get("optimizer")
        if saved is not None:
            if len(saved["param_groups"]) != len(opt.param_groups):
                raise ValueError(f"{ckpt_dir}: its optimizer state has {len(saved['param_groups'])} parameter "
                                 f"group(s), this optimizer {len(opt.param_groups)} (weight decay on matrices, "
                                 "none on vectors); a checkpoint of an earlier alignment optimizer cannot "
                                 "resume: start the stage afresh")
            opt.load_state_dict(saved)
        return
    import torch.distributed.checkpoint as dcp

    saved = dcp.FileSystemReader(str(ckpt_dir / OPTIMIZER_DIR)).read_metadata().state_dict_metadata
    named = _named_params(model, opt)
    targets, fields = {}, []
    for i, (name, p) in enumerate(named):
        for field in ("step", "exp_avg", "exp_avg_sq"):
            key = f"{name}.{field}"
            if key in saved:
                held = torch.zeros((), dtype=torch.float32) if field == "step" else torch.zeros_like(p.detach())
                targets[key] = _global_view(held, name, model, ctx)
                fields.append((i, field, key, held))
    dcp.load(targets, checkpoint_id=str(ckpt_dir / OPTIMIZER_DIR))
    sd = opt.state_dict()
    state: dict = {}
    for i, field, key, held in fields:
        if targets[key] is not held:            # an expert shard's view: copy its local part back
            _local(held).copy_(_local(targets[key]))
        state.setdefault(i, {})[field] = held
    sd["state"] = state
    opt.load_state_dict(sd)
