"""A batch's token weights: DGPO's keys in TRL's batch, and the weights of the scored completions.

DGPO keeps its per-row state in TRL's batch dict, under keys of its own: TRL splits and shuffles every tensor of the
batch along dim 0 (`split_tensor_dict`, `shuffle_sequence_dict`), so they follow their rows to the micro-batch:
- `SEQUENCE_ADVANTAGES`: A_i (B,), TRL's advantages, kept before DGPO replaces TRL's `advantages` by A_i * w_t;
- `TOKEN_WEIGHTS`: w (B, T), present once DGPO has weighted the rows (a micro-batch is weighted once, on first use);
- `WEIGHT_SCORES`, `WEIGHT_TAU`: s_t (B, T) and tau (B,), with TRL's high-entropy token mask only, from which the
  weights are renormalised over the tokens the mask keeps in each loss call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .functional import nonfinite_sequences, tau_for_target_ess, token_scores, weights_from_scores, wide_dtype

SEQUENCE_ADVANTAGES = "dgpo_sequence_advantages"
TOKEN_WEIGHTS = "dgpo_token_weights"
WEIGHT_SCORES, WEIGHT_TAU = "dgpo_weight_scores", "dgpo_weight_tau"
# Every key weighting writes into a batch (TRL's among them)
WEIGHTED_KEYS = ("advantages", SEQUENCE_ADVANTAGES, TOKEN_WEIGHTS, WEIGHT_SCORES, WEIGHT_TAU, "ref_per_token_logps")


def valid_mask(inputs: dict) -> torch.Tensor:
    """The tokens a completion's weights are spread over: its completion tokens minus tool outputs, (B, T) bool."""
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    return mask.bool()


def sequence_advantages(inputs: dict) -> torch.Tensor:
    """A_i (B,): TRL's advantages, kept under DGPO's key before DGPO replaces TRL's with per-token ones."""
    return inputs.setdefault(SEQUENCE_ADVANTAGES, inputs["advantages"])


class BatchWeights(NamedTuple):
    """The weights of a batch. `weights` (B, T) (float32, float64 for a float64 model): DGPO's on the scored rows, 1
    on the other valid tokens, 0 elsewhere. For the scored rows (len(rows), T): `scores` s_t, `divergence` d_t, and
    `scored_weights` in float64 (the metrics resolve spreads far below float32's resolution near w = 1); `tau` the
    temperature used."""

    weights: torch.Tensor
    scored_weights: torch.Tensor
    divergence: torch.Tensor
    scores: torch.Tensor
    tau: float


def weigh(stats, mask, rows, advantages, settings, *, vocab_size: int, reduce: Callable, dtype=torch.float32):
    """DGPO's weights of a batch whose completions `rows` were scored (`stats` fields (len(rows), T)). The other
    completions have A_i = 0, so their weights never reach the loss: they keep w = 1.

    `settings` are the `DGPOArguments` of the moment; `reduce` sums a tensor across processes (the adaptive tau is
    global); `dtype` that of the returned weights (float32, or float64 for a float64 model)."""
    scored_mask = mask[rows]
    divergence = stats.divergence(settings.divergence)
    scores = token_scores(
        divergence, stats.entropy, kappa=settings.kappa, vocab_size=vocab_size, entropy_gate=settings.entropy
    )
    tau = settings.tau
    if settings.target_ess is not None:
        informative = scored_mask & (advantages[rows] != 0).unsqueeze(-1)
        tau = tau_for_target_ess(scores, informative, settings.target_ess, fallback=settings.tau, reduce=reduce)
    scored_weights = weights_from_scores(scores.to(wide_dtype(scores.device)), scored_mask, tau)
    weights = mask.to(dtype)
    weights[rows] = scored_weights.to(dtype)
    return BatchWeights(weights, scored_weights, divergence, scores, tau)


def entropy_mask_inputs(batch: BatchWeights, mask, rows, advantages) -> dict:
    """`WEIGHT_SCORES` and `WEIGHT_TAU` of a batch (a sequence with a non-finite score gets uniform weights there)."""
    scored_mask = mask[rows]
    scores = torch.zeros_like(batch.weights, dtype=batch.scores.dtype)
    finite = ~nonfinite_sequences(batch.scores, scored_mask).unsqueeze(-1)
    scores[rows] = torch.where(scored_mask & finite, batch.scores, 0.0)
    return {WEIGHT_SCORES: scores, WEIGHT_TAU: torch.full_like(advantages, batch.tau, dtype=scores.dtype)}


def reallocated_weights(inputs: dict, kept: torch.Tensor) -> torch.Tensor:
    """DGPO's weights over the tokens TRL's high-entropy mask keeps: w_t = K_i * softmax of s_t / tau over the K_i
    kept tokens of completion i, 0 on the others."""
    weights = weights_from_scores(inputs[WEIGHT_SCORES], kept, inputs[WEIGHT_TAU].unsqueeze(-1))
    return weights.to(inputs[TOKEN_WEIGHTS].dtype)  # the weights' own dtype, as the loss gets them elsewhere
