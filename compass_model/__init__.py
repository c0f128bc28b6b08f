"""Compass model layer: the Compass-v3 MoE transformer (16 experts, top-2) on compass_kernels.

``CompassConfig.from_preset("tiny" | "small" | "proxy-2b" | "compass-v3" | "compass-v3-top4")``
-> ``CompassForCausalLM``;
``generate`` (greedy / top-p / MTP speculative), the SFT, DPO and OTPO losses, and safetensors
checkpoints. The MoE path uses compass_kernels' public API only.
"""

from compass_model._deps import check_installed

check_installed("safetensors", "model", "compass_model (checkpoints)")

from compass_model.checkpoint import from_pretrained, save_pretrained
from compass_model.config import PRESETS, CompassConfig
from compass_model.generate import GenerationOutput, generate, sample
from compass_model.losses import (
    dpo_loss,
    mixed_loss_mask,
    otpo_loss,
    otpo_weights,
    sequence_logprobs,
    sft_mixed_loss,
    token_logprobs,
)
from compass_model.model import CompassForCausalLM, CompassOutput
from compass_model.moe import MoE, Router, aux_loss_coefficient
from compass_model.rope import rope_frequencies

__all__ = [
    "PRESETS",
    "CompassConfig",
    "CompassForCausalLM",
    "CompassOutput",
    "GenerationOutput",
    "MoE",
    "Router",
    "aux_loss_coefficient",
    "dpo_loss",
    "from_pretrained",
    "generate",
    "mixed_loss_mask",
    "otpo_loss",
    "otpo_weights",
    "rope_frequencies",
    "sample",
    "save_pretrained",
    "sequence_logprobs",
    "sft_mixed_loss",
    "token_logprobs",
]
