"""One training step of the Compass MoE model on CPU: tokens/s and model FLOP/s from the model's own
cost model (CompassConfig.flops_per_token), and the MoE dispatch bytes of the step (forward + backward
of route + permute + unpermute in every MoE layer, compass_kernels.benchmarking.models.routing_bytes).

Small preset shapes are cut to fit this 2-core machine (d_model 512, 2 layers, 16 experts top-2).
"""

from __future__ import annotations

import pytest
import torch

from compass_kernels.benchmarking.models import routing_bytes
from compass_model import CompassConfig, CompassForCausalLM

CONFIGS = {
    "tiny": CompassConfig.from_preset("tiny"),
    "small-2L": CompassConfig.from_preset("small", n_layers=2, vocab_size=4096, max_seq_len=256),
}


@pytest.mark.parametrize("backend", ["compass", "torch_reference"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_train_step(benchmark, name, backend):
    import compass_kernels as ck

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    model = CompassForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, S = 4, cfg.max_seq_len
    ids = torch.randint(0, cfg.vocab_size, (B, S))

    def step():
        out = model(ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss

    ctx = ck.use_backend("torch" if backend == "torch_reference" else None)
    with ctx:
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
    tokens = B * S
    benchmark.group = f"model-{name}"
    benchmark.extra_info.update(
        impl=backend, shape=name, kind="train", pass_="model",
        flops=cfg.flops_per_token(seq_len=S, training=True) * tokens,
        bytes=routing_bytes(tokens, cfg.d_model, cfg.top_k, cfg.bytes_per_param(), num_experts=cfg.num_experts,
                            backward=True) * cfg.n_moe_layers,
        tokens=tokens,
    )
