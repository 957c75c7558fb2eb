"""DGPO's metrics (`dgpo/...`): statistics of one scored batch, reduced across processes.

Each call reduces one batch of scored completions (a generation batch at scoring time, a micro-batch at loss time)
and appends one value per metric; TRL's logging then averages the values of a logging window.
"""

from __future__ import annotations

import math

import torch

from .functional import effective_sample_size, nonfinite_sequences, sequence_moments


def dgpo_metrics(stats, divergence, scores, weights, mask, tau, batch_rows, *, vocab_size, accelerator, fused) -> dict:
    """DGPO's statistics over the scored tokens, reduced across processes: {metric name: value}.

    `stats` (with `.entropy`, `.reverse_kl`), `divergence`, `scores` and `weights` are (rows, T) for the scored
    completions, `mask` their valid tokens, `batch_rows` the number of completions in the batch (scored or not),
    `fused` whether the divergence pass ran the fused Triton kernel (`dgpo/kernel`: the fraction of processes whose
    pass did; a process whose kernel failed its first-call check runs the torch tiles).
    Means are over scored tokens (`/mean`) or sequences (`ess`). Spreads are within-sequence, from deviations in
    float64 (`sequence_moments`): `weight/std` is the pooled std of w around each sequence's mean of exactly 1,
    `score/std` that of s, the spread the softmax turns into weights (relative to tau).
    """
    wide = weights.dtype
    valid = mask & torch.isfinite(scores)
    non_empty = mask.any(dim=-1)
    scored_rows = valid.any(dim=-1)
    normalized_entropy = (stats.entropy / math.log(vocab_size)).clamp(0.0, 1.0)
    _, weight_variance = sequence_moments(weights, mask)
    _, score_variance = sequence_moments(scores, valid)

    def total(x):
        return torch.where(valid, x.to(wide), 0.0).sum()

    def maximum(x):
        return torch.where(valid, x, -math.inf).amax() if x.numel() else x.new_tensor(-math.inf)

    def count(x):
        return torch.tensor(float(x), dtype=wide, device=mask.device)

    sums = torch.stack(
        [
            total(divergence),
            total(normalized_entropy),
            total(stats.entropy),
            total(scores),
            total(stats.reverse_kl),
            valid.sum().to(wide),
            (weight_variance * mask.sum(-1))[non_empty].sum(),
            mask.sum().to(wide),
            (score_variance * valid.sum(-1))[scored_rows].sum(),
            effective_sample_size(weights, mask)[non_empty].sum(),
            non_empty.sum().to(wide),
            nonfinite_sequences(scores, mask).sum().to(wide),
            count(len(mask)),
            count(batch_rows),
            count(tau),
            count(fused),
        ]
    )
    sums = accelerator.reduce(sums, reduction="sum")
    # weight/max in float64 too: a weight of 1 + 1e-7 must not read as exactly 1 (uniform)
    maxima = torch.stack([maximum(divergence).to(wide), maximum(scores).to(wide), maximum(weights)]).unsqueeze(0)
    maxima = accelerator.gather(maxima).amax(0)
    (
        d, h_normalized, h, s, kl, n_valid, weight_ss, n_weighted, score_ss, ess, n_seqs, n_nonfinite, n_scored,
        n_rows, tau_sum, n_fused,
    ) = sums.tolist()  # fmt: skip
    metrics = {
        "dgpo/nonfinite_sequences": n_nonfinite,
        "dgpo/scored_fraction": n_scored / max(n_rows, 1.0),
        "dgpo/tau": tau_sum / accelerator.num_processes,
        "dgpo/kernel": n_fused / accelerator.num_processes,
    }
    if n_valid == 0:
        return metrics
    metrics.update({
        "dgpo/divergence/mean": d / n_valid,
        "dgpo/divergence/max": maxima[0].item(),
        "dgpo/entropy/mean": h / n_valid,
        "dgpo/entropy_normalized/mean": h_normalized / n_valid,
        "dgpo/score/mean": s / n_valid,
        "dgpo/score/std": math.sqrt(score_ss / n_valid),
        "dgpo/score/max": maxima[1].item(),
        "dgpo/reverse_kl/mean": kl / n_valid,
        "dgpo/weight/max": maxima[2].item(),
        "dgpo/weight/std": math.sqrt(weight_ss / n_weighted),
        "dgpo/ess": ess / n_seqs,
    })  # fmt: skip
    return metrics
