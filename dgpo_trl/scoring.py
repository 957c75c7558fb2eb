"""DGPO's statistics pass over TRL's own model inputs: per chunk of rows, the policy's and reference's last hidden
states, then d_t, H_t (and the reference's log-probs when TRL's KL term needs them).

`StatisticsPass` stands in for the policy model inside `GRPOTrainer._get_per_token_logps_and_entropies`. That method
slices a batch into row chunks, builds each chunk's model inputs (multimodal fields included) and labels, and calls
`model(**inputs, labels=labels, fused_lm_head=True)`; passing this object instead reuses that input building and
bounds memory by TRL's chunk size. Nothing here reads the trainer: it is given the forwards it may run.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor
from trl.trainer.utils import maybe_gather_lm_head_ctx

from .functional import DIVERGENCES, token_statistics, wide_dtype

# Model inputs that hold one row per completion, so a subset of completions is a subset of their rows
PER_ROW_INPUTS = {"input_ids", "attention_mask"}


class CompletionStatistics(NamedTuple):
    """Per completion position (rows, T) each: TRL's label log-probs of pi_old (`policy_logps`), the reference's
    (`ref_logps`: TRL's too, NaN unless requested), and DGPO's full-vocabulary statistics of the two models."""

    policy_logps: torch.Tensor
    ref_logps: torch.Tensor
    hellinger: torch.Tensor
    reverse_kl: torch.Tensor
    entropy: torch.Tensor

    def divergence(self, name: str) -> torch.Tensor:
        """The divergence d_t called `name` (`"hellinger"` or `"reverse_kl"`)."""
        if name not in DIVERGENCES:
            raise ValueError(f"divergence must be one of {list(DIVERGENCES)}, got {name!r}.")
        return getattr(self, name)


class StatisticsPass:
    """Computes `CompletionStatistics` chunk by chunk when called as TRL calls its policy.

    Args:
        policy_forward: at scoring time, TRL's own forward of the policy, `(model_inputs, labels) -> (TRL output,
            last hidden states)`: its log-probs are TRL's pi_old and are returned to TRL unchanged. `None` at loss
            time, where the training forward has run and `policy_hidden`/`policy_logps` hold what it gave.
        dropout_free_hidden: `model_inputs -> last hidden states` of the policy without dropout, or `None` when the
            policy's train-mode forward has no dropout (its hidden states then serve).
        reference: the `FrozenReference`.
        divergence: `(policy_hidden, ref_hidden) -> TokenStatistics`, over (tokens, H) hidden states.
        select_rows: `(wanted (B,) bool, subset_allowed) -> row indices` to run DGPO's forwards on.
        ref_logps: whether TRL's KL term needs the reference's label log-probs.
        policy_hidden, policy_logps: at loss time, (B, L, H) and (B, L - 1) for the rows this pass is called on.
    """

    def __init__(
        self,
        *,
        dropout_free_hidden: Callable | None,
        reference,
        divergence: Callable,
        select_rows: Callable,
        ref_logps: bool,
        policy_forward: Callable | None = None,
        policy_hidden: torch.Tensor | None = None,
        policy_logps: torch.Tensor | None = None,
    ):
        self.policy_forward = policy_forward
        self.dropout_free_hidden = dropout_free_hidden
        self.reference = reference
        self.divergence = divergence
        self.select_rows = select_rows
        self.needs_ref_logps = ref_logps
        self.policy_hidden, self.policy_logps = policy_hidden, policy_logps
        self.rows_done = 0
        self.chunks: list[CompletionStatistics] = []

    def __call__(self, labels, fused_lm_head=True, **model_inputs):
        # Position t's hidden state predicts token t + 1; only completion tokens carry a label
        mask = labels[:, 1:] != -100
        if self.policy_forward is not None:
            output, policy_hidden = self.policy_forward(model_inputs, labels)
            policy_logps = output.log_probs.detach()
        else:
            start, end = self.rows_done, self.rows_done + len(mask)
            policy_hidden = None if self.policy_hidden is None else self.policy_hidden[start:end]
            policy_logps, self.rows_done = self.policy_logps[start:end], end
            # TRL's training forward returned the completion positions only: aligned with the last label positions
            policy_logps = torch.nn.functional.pad(policy_logps, (mask.size(1) - policy_logps.size(1), 0))
            output = SimpleNamespace(log_probs=policy_logps, entropy=None, aux_loss=None)
        # In float64, which holds the pass's float32 statistics exactly and float64 ones (float64 models) in full
        wide = wide_dtype(mask.device)
        per_position = CompletionStatistics(
            policy_logps, *(torch.zeros(mask.shape, device=mask.device, dtype=wide) for _ in range(4))
        )
        per_position.ref_logps.fill_(float("nan"))
        self.chunks.append(per_position)
        # Rows without a completion token (e.g. truncated and masked) need no forward
        rows = self.select_rows(mask.any(-1), subset_allowed=model_inputs.keys() <= PER_ROW_INPUTS)
        if len(rows) == 0:
            return output
        inputs = {key: value[rows] for key, value in model_inputs.items()} if len(rows) < len(mask) else model_inputs
        mask = mask[rows]
        if self.dropout_free_hidden is not None:
            policy_hidden = self.dropout_free_hidden(inputs)
        else:
            policy_hidden = policy_hidden[rows]
        if self.needs_ref_logps:
            ref_logps, ref_hidden = self.reference.log_probs_and_hidden_states(inputs, labels[rows])
            per_position.ref_logps[rows] = ref_logps.to(wide)
        else:
            ref_hidden = self.reference.hidden_states(inputs)
        stats = self.divergence(policy_hidden[:, :-1][mask], ref_hidden[:, :-1][mask])
        for name in ("hellinger", "reverse_kl", "entropy"):
            getattr(per_position, name)[rows] = mask.new_zeros(mask.shape, dtype=wide).masked_scatter(
                mask, getattr(stats, name).to(wide)
            )
        return output

    def completion_statistics(self, logits_to_keep: int, device) -> CompletionStatistics:
        """The collected statistics over the completion positions, each (rows, logits_to_keep); rows may be 0."""
        if not self.chunks:
            empty = torch.zeros(0, logits_to_keep, device=device, dtype=wide_dtype(device))
            return CompletionStatistics(*(empty for _ in CompletionStatistics._fields))
        return CompletionStatistics(*(torch.cat(field, dim=0)[:, -logits_to_keep:] for field in zip(*self.chunks)))


def select_rows(wanted: torch.Tensor, subset_allowed: bool, collective: bool) -> torch.Tensor:
    """Indices of the rows to run DGPO's forwards on: the `wanted` ones, or all of them where the model inputs cannot
    be split by row (multimodal inputs). Where a forward is a collective (ZeRO-3, FSDP: `collective`), a rank with
    nothing to score still runs one, on row 0 (discarded), so that every rank runs as many."""
    if not subset_allowed:
        return torch.arange(len(wanted), device=wanted.device)
    rows = wanted.nonzero().squeeze(-1)
    return rows if len(rows) or not collective else rows.new_zeros(1)


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a parameter FSDP2 shards as a DTensor (as TRL's fused LM head gathers it)."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def divergence_pass(
    policy_hidden: torch.Tensor,
    policy_head: torch.nn.Module,
    ref_hidden: torch.Tensor,
    ref_head: torch.nn.Module,
    *,
    cast_lm_head_to_fp32: bool,
    temperature: float,
    logit_scale: float,
    final_logit_softcapping: float | None,
    chunk_size: int,
):
    """`token_statistics` of the two models' LM heads over (tokens, H) hidden states, as TRL's fused head would see
    them: the head weights gathered where an engine shards them (a collective under ZeRO-3 and FSDP2: every rank runs
    it once per chunk, whatever its number of tokens), in float32 under `cast_lm_head_to_fp32`."""
    if cast_lm_head_to_fp32:
        policy_hidden, ref_hidden = policy_hidden.float(), ref_hidden.float()
    heads = (policy_head.weight, policy_head.bias, ref_head.weight, ref_head.bias)
    with torch.no_grad(), maybe_gather_lm_head_ctx(*heads):
        policy_weight, ref_weight = _full(policy_head.weight), _full(ref_head.weight)
        policy_bias, ref_bias = _full(policy_head.bias), _full(ref_head.bias)
        # Both heads in the narrower of their dtypes: under FSDP2's mixed precision one head can be read as the bf16
        # copy its forward computes with and the other as its fp32 shards, depending on which root resharded; the two
        # models compute in the narrower one, and equal models must give d = 0
        dtype = min(policy_weight.dtype, ref_weight.dtype, key=lambda d: torch.finfo(d).bits)
        policy_weight, ref_weight = policy_weight.to(dtype), ref_weight.to(dtype)
        return token_statistics(
            policy_hidden,
            policy_weight,
            ref_hidden,
            ref_weight,
            policy_bias=policy_bias,
            ref_bias=ref_bias,
            temperature=temperature,
            logit_scale=logit_scale,
            final_logit_softcapping=final_logit_softcapping,
            chunk_size=chunk_size,
        )


def logit_transform(config) -> tuple[float, float | None]:
    """`(logit_scale, final_logit_softcapping)` of a model config, read with the rules of TRL's fused LM head
    (`trl.trainer.utils.add_fused_lm_head`), so DGPO scores exactly the distributions TRL trains on."""
    text_config = config.get_text_config()
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    if scale is None:
        scale = getattr(text_config, "output_multiplier", None)
    if scale is None:
        scale = getattr(text_config, "lm_head_multiplier", None)
    if scale is None and getattr(text_config, "logits_scaling", None) is not None:
        scaling = text_config.logits_scaling
        scale = scaling if text_config.model_type == "hyperclovax" else 1 / scaling
    return (1.0 if scale is None else float(scale)), softcap
