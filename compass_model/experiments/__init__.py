"""The paper's experiments, re-run at proxy scale. Each module's ``run(out_dir, *, quick=False, seed=0)``
writes ``<out_dir>/<name>.json`` (the returned dict, with ``machine`` and ``quick``) and
``<out_dir>/<name>.png``:

  balance       router load balance: no aux / aux / aux + z-loss / decaying aux (tiny proxy)
  experts       expert count x top-k at fixed active parameters: grouped-GEMM efficiency, MoE layer
                tokens/s, LM loss after a fixed budget
  combine       the dispatch / combine memcpy microbenchmark: fused permute / unpermute vs peers
  otpo-vs-dpo   OTPO token-weight concentration on one-token-different pairs, DPO vs OTPO accuracy

``full`` mode takes up to a few minutes each on a 2-core CPU; ``quick=True`` seconds (tests).
"""

from compass_model.experiments import balance, combine, experts, otpo_vs_dpo

EXPERIMENTS = {
    "balance": balance.run,
    "experts": experts.run,
    "combine": combine.run,
    "otpo-vs-dpo": otpo_vs_dpo.run,
}

__all__ = ["EXPERIMENTS"]
