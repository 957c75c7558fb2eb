"""Training only the completions that carry signal: the training forward and backward of a micro-batch's rows with a
zero advantage skipped, with the update exactly as if every row had trained.

Without a KL term (DGPO's default, beta = 0), a completion with A_i = 0 has A_{i,t} = A_i * w_t = 0 on every token,
so every loss type of TRL 1.16 gives its tokens a loss of exactly 0 and a gradient of exactly 0 (the PPO terms, the
off-policy mask, vLLM's importance ratios and VESPO's gamma weights all multiply the advantage). Only the loss's
normalizer sees those rows, and it is known in advance, so DGPO calls TRL's own `_compute_loss` on the other rows
and rescales its result by `loss_scale`:
- `grpo`, `sapo`, `dr_grpo`, `luspo` divide by the micro-batch's row count: x kept rows / rows;
- `bnpo` by its valid-token count: x kept tokens / tokens (each clamped to >= 1, as TRL clamps it);
- `dapo`, `cispo`, `vespo` by `num_items_in_batch`, the generation batch's token count, unchanged: x 1.
Where a row's loss or gradient is not zero with A_i = 0, or the rows are not independent in TRL's loss, every row
trains (`skipping_blockers`). Everything TRL's loss computes per row is row-wise, so the kept rows' values are the
full batch's; the metrics TRL averages over the micro-batch are corrected in `full_batch_metrics`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers.utils import logging

from .weighting import sequence_advantages, valid_mask

logger = logging.get_logger(__name__)


ROW_NORMALIZED = ("grpo", "sapo", "dr_grpo", "luspo")
TOKEN_NORMALIZED = ("bnpo",)
ITEM_NORMALIZED = ("dapo", "cispo", "vespo")
# Batch fields TRL passes to the model that are not one row per completion (images, tiles): such a batch cannot be
# split by row
_NOT_ROW_WISE = (
    "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "image_sizes", "spatial_shapes",
    "num_tiles", "image_position_ids",
)  # fmt: skip
# TRL's in-loss metrics that count clipped tokens over the micro-batch's valid tokens: a row with A_i = 0 is never
# clipped (each condition requires A > 0 or A < 0), so over every row they are the kept rows' count over all tokens
CLIPPED_FRACTIONS = ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "cispo_clip_ratio")


def skipping_blockers(trainer, warn: bool) -> list[str]:
    """The settings under which a zero-advantage row changes the update, so every row must train (empty: rows may be
    skipped); with `warn`, says so. `trainer` is a `GRPOTrainer`; its fields are TRL's."""
    blockers = []
    if trainer.beta != 0.0:
        blockers.append(f"beta={trainer.beta} (TRL's KL term is nonzero on every row)")
    if trainer._entropy_bonus_enabled:
        blockers.append("an entropy bonus (entropy_coef or use_adaptive_entropy: nonzero on every row)")
    if trainer.aux_loss_enabled:
        blockers.append("a router auxiliary loss (MoE load balancing, over every row's tokens)")
    if trainer.top_entropy_quantile < 1.0:
        blockers.append(f"top_entropy_quantile={trainer.top_entropy_quantile} (TRL's threshold is a quantile over the "
                        "micro-batch's tokens)")  # fmt: skip
    if trainer.loss_type not in ROW_NORMALIZED + TOKEN_NORMALIZED + ITEM_NORMALIZED:
        blockers.append(f"loss_type={trainer.loss_type!r} (its normalizer is not known to DGPO)")
    if blockers and warn:
        logger.warning(f"dgpo_skip_zero_advantage: every completion trains, zero-advantage ones included, because of "
                       f"{'; '.join(blockers)}.")  # fmt: skip
    return blockers


def splittable(inputs: dict) -> bool:
    """Whether the batch's model inputs hold one row per completion (no images or tiles)."""
    return not any(inputs.get(key) is not None for key in _NOT_ROW_WISE)


class TrainedRows(NamedTuple):
    """The rows of a micro-batch TRL's loss is run on (`rows`), the factor on that loss (`scale`), and how many of them
    carry signal (`count`, the first ones). The others have A_i = 0 (their loss is exactly 0): they make every process
    pass TRL the same number of rows, as TRL's loss gathers per-row metrics across processes, and at least one, so
    that every process runs a forward and a backward (the loss then multiplied by 0)."""

    rows: torch.Tensor
    scale: float
    count: int


def trained_rows(inputs: dict, loss_type: str, rows_everywhere=None) -> TrainedRows | None:
    """The rows with a nonzero advantage and a valid token, completed to `rows_everywhere(count)` rows (the largest
    count over processes, at least 1; default: the count itself, at least 1) with zero-advantage rows, and
    `loss_scale` for them; None (every row trains) for a batch that cannot be split by row."""
    if not splittable(inputs):
        logger.warning_once("dgpo_skip_zero_advantage: every completion trains, the batch holds images (its model "
                            "inputs cannot be split by completion).")  # fmt: skip
        return None
    mask = valid_mask(inputs)
    kept = mask.any(-1) & (sequence_advantages(inputs) != 0)
    count = int(kept.sum())
    passed = rows_everywhere(count) if rows_everywhere is not None else max(count, 1)
    rows = torch.cat([kept.nonzero().squeeze(-1), (~kept).nonzero().squeeze(-1)[: passed - count]])
    return TrainedRows(rows, loss_scale(loss_type, mask, rows) if count else 0.0, count)


def loss_scale(loss_type: str, mask: torch.Tensor, rows: torch.Tensor) -> float:
    """The factor that turns TRL's loss over `rows` into its loss over every row (see the module docstring). A Python
    number, so that the loss keeps its dtype."""
    if loss_type in ROW_NORMALIZED:
        return len(rows) / len(mask)
    if loss_type in TOKEN_NORMALIZED:
        return max(mask[rows].sum().item(), 1) / max(mask.sum().item(), 1)
    if loss_type in ITEM_NORMALIZED:
        return 1.0
    raise ValueError(f"loss_type {loss_type!r} has no known normalizer")


def take_rows(inputs: dict, rows: torch.Tensor) -> dict:
    """The batch's `rows`, sliced as TRL splits a batch (`split_tensor_dict`): tensors with a dimension and lists
    along their first dimension, scalars (e.g. `num_items_in_batch`) kept."""
    taken = {}
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            taken[key] = value[rows]
        elif isinstance(value, list):
            taken[key] = [value[i] for i in rows.tolist()]
        else:
            taken[key] = value
    return taken


def full_batch_metrics(metrics: dict, inputs: dict, trained: TrainedRows, reduce) -> float:
    """Corrects the values TRL's loss just appended to `metrics` (one mode's `_metrics`) so that they cover every row
    of the micro-batch, where that can be known without the skipped rows' forward, and returns the fraction of
    completions trained across processes (`reduce` sums over processes).

    `clip_ratio/*_mean` and `cispo_clip_ratio`: x (valid tokens of the rows TRL saw / valid tokens), over processes
    (the zero-advantage rows among those add no clipped token); `clip_ratio/low_min`: 0 where a skipped row has a
    valid token (its clipped fraction is 0). `clip_ratio/high_max` is already the full batch's (the maximum of
    fractions >= 0). `entropy` and `vespo/phi_seq_mean` need the skipped rows'
    forward: they stay over the trained rows."""
    mask = valid_mask(inputs)
    has_tokens = mask.any(-1)
    kept = torch.zeros_like(has_tokens)  # the rows TRL's loss saw (its metrics are over their tokens)
    kept[trained.rows] = True
    counts = torch.tensor([mask[kept].sum().item(), mask.sum().item(), (has_tokens & ~kept).sum().item(),
                           trained.count, len(mask)], dtype=torch.float32, device=mask.device)  # fmt: skip
    kept_tokens, tokens, skipped_with_tokens, trained_count, rows = reduce(counts).tolist()
    for key in CLIPPED_FRACTIONS:
        if metrics.get(key):
            metrics[key][-1] *= kept_tokens / max(tokens, 1.0)
    if skipped_with_tokens and metrics.get("clip_ratio/low_min"):
        metrics["clip_ratio/low_min"][-1] = 0.0
    return trained_count / max(rows, 1.0)
