"""The tiny preset trains on CPU: 200 AdamW steps on bytes of this package's source lower the loss
and, with the aux loss on, keep every MoE layer's normalised load entropy above 0.9."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import compass_model
from compass_model import CompassConfig, CompassForCausalLM


def _corpus() -> torch.Tensor:
    """Bytes of compass_model's own source: deterministic, offline, and learnable."""
    files = sorted(Path(compass_model.__file__).parent.glob("*.py"))
    data = b"".join(f.read_bytes() for f in files)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def train_tiny(steps: int, batch: int = 8, seed: int = 0, **overrides):
    cfg = CompassConfig.from_preset("tiny", **{"max_seq_len": 64, **overrides})
    torch.manual_seed(seed)
    model = CompassForCausalLM(cfg)
    data = _corpus()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    S = cfg.max_seq_len
    losses, entropies = [], []
    for _ in range(steps):
        start = torch.randint(0, data.numel() - S - 1, (batch,), generator=gen)
        window = torch.stack([data[s:s + S + 1] for s in start.tolist()])
        out = model(window[:, :-1], labels=window[:, 1:])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_optimizer_step()
        losses.append(out.losses["lm"].item())
        entropies.append([s["entropy"].item() for s in out.router_stats])
    return model, losses, entropies


def test_tiny_run_learns_and_stays_balanced():
    t0 = time.perf_counter()
    model, losses, entropies = train_tiny(200)
    assert losses[0] > 5.0                              # ln 256 = 5.55 at init
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 1.5 and last < 2.8, (first, last)
    assert model.step == 200
    balanced = torch.tensor(entropies[-20:]).mean(0)    # per MoE layer (trunk and MTP), last 20 steps
    assert (balanced > 0.9).all(), balanced
    assert time.perf_counter() - t0 < 120               # ~10 s on one idle core


def test_without_aux_loss_the_router_drifts():
    """The control for the test above: the balance comes from the aux loss, not from luck."""
    _, losses, entropies = train_tiny(100, aux_loss_coef=0.0)
    drifted = torch.tensor(entropies[-20:]).mean(0)
    assert drifted.min() < 0.8, drifted
