"""``CompassConfig``: the Compass MoE transformer's hyper-parameters, presets and cost model.

A frozen dataclass (gpt-fast ``ModelArgs`` style): derived fields are filled and everything is
validated in ``__post_init__``; ``CompassConfig.from_preset(name)`` returns one of ``PRESETS``. The
config owns the cost model (parameter counts, FLOPs per token, bytes moved) that bench/ and
profiling/ use, so MFU and bandwidth figures are never re-derived elsewhere.

Parameter layout (matches ``CompassForCausalLM`` exactly; a test checks the count):
  embedding V x d, head d x V (untied), final RMSNorm d;
  per block: RMSNorm x 2, attention q/o d x (H hd), k/v d x (KV hd), no biases;
  dense block FFN: SwiGLU 3 d f_dense; MoE block: router d x E (fp32), E experts of SwiGLU
  3 d f, optional shared expert SwiGLU 3 d f_shared;
  per MTP depth: 2 RMSNorms, projection 2d x d, one MoE block (embedding and head shared).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

ROPE_SCALINGS = ("none", "linear", "ntk", "yarn")
AUX_DECAYS = ("none", "linear", "cosine", "exp")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class CompassConfig:
    """Hyper-parameters of a Compass model (trunk, MoE, RoPE scaling, MTP, router losses), with presets
    (``from_preset``) and the cost model (parameters, FLOPs, bytes) derived from them."""
    # trunk
    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2                  # GQA: n_heads // n_kv_heads query heads share a K/V head
    head_dim: int | None = None          # None -> d_model // n_heads
    # feed-forward: dense layers first, then MoE layers
    num_experts: int = 16
    top_k: int = 2
    expert_ffn_dim: int = 128
    n_dense_layers: int = 0              # dense FFN blocks before the first MoE block
    dense_ffn_dim: int | None = None     # None -> top_k * expert_ffn_dim (same active width)
    shared_expert_dim: int = 0           # 0 -> no shared expert
    capacity_factor: float | None = None  # None -> no token dropping; applies in training only
    # router losses (docs/algorithms.md, "Router")
    aux_loss_coef: float = 1e-2
    aux_loss_decay: str = "none"         # none | linear | cosine | exp (half-life decay_steps)
    aux_loss_decay_steps: int = 0
    aux_loss_min_coef: float = 0.0      # the floor of the decay (never above aux_loss_coef)
    z_loss_coef: float = 1e-3
    router_bias_rate: float = 0.0        # aux-loss-free balancing gamma (DeepSeek-V3: 1e-3); 0 = off
    # multi-token prediction
    mtp_depth: int = 0
    mtp_loss_weight: float = 0.3         # lambda: 0.3 early, 0.1 late (DeepSeek-V3)
    # positions
    max_seq_len: int = 64
    rope_base: float = 10000.0
    rope_scaling: str = "none"           # none | linear | ntk | yarn
    rope_factor: float = 1.0
    rope_original_max_len: int | None = None  # None -> max_seq_len / rope_factor
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    # numerics
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen: fill derived fields)
        if self.head_dim is None:
            if self.n_heads <= 0 or self.d_model % self.n_heads:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) "
                                 "when head_dim is not given")
            set_("head_dim", self.d_model // self.n_heads)
        if self.dense_ffn_dim is None:
            set_("dense_ffn_dim", self.top_k * self.expert_ffn_dim)
        if self.rope_original_max_len is None:
            set_("rope_original_max_len", max(1, int(self.max_seq_len / self.rope_factor)))
        self._validate()

    def _validate(self) -> None:
        positive = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "num_experts",
                    "top_k", "expert_ffn_dim", "dense_ffn_dim", "max_seq_len", "rope_original_max_len")
        for name in positive:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            raise ValueError(f"n_dense_layers must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        if self.shared_expert_dim < 0 or self.mtp_depth < 0:
            raise ValueError("shared_expert_dim and mtp_depth must be >= 0")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or > 0, got {self.capacity_factor}")
        if self.aux_loss_decay not in AUX_DECAYS:
            raise ValueError(f"aux_loss_decay must be one of {AUX_DECAYS}, got {self.aux_loss_decay!r}")
        if self.aux_loss_decay != "none" and self.aux_loss_decay_steps < 1:
            raise ValueError(f"aux_loss_decay={self.aux_loss_decay!r} needs aux_loss_decay_steps >= 1")
        if min(self.aux_loss_coef, self.aux_loss_min_coef, self.z_loss_coef, self.router_bias_rate,
               self.mtp_loss_weight) < 0:
            raise ValueError("loss coefficients and router_bias_rate must be >= 0")
        if self.rope_scaling not in ROPE_SCALINGS:
            raise ValueError(f"rope_scaling must be one of {ROPE_SCALINGS}, got {self.rope_scaling!r}")
        if not self.rope_factor >= 1:
            raise ValueError(f"rope_factor must be >= 1, got {self.rope_factor}")
        if self.rope_base <= 1:
            raise ValueError(f"rope_base must be > 1, got {self.rope_base}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")

    # ---------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_preset(cls, name: str, **overrides) -> CompassConfig:
        """A preset with some fields overridden; derived fields (head_dim, ...) follow the overrides
        unless the preset gives them (``tiny`` fixes ``head_dim`` at 16)."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {tuple(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def replace(self, **changes) -> CompassConfig:
        """A copy with some fields changed, e.g. the RoPE scaling of the next training stage. Derived
        fields (head_dim, dense_ffn_dim, rope_original_max_len) keep their values unless given: a
        stage that raises max_seq_len keeps the original length YaRN measures against."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        """The config as indented JSON (every field)."""
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> CompassConfig:
        """The config from ``to_json``'s text."""
        return cls(**json.loads(text))

    @property
    def torch_dtype(self) -> torch.dtype:
        """``dtype`` as a ``torch.dtype``."""
        return DTYPES[self.dtype]

    @property
    def n_moe_layers(self) -> int:
        """The number of MoE blocks in the trunk (layers after the dense ones)."""
        return self.n_layers - self.n_dense_layers

    # ---------------------------------------------------------------------------------------------
    # cost model: parameters

    def _attn_params(self) -> int:
        return 2 * self.d_model * self.head_dim * (self.n_heads + self.n_kv_heads)

    def _block_params(self, moe: bool, active: bool) -> int:
        d = self.d_model
        n = self._attn_params() + 2 * d                            # attention + two RMSNorms
        if not moe:
            return n + 3 * d * self.dense_ffn_dim
        experts = self.top_k if active else self.num_experts
        return n + d * self.num_experts + experts * 3 * d * self.expert_ffn_dim + 3 * d * self.shared_expert_dim

    def _mtp_params(self, active: bool) -> int:
        d = self.d_model
        moe = self.n_moe_layers > 0
        return self.mtp_depth * (2 * d + 2 * d * d + self._block_params(moe, active))

    def num_parameters(self, include_mtp: bool = False) -> int:
        """All parameters (embedding and head included). The MTP modules are left out by default, as
        DeepSeek-V3 quotes 671B without its 14B MTP module; ``include_mtp=True`` counts what the model holds."""
        return self._count(active=False, include_mtp=include_mtp)

    def active_parameters(self, include_mtp: bool = False) -> int:
        """Parameters one token touches: every non-expert weight plus top_k routed experts per MoE block."""
        return self._count(active=True, include_mtp=include_mtp)

    def _count(self, active: bool, include_mtp: bool) -> int:
        d = self.d_model
        n = 2 * self.vocab_size * d + d                            # embedding, head, final norm
        n += self.n_dense_layers * self._block_params(False, active)
        n += self.n_moe_layers * self._block_params(True, active)
        return n + (self._mtp_params(active) if include_mtp else 0)

    # ---------------------------------------------------------------------------------------------
    # cost model: FLOPs and bytes

    def flops_per_token(self, seq_len: int | None = None, training: bool = True, include_mtp: bool = False) -> int:
        """Matmul FLOPs per token: ``2 N_active`` (the embedding lookup is not a matmul, so it is left
        out; the head is in) plus attention ``4 L H hd S`` (QK^T and PV over a context of S =
        seq_len, no causal discount, as in PaLM / nanochat). Training (forward + backward) is 3x."""
        S = self.max_seq_len if seq_len is None else seq_len
        n = self.active_parameters(include_mtp) - self.vocab_size * self.d_model
        layers = self.n_layers + (self.mtp_depth if include_mtp else 0)
        fwd = 2 * n + 4 * layers * self.n_heads * self.head_dim * S
        return 3 * fwd if training else fwd

    def bytes_per_param(self) -> int:
        """Bytes per element of the model dtype."""
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def kv_cache_bytes(self, seq_len: int, batch: int = 1) -> int:
        """K and V of every trunk layer for ``batch`` sequences of ``seq_len`` tokens."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * seq_len * batch * self.bytes_per_param()

    def moe_dispatch_bytes(self, tokens: int) -> int:
        """Bytes one MoE layer's permute + unpermute move for ``tokens`` tokens (the "memcpy operator"
        that Compass-v3 found to be the bottleneck): permute reads T d and writes T k d activations;
        unpermute reads T k d and writes T d, plus the fp32 gate weights and the int64 row map."""
        a = self.bytes_per_param() * self.d_model
        tk = tokens * self.top_k
        return 2 * tokens * a + 2 * tk * a + tk * (4 + 8)

    def all_to_all_bytes_per_token(self, ep_size: int, training: bool = True, bytes_per_elem: int | None = None,
                                   include_mtp: bool = False) -> float:
        """Expected bytes one token sends over the EP all-to-alls per step, all MoE layers: each of its
        k slots leaves the rank with probability (ep - 1) / ep under uniform routing, once to the
        expert (dispatch) and once back (combine), d elements each; the backward repeats both with
        gradients (training). ``bytes_per_elem``: 2 for bf16 (default: the model dtype), 1 for FP8
        dispatch. The token counts (E int64 per layer) are negligible and left out."""
        b = self.bytes_per_param() if bytes_per_elem is None else bytes_per_elem
        layers = self.n_moe_layers + (self.mtp_depth if include_mtp else 0)
        off_rank = (ep_size - 1) / ep_size
        per_layer = 2 * self.top_k * off_rank * self.d_model * b
        return per_layer * layers * (2 if training else 1)

    def decode_step_bytes(self, batch: int, context_len: int) -> int:
        """Bytes one decoding step must read: every non-expert weight, the experts the batch can touch
        (min(E, batch * k) per MoE layer, the worst case) and the KV cache."""
        d, f = self.d_model, self.expert_ffn_dim
        dense = self.num_parameters() - self.n_moe_layers * self.num_experts * 3 * d * f
        touched = self.n_moe_layers * min(self.num_experts, batch * self.top_k) * 3 * d * f
        return (dense + touched) * self.bytes_per_param() + self.kv_cache_bytes(context_len, batch)


# Presets are keyword dicts (gpt-fast transformer_configs), so overrides re-derive head_dim etc.
#
# Compass-v3 (arXiv 2509.09121): 245B total, 71B active, 16 experts top-2. The paper gives no layer
# shapes, so these solve the two counts. With d = 8192, L = 44 MoE blocks, GQA 64 / 8 heads of 128,
# V = 131072, expert SwiGLU f = 11520 and a shared expert f_s = 3 f = 34560:
#   attention / block  2*8192*128*(64 + 8) + 2*8192 (norms)         =   151.0M
#   one expert         3*8192*11520                                 =   283.1M
#   shared expert      3*8192*34560                                 =   849.3M
#   router             8192*16                                      =     0.13M
#   block, total       151.0M + 0.13M + 16*283.1M + 849.3M          = 5,530.6M  x 44 = 243.35B
#   block, active      151.0M + 0.13M +  2*283.1M + 849.3M          = 1,566.7M  x 44 =  68.93B
#   embedding + head   2*131072*8192 (+ 8192 final norm)            =     2.15B
#   total 245.5B, active 71.1B.
# Active / total = 0.29 while top-2 of 16 routes 0.125 of the expert weights, so about 46B must be
# non-expert: attention and embeddings give 9B, hence the large always-on shared expert (an
# Arctic-style dense residual FFN; "fewer but larger experts" keeps the routed ones at 283M each).
# No source mentions that 37.4B shared expert (44 x 849.3M); one secondary reading of the paper has
# 4 of 16 experts active instead. "compass-v3-top4" is that reading: no shared expert, the same
# trunk, and the expert width solved from the 245B total:
#   44 * (151.0M + 0.13M + 16 * 3*8192*f) + 2.15B = 245.0B  ->  f = 13652 (335.5M per expert)
#   active: 2.15B + 44 * (151.1M + 4 * 335.5M)          = 67.8B (the paper's 71B within 5%).
# docs/algorithms.md has both derivations.
PRESETS: dict[str, dict] = {
    # Trains on a 2-core CPU in seconds: 0.49M parameters (0.73M with MTP), bytes as tokens
    # (ByteTokenizer: 259 ids, padded to 264). max_seq_len 256 is the base context of `compass demo`'s
    # first stages (its long-context stages scale it x4 by YaRN). Attention is 8 heads of 16 dims, each
    # its own KV head (128 wide on a 64-wide trunk): with 4 heads sharing 2 KV heads the demo's needle
    # search formed on half the seeds; each head is another chance for the induction head it needs
    # (docs/algorithms.md, "Why some seeds miss it").
    # Bytes are a skewed vocabulary and each of the 16 experts sees
    # ~64 assignments a batch, so the aux coefficient is 0.1: over 200 steps 0.01 held the normalised
    # load entropy at ~0.77, 0.03 at ~0.90, 0.1 at ~0.95 (no aux loss: ~0.3-0.7).
    # The aux coefficient decays (the sources' decaying auxiliary loss) by a cosine from 0.1 to 0.03
    # over the demo's 3300 pretraining steps; the step counter lives in the model, so SFT keeps 0.03.
    "tiny": dict(vocab_size=264, d_model=64, n_layers=2, n_heads=8, n_kv_heads=8, head_dim=16, num_experts=16,
                 top_k=2, expert_ffn_dim=64, aux_loss_coef=0.1, aux_loss_decay="cosine",
                 aux_loss_decay_steps=3300, aux_loss_min_coef=0.03, mtp_depth=1, max_seq_len=256),
    # A one-GPU development model (0.23B total, 0.08B active) with the dense-first and shared-expert paths.
    "small": dict(vocab_size=32768, d_model=512, n_layers=8, n_heads=8, n_kv_heads=4, num_experts=16,
                  top_k=2, expert_ffn_dim=1024, n_dense_layers=1, shared_expert_dim=1024, mtp_depth=1,
                  max_seq_len=2048),
    # The ablation proxy: Compass-v3's block shape ratios at ~2B (2.06B total, 0.90B active).
    "proxy-2b": dict(vocab_size=131072, d_model=1536, n_layers=14, n_heads=12, n_kv_heads=4,
                     num_experts=16, top_k=2, expert_ffn_dim=1280, shared_expert_dim=3840,
                     mtp_depth=1, max_seq_len=8192, rope_base=1e6, dtype="bfloat16"),
    # Final stage: 128K context by YaRN (factor 4 over the 32K stage), MTP interleaved.
    "compass-v3": dict(vocab_size=131072, d_model=8192, n_layers=44, n_heads=64, n_kv_heads=8,
                       head_dim=128, num_experts=16, top_k=2, expert_ffn_dim=11520,
                       shared_expert_dim=34560, mtp_depth=1, mtp_loss_weight=0.1,
                       max_seq_len=131072, rope_base=1e6, rope_scaling="yarn", rope_factor=4.0,
                       rope_original_max_len=32768, dtype="bfloat16"),
}
PRESETS["compass-v3-top4"] = {**PRESETS["compass-v3"], "top_k": 4, "expert_ffn_dim": 13652, "shared_expert_dim": 0}
