"""Training losses: SFT mixed loss, DPO, OTPO (formulas: docs/algorithms.md).

Per-token tensors are indexed by *prediction position*: entry i belongs to the token that position
i predicts (``labels[:, i]``), so log-probs, masks, OTPO weights and the hidden states that give
them (``CompassOutput.hidden[:, i]``, the state at t - 1 for token y_t) line up index for index.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import compass_kernels as ck

IGNORE_INDEX = -100


def token_logprobs(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """``log p(labels[b, i] | prefix)`` as fp32 ``[B, S]``; 0 where the label is -100."""
    lp = -F.cross_entropy(logits_BSV.float().flatten(0, 1), labels_BS.flatten(), ignore_index=IGNORE_INDEX,
                          reduction="none")
    return lp.view(labels_BS.shape)


def _safe_div(num: torch.Tensor, den) -> torch.Tensor:
    den = torch.as_tensor(den, dtype=num.dtype, device=num.device)
    # where() on the denominator, not the quotient: a 0/0 branch would still send NaN gradients
    return num / torch.where(den > 0, den, torch.ones_like(den))


def mixed_loss_mask(prompt_mask: torch.Tensor, response_mask: torch.Tensor, prompt_weight) -> torch.Tensor:
    """``m_t = 1`` on response tokens, ``w_p`` on prompt tokens, 0 elsewhere (padding, template).
    ``prompt_weight``: a float or ``[B]`` (1 for e-commerce samples: full-sequence loss; 0 for
    general samples: answer-only loss). Masks ``[B, S]`` by prediction position."""
    w = torch.as_tensor(prompt_weight, dtype=torch.float32, device=prompt_mask.device)
    w = w[:, None] if w.dim() == 1 else w
    return response_mask.float() + w * prompt_mask.float()


def sft_mixed_loss(logits_BSV: torch.Tensor, labels_BS: torch.Tensor, loss_mask_BS: torch.Tensor | None = None,
                   num_tokens=None) -> torch.Tensor:
    """``L = sum_t m_t l_t / N`` with ``l_t`` the token CE and ``m_t`` the loss mask (1 where the
    label is not -100 if None). ``N = sum_t m_t`` unless ``num_tokens`` is given: under gradient
    accumulation pass the global sum of m over all micro-batches. 0 when nothing is weighted."""
    nll = -token_logprobs(logits_BSV, labels_BS)
    m = (labels_BS != IGNORE_INDEX).float()
    if loss_mask_BS is not None:
        m = m * loss_mask_BS.float()
    return _safe_div((nll * m).sum(), m.sum() if num_tokens is None else num_tokens)


def sequence_logprobs(token_logps_BL: torch.Tensor, mask_BL: torch.Tensor) -> torch.Tensor:
    """DPO's sequence log-probability: the *sum* of response-token log-probs -> ``[B]``."""
    return (token_logps_BL * mask_BL.to(token_logps_BL.dtype)).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1):
    """Sequence log-probs ``[B]`` -> ``(loss, chosen_rewards [B], rejected_rewards [B])``:
    ``Delta = (pi_w - ref_w) - (pi_l - ref_l)``, ``loss = mean(-log sigmoid(beta Delta))``,
    rewards ``beta (log pi - log ref)`` (detached)."""
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    loss = -F.logsigmoid(beta * (chosen - rejected)).mean()
    return loss, (beta * chosen).detach(), (beta * rejected).detach()


def otpo_weights(hidden_chosen: torch.Tensor, hidden_rejected: torch.Tensor, mask_chosen: torch.Tensor,
                 mask_rejected: torch.Tensor, eps: float = 1.0, tau: float = 0.2):
    """OTPO token weights ``(w_chosen [B, L], w_rejected [B, L])`` from the policy's final-norm hidden
    states ``[B, L, D]`` (``CompassOutput.hidden``, detached) and response masks ``[B, L]``; each
    side sums to min(n_chosen, n_rejected). See ``compass_kernels.otpo_weights``."""
    return ck.otpo_weights(hidden_chosen.detach(), hidden_rejected.detach(), mask_chosen, mask_rejected,
                           eps=eps, tau=tau)


def otpo_loss(policy_chosen_BL: torch.Tensor, policy_rejected_BL: torch.Tensor, ref_chosen_BL: torch.Tensor,
              ref_rejected_BL: torch.Tensor, w_chosen_BL: torch.Tensor, w_rejected_BL: torch.Tensor,
              beta: float = 0.1):
    """OTPO (arXiv 2505.18720): DPO on weighted sums ``S(y) = sum_t w_t log p(y_t)``, the same weights
    on policy and reference. The reference log-probs are *per token* ``[B, L]`` (precomputed once):
    weighting must happen after the weights exist, and summing first is a known bug. Weights are
    zero off the response and carry no gradient. Returns ``(loss, chosen_rewards, rejected_rewards)``."""
    w_c, w_r = w_chosen_BL.detach().float(), w_rejected_BL.detach().float()
    return dpo_loss((w_c * policy_chosen_BL).sum(-1), (w_r * policy_rejected_BL).sum(-1),
                    (w_c * ref_chosen_BL).sum(-1), (w_r * ref_rejected_BL).sum(-1), beta)
