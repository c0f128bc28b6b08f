"""Activation checkpointing for ``compass train --activation-checkpointing``: selective recompute.

The attention sublayer of every block and the grouped experts of every MoE layer (or the dense FFN)
run under ``torch.utils.checkpoint`` (non-reentrant): their inner activations (q / k / v, the
experts' gate|up and SwiGLU outputs: most of a block's memory) are dropped after the forward and
recomputed in the backward. The router, the token dispatch and its all-to-alls are not recomputed,
so the recompute issues no collective and the bias update's load is counted once. Same losses and
gradients as without (tested); costs one more forward of those parts.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import checkpoint

from compass_model.moe import MoE


def _recomputed(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        return checkpoint(fn, *args, use_reentrant=False, **kwargs)
    return run


def apply_activation_checkpointing(model) -> None:
    """Wrap, in place, each block's attention and FFN experts (see the module doc)."""
    for block in [*model.layers, *(m.block for m in model.mtp)]:
        block.attn.forward = _recomputed(block.attn.forward)
        if isinstance(block.ffn, MoE):
            block.ffn.experts = _recomputed(block.ffn.experts)
        else:
            block.ffn.forward = _recomputed(block.ffn.forward)
