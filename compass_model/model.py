"""The Compass MoE transformer: GQA attention with RoPE, MoE (or dense) SwiGLU blocks, MTP modules.

Conventions: ``labels [B, S]`` are already shifted, ``labels[:, i]`` is the token position i must
predict (-100: no loss), and ``loss_mask [B, S]`` weights those positions (SFT mixed loss). The
MoE path goes through compass_kernels' public API only (``compass_model.moe``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compass_model.checkpoint_files import load_pretrained, save_pretrained
from compass_model.config import CompassConfig
from compass_model.losses import sft_mixed_loss
from compass_model.moe import MoE, SwiGLU, aux_loss_coefficient
from compass_model.rope import apply_rope, rope_cache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()                                  # fp32 statistics: bf16 sums of squares lose ~3 digits
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class KVCache(nn.Module):
    """Static K/V buffers ``[B, KV, max_len, hd]`` written at ``input_pos``. Entries past the last
    accepted token may hold rejected speculative tokens: the position mask hides them and the next
    write overwrites them, so nothing is rolled back."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k_BKSD: torch.Tensor, v_BKSD: torch.Tensor):
        self.k.index_copy_(2, input_pos, k_BKSD.to(self.k.dtype))
        self.v.index_copy_(2, input_pos, v_BKSD.to(self.v.dtype))
        return self.k, self.v


class Attention(nn.Module):
    """Grouped-query attention through ``scaled_dot_product_attention``."""

    def __init__(self, config: CompassConfig):
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.wq = nn.Linear(d, config.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(config.n_heads * hd, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x_BSD, cos_SR, sin_SR, input_pos=None, attn_mask_BSS=None):
        """``attn_mask_BSS``: bool ``[B, S, S]`` (True = may attend), e.g. the document-causal mask
        of packed rows; None = causal. ``cos/sin``: ``[S, R]`` or per-row ``[B, 1, S, R]``."""
        B, S, _ = x_BSD.shape
        q = self.wq(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)       # [B, H, S, hd]
        k = self.wk(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)    # [B, KV, S, hd]
        v = self.wv(x_BSD).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos_SR, sin_SR), apply_rope(k, cos_SR, sin_SR)
        mask = None if attn_mask_BSS is None else attn_mask_BSS[:, None]
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)                                  # [B, KV, L, hd]
            mask = torch.arange(k.shape[2], device=x_BSD.device)[None, :] <= input_pos[:, None]   # [S, L]
        rep = self.n_heads // self.n_kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x))``, ``out = h + ffn(norm(h))``; ffn is MoE or dense.
    Returns ``(out, router)``, router None for a dense block (see ``MoE.forward``)."""

    def __init__(self, config: CompassConfig, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = MoE(config) if moe else SwiGLU(config.d_model, config.dense_ffn_dim)

    def forward(self, x_BSD, cos_SR, sin_SR, input_pos=None, attn_mask_BSS=None):
        h = x_BSD + self.attn(self.attn_norm(x_BSD), cos_SR, sin_SR, input_pos, attn_mask_BSS)
        if isinstance(self.ffn, MoE):
            f, router = self.ffn(self.ffn_norm(h))
            return h + f, router
        return h + self.ffn(self.ffn_norm(h)), None


class MTPModule(nn.Module):
    """One multi-token-prediction depth (DeepSeek-V3): ``h'_i = block(M [norm(Emb(t_{i+k})); norm(h_i)])``.
    The embedding, final norm and head are the main model's (passed in / applied by the caller)."""

    def __init__(self, config: CompassConfig):
        super().__init__()
        d = config.d_model
        self.emb_norm = RMSNorm(d, config.norm_eps)
        self.hidden_norm = RMSNorm(d, config.norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(config, moe=config.n_moe_layers > 0)

    def forward(self, h_BSD, emb_BSD, cos_SR, sin_SR, input_pos=None, attn_mask_BSS=None):
        x = self.proj(torch.cat([self.emb_norm(emb_BSD), self.hidden_norm(h_BSD)], dim=-1))
        return self.block(x, cos_SR, sin_SR, input_pos, attn_mask_BSS)


@dataclass
class CompassOutput:
    logits: torch.Tensor                       # [B, S, V], the model dtype
    loss: torch.Tensor | None = None           # fp32 total: lm + lambda mtp + alpha_t aux + z_coef z
    losses: dict[str, torch.Tensor] = field(default_factory=dict)   # lm, mtp (with labels), aux, z
    router_stats: list[dict] = field(default_factory=list)          # one per MoE block (trunk, then MTP)
    hidden: torch.Tensor | None = None         # [B, S, D] last hidden states after the final norm (OTPO)


class CompassForCausalLM(nn.Module):
    def __init__(self, config: CompassConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, moe=i >= config.n_dense_layers) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.mtp_depth))
        # optimizer steps taken: drives the aux-coefficient decay; saved, so a resumed run continues it
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self._build_rope()
        self._init_weights()
        for name, p in self.named_parameters():      # router weights stay fp32 (see Router)
            if not name.endswith("router.weight"):
                p.data = p.data.to(config.torch_dtype)

    def _build_rope(self) -> None:
        cos, sin = rope_cache(self.config)
        device = self.embed.weight.device
        self.register_buffer("rope_cos", cos.to(device), persistent=False)     # [max_seq_len, hd/2]
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def _init_weights(self) -> None:
        # GPT-2: residual-stream output projections scaled by 1/sqrt(2 L) so the stream's variance
        # does not grow with depth.
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if p.dim() == 1:
                nn.init.ones_(p)                       # RMSNorm gains
            elif name.endswith(("wo.weight", "w2.weight", "w2_EFD")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def set_rope(self, **rope_fields) -> None:
        """Switch RoPE for the next training stage, e.g. ``set_rope(rope_scaling="yarn",
        rope_factor=4, rope_original_max_len=32768, max_seq_len=131072)``."""
        bad = set(rope_fields) - {"rope_base", "rope_scaling", "rope_factor", "rope_original_max_len",
                                  "yarn_beta_fast", "yarn_beta_slow", "max_seq_len"}
        if bad:
            raise ValueError(f"set_rope changes RoPE fields only, got {sorted(bad)}")
        self.config = self.config.replace(**rope_fields)
        self._build_rope()

    # ---------------------------------------------------------------------------------------------
    # forward

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def _rope(self, S: int, input_pos, position_ids=None):
        n = self.rope_cos.shape[0]
        if position_ids is not None:            # packed rows: per-row positions -> [B, 1, S, R]
            if position_ids.device.type == "cpu" and position_ids.numel() and not torch.compiler.is_compiling():
                if int(position_ids.max()) >= n or int(position_ids.min()) < 0:
                    raise ValueError(f"position_ids must be in [0, max_seq_len = {n}), got "
                                     f"[{int(position_ids.min())}, {int(position_ids.max())}]")
            return self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]
        if input_pos is None:
            if S > n:
                raise ValueError(f"sequence length {S} exceeds max_seq_len = {n}")
            return self.rope_cos[:S], self.rope_sin[:S]
        # positions are read on the host only for CPU tensors: no device sync on the decode path
        if input_pos.device.type == "cpu" and input_pos.numel() and not torch.compiler.is_compiling():
            if int(input_pos.max()) >= n:
                raise ValueError(f"position {int(input_pos.max())} exceeds max_seq_len = {n}")
        return self.rope_cos[input_pos], self.rope_sin[input_pos]

    def _trunk(self, input_ids: torch.Tensor, input_pos=None, position_ids=None, attention_mask=None):
        """-> last block output ``h [B, S, D]`` (before the final norm), the routers, (cos, sin)."""
        cos, sin = self._rope(input_ids.shape[1], input_pos, position_ids)
        x = self.embed(input_ids)
        routers = []
        for layer in self.layers:
            x, r = layer(x, cos, sin, input_pos, attention_mask)
            if r is not None:
                routers.append(r)
        return x, routers, (cos, sin)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                loss_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, num_tokens=None) -> CompassOutput:
        """``input_ids [B, S]`` -> ``CompassOutput``. With labels: ``lm`` the (mask-weighted) CE,
        ``mtp`` the mean CE over MTP depths (depth k at position i predicts labels[:, i + k]), and
        ``aux`` / ``z`` averaged over the MoE blocks that ran, so their coefficients do not depend on
        depth. ``loss = lm + mtp_loss_weight mtp + alpha(step) aux + z_loss_coef z``.

        Packed rows (``compass_model.data.PackedBatch``): ``position_ids [B, S]`` restart per document
        (RoPE), ``attention_mask [B, S, S]`` bool keeps documents apart, and an MTP position counts only
        if the token k ahead is in the same document (its position is k more). ``num_tokens``: the
        LM and MTP loss denominator (the global LM mask sum under gradient accumulation or expert
        parallelism, so micro-batches and ranks add up to the whole step's loss); None = this batch's
        own mask sums (the LM's and each MTP depth's)."""
        c = self.config
        S = input_ids.shape[1]
        h, routers, (cos, sin) = self._trunk(input_ids, None, position_ids, attention_mask)
        hidden = self.norm(h)
        logits = self.head(hidden)
        losses: dict[str, torch.Tensor] = {}
        if labels is not None:
            losses["lm"] = sft_mixed_loss(logits, labels, loss_mask, num_tokens)
            mtp_ce = []
            h_k = h
            for k, module in enumerate(self.mtp, start=1):
                if S - k < 1:
                    break
                n = S - k
                mask_k = None if attention_mask is None else attention_mask[:, :n, :n]
                h_k, r = module(h_k[:, :n], self.embed(input_ids[:, k:]), cos[..., :n, :], sin[..., :n, :],
                                None, mask_k)
                routers += [r] if r is not None else []
                w_k = None if loss_mask is None else loss_mask[:, k:]
                if position_ids is not None:
                    same_doc = (position_ids[:, k:] == position_ids[:, :n] + k).float()
                    w_k = same_doc if w_k is None else w_k * same_doc
                mtp_ce.append(sft_mixed_loss(self.head(self.norm(h_k)), labels[:, k:], w_k, num_tokens))
            losses["mtp"] = torch.stack(mtp_ce).mean() if mtp_ce else logits.new_zeros((), dtype=torch.float32)
        zero = logits.new_zeros((), dtype=torch.float32)
        losses["aux"] = torch.stack([r["aux"] for r in routers]).mean() if routers else zero
        losses["z"] = torch.stack([r["z"] for r in routers]).mean() if routers else zero
        loss = None
        if labels is not None:
            loss = (losses["lm"] + c.mtp_loss_weight * losses["mtp"]
                    + aux_loss_coefficient(c, self.step) * losses["aux"] + c.z_loss_coef * losses["z"])
        return CompassOutput(logits=logits, loss=loss, losses=losses, hidden=hidden,
                             router_stats=[r["stats"] for r in routers])

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Call once per optimizer step: advances the aux-coefficient schedule and applies the
        aux-loss-free bias update from the load seen since the previous call."""
        self.step += 1
        for moe in self.moe_layers():
            moe.router.update_bias()

    # ---------------------------------------------------------------------------------------------
    # cached decoding (used by compass_model.generate)

    def setup_caches(self, batch: int, max_len: int) -> None:
        dtype, device = self.config.torch_dtype, self.embed.weight.device
        for m in self.modules():
            if isinstance(m, Attention):
                m.kv_cache = KVCache(batch, m.n_kv_heads, max_len, m.head_dim, dtype, device)

    def clear_caches(self) -> None:
        for m in self.modules():
            if isinstance(m, Attention):
                m.kv_cache = None

    def decode(self, input_ids: torch.Tensor, input_pos: torch.Tensor):
        """Cached forward of new tokens ``[B, n]`` at positions ``input_pos [n]`` ->
        (logits [B, n, V], h [B, n, D] before the final norm, the MTP module's input)."""
        h, _, _ = self._trunk(input_ids, input_pos)
        return self.head(self.norm(h)), h

    def mtp_decode(self, h_BnD: torch.Tensor, next_ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """Cached depth-1 MTP: trunk states ``h`` at ``input_pos`` and the tokens that follow them ->
        logits [B, n, V] for the token after those (the speculative draft)."""
        cos, sin = self._rope(h_BnD.shape[1], input_pos)
        h1, _ = self.mtp[0](h_BnD, self.embed(next_ids), cos, sin, input_pos)
        return self.head(self.norm(h1))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, **kwargs):
        """See ``compass_model.generate.generate``."""
        from compass_model.generate import generate

        return generate(self, input_ids, max_new_tokens, **kwargs)

    # ---------------------------------------------------------------------------------------------
    # checkpoints and cost model

    def save_pretrained(self, directory) -> None:
        """Write ``directory/model.safetensors`` and ``config.json`` (``checkpoint.py``)."""
        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, device=None) -> CompassForCausalLM:
        """The full-precision model saved in ``directory`` (weights verified, loaded strictly); an
        FP8 directory loads with ``compass_model.from_pretrained``."""
        model = load_pretrained(cls, directory)
        return model if device is None else model.to(device)

    def num_parameters(self, include_mtp: bool = False) -> int:
        return self.config.num_parameters(include_mtp)

    def active_parameters(self, include_mtp: bool = False) -> int:
        return self.config.active_parameters(include_mtp)

    def flops_per_token(self, seq_len: int | None = None, training: bool = True) -> int:
        return self.config.flops_per_token(seq_len, training, include_mtp=training and self.config.mtp_depth > 0)
