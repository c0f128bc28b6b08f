"""``torchrun --nproc-per-node N align_worker.py SFT OUT PAIRS DP EP``: a short alignment (DPO, then
OTPO) of the SFT model in ``SFT`` on the (dp, ep) layout, pairs from the preference JSONL ``PAIRS``;
with no torchrun (``DP`` = ``EP`` = 1) the same call in one process."""

from __future__ import annotations

import sys
from pathlib import Path

from compass_model.data import ByteTokenizer
from compass_model.train import parallel
from compass_model.train.align import run_alignment
from compass_model.train.metrics import MetricsWriter

# 6 train pairs, 2 held out; 4 pairs a step (one micro-batch: 2 per rank at world 2), 2 steps
ALIGN_KW = {"n_pairs": 6, "eval_pairs": 2, "steps": 2, "lr": 2e-3, "micro_batch": 4, "max_len": 64, "beta": 0.1,
            "seed": 0, "warmup_steps": 1, "sft_weight": 0.2}


def align(sft, out, pairs, ctx=None) -> dict:
    out = Path(out)
    return run_alignment(sft, out, ByteTokenizer(), metrics=MetricsWriter(out / "metrics.jsonl"), pairs_file=pairs,
                         ctx=ctx, **ALIGN_KW)


if __name__ == "__main__":
    sft, out, pairs, dp, ep = sys.argv[1:6]
    ctx = parallel.init_ep(int(ep), dp=int(dp))
    align(sft, out, pairs, ctx)
    parallel.exit_ep(ctx)
