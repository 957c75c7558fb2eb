"""`DGPOTrainer`: TRL's `GRPOTrainer` with DGPO's distribution-guided per-token advantages."""

from __future__ import annotations

import functools
import inspect
import textwrap
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from trl import GRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import get_config_model_id

from .checks import check_trainer_arguments
from .config import DGPOArguments, DGPOConfig, validate_dgpo_arguments
from .forwards import (
    backbone_forward,
    captured_hidden_states,
    causal_lm,
    eval_mode,
    fused_forward,
    training_noise,
    training_noise_warning,
)
from .functional import last_divergence_path
from .metrics import dgpo_metrics
from .reference import FrozenReference, ReferenceKernels, frozen_copy
from .scoring import StatisticsPass, divergence_pass, logit_transform, select_rows
from .skipping import full_batch_metrics, skipping_blockers, take_rows, trained_rows
from .weighting import (
    TOKEN_WEIGHTS,
    WEIGHT_SCORES,
    WEIGHTED_KEYS,
    entropy_mask_inputs,
    reallocated_weights,
    sequence_advantages,
    valid_mask,
    weigh,
)

# Keyword arguments of `GRPOTrainer._get_per_token_logps_and_entropies` that are options, not model inputs
_SCORING_OPTIONS = ("batch_size", "compute_entropy", "compute_aux_loss")

# The model card's "trained with DGPO, a method introduced in ..." and its citation; GRPOTrainer's would credit DGPO
# to the GRPO paper. The year is the arXiv identifier's (2605: May 2026); the paper's text gives none.
DGPO_PAPER = {
    "title": "DGPO: Distribution-Guided Policy Optimization for Fine-Grained Credit Assignment",
    "id": "2605.03327",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @article{jin2026dgpo,
            title        = {{DGPO: Distribution-Guided Policy Optimization for Fine-Grained Credit Assignment}},
            author       = {Hongbo Jin and Rongpeng Zhu and Zhongjing Du and Xu Jiang and Jingqi Tian and Qiaoman Zhang and Jiayu Ding},
            year         = 2026,
            eprint       = {arXiv:2605.03327},
        }"""),  # noqa: E501 (the author list on one line, as a citation is copied)
}


@contextmanager
def _trl_builds_no_reference(args, weighted: bool):
    """DGPO's reference replaces TRL's: TRL's __init__ sees beta = 0 so that it loads none (it would reload the model
    from its path), and no sync_ref_model, which it refuses with beta = 0; both are restored right after."""
    hidden = {"beta": 0.0, "sync_ref_model": False} if weighted else {}
    restore = {key: getattr(args, key) for key in hidden}
    for key, value in hidden.items():
        setattr(args, key, value)
    try:
        yield
    finally:
        for key, value in restore.items():
            setattr(args, key, value)


@dataclass
class _Scoring:
    """While TRL generates and scores a batch: DGPO's pass answering TRL's pi_old forward, if TRL asks for one."""

    statistics: StatisticsPass | None = None


@dataclass
class _LossTime:
    """While TRL computes a micro-batch's loss: the micro-batch, and the part of it TRL trains (`trained`, its `rows`;
    all of it when `rows` is None, see `dgpo_trl.skipping`)."""

    inputs: dict
    trained: dict
    rows: torch.Tensor | None = None


class DGPOTrainer(GRPOTrainer):
    """
    Trainer for Distribution-Guided Policy Optimization (DGPO, [arXiv 2605.03327](https://arxiv.org/abs/2605.03327)).

    Same constructor, options and behaviour as TRL's [`~trl.GRPOTrainer`]; only the advantages change. Each completion
    i's advantage A_i is redistributed over its valid tokens (`completion_mask * tool_mask`) as A_{i,t} = A_i * w_t,
    w_t = T_i * softmax_t(d_t * (H_t / log|V|) ** kappa / tau): d_t the squared Hellinger distance (or reverse KL)
    between pi_theta and a frozen reference, H_t the entropy of pi_theta, over the full vocabulary under TRL's sampling
    temperature and logit transform. No KL penalty (`beta=0`); `beta > 0` keeps TRL's, against DGPO's reference.

    pi_theta is pi_old: each completion's weights are computed once, from a forward TRL runs anyway (its scoring-time
    pi_old forward when it asks for one, else the micro-batch's first training forward), for the completions with a
    nonzero advantage. Every log-prob TRL receives comes from TRL's own fused LM head, so PPO ratios and TRL's KL term
    are GRPOTrainer's in every dtype. DGPO adds a reference forward per scored completion (replacing TRL's when
    beta > 0) and a tiled divergence pass; where the policy's train-mode forward has dropout, a dropout-free policy
    forward. With `dgpo_skip_zero_advantage` the training step forwards only the completions with A_i != 0
    (`dgpo_trl.skipping`), the update unchanged.

    What is overridden, and why:
    - `__init__`: builds DGPO's frozen reference (`dgpo_trl.reference.FrozenReference`) instead of TRL's.
    - `_generate_and_score_completions`, `_compute_loss`: enter the phase the other overrides read (`_phase`); the
      first applies weights computed at scoring time, the second trains only the rows that carry signal.
    - `_get_per_token_logps_and_entropies`: routes TRL's pi_old forward and the loss-time statistics through DGPO's
      statistics pass (`dgpo_trl.scoring.StatisticsPass`, on TRL's own input building), and answers TRL's
      scoring-time reference forward (DGPO's own gives those log-probs).
    - `get_high_entropy_mask` (`top_entropy_quantile < 1`): moves each completion's weight onto the tokens TRL's mask
      keeps, so the weights average 1 over the tokens that receive gradient.
    - `_save`, `train`, `evaluate`: DGPO's "ref" adapter stays out of saves and, after them, out of the user's model.
    - `log`: `dgpo/*/max` are the maxima of the logging window (TRL averages every metric over it).
    """

    _tag_names = ["trl", "dgpo"]
    _name = "DGPO"
    _paper = DGPO_PAPER

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, **trainer_kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DGPOConfig(f"{model_name.split('/')[-1]}-DGPO")
        # A plain GRPOConfig (a pipeline that only swapped the trainer class) runs with DGPO's defaults
        uniform = validate_dgpo_arguments(args, warn=not isinstance(args, DGPOConfig)).uniform_weights
        weighted = self._weights_tokens = not uniform
        signature = inspect.signature(GRPOTrainer.__init__)
        given = signature.bind(self, model, reward_funcs, args, *trainer_args, **trainer_kwargs).arguments
        peft_config = given.get("peft_config")
        passed_peft_model = not isinstance(model, str) and is_peft_model(model)
        check_trainer_arguments(model, args, given, weighted, peft=peft_config is not None or passed_peft_model)
        # A model passed as an object may differ from what its config's path holds (changed in memory, or built from
        # a config): its reference is a copy of it, taken before TRL patches its forward (a copy of a patched model
        # would keep calling the original's). A model passed as a path gets its reference from that path.
        copied = None
        if weighted and peft_config is None and not passed_peft_model and not isinstance(model, str):
            copied = frozen_copy(model)

        with _trl_builds_no_reference(args, weighted):
            super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        self.beta = args.beta
        self._unwrapped: dict[int, tuple] = {}
        self._phase_state: _Scoring | _LossTime | None = None
        self.reference = None
        if weighted:
            self.reference = FrozenReference.for_policy(
                self._policy(), lambda: self.model, copied=copied,  # Trainer.train() wraps the model later
                pretrained_adapter=passed_peft_model and peft_config is None, accelerator=self.accelerator,
                args=args, temperature=self.temperature, quantization_config=given.get("quantization_config"),
            )  # fmt: skip
        if self.reference is not None and not self.reference.uses_policy:
            self.ref_model = self.reference.prepared
            if args.use_liger_kernel:
                self.add_callback(ReferenceKernels(self.reference))
            if args.sync_ref_model:
                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        policy = causal_lm(self._policy())
        self._logit_scale, self._softcap = logit_transform(policy.config)
        head = policy.get_output_embeddings()
        self._vocab_size = getattr(head, "out_features", None) or policy.config.get_text_config().vocab_size
        self._skipping_blockers = skipping_blockers(self, warn=self.dgpo.skip_zero_advantage)
        self._training_noise = training_noise(self._policy()) if weighted else []
        if self._training_noise:
            warnings.warn(training_noise_warning(self._training_noise), UserWarning, stacklevel=2)
        # A few scored completions of the latest training batch that scored any, and their token weights (CPU), for
        # heatmaps and inspection: {"prompt_ids", "prompt_mask", "completion_ids", "weights", "mask"}: (n, ...) each,
        # "advantages": (n,); the same for the latest evaluation batch
        self.last_token_weights: dict[str, torch.Tensor] | None = None
        self.last_eval_token_weights: dict[str, torch.Tensor] | None = None
        self.num_completions_to_show = 8

    @property
    def dgpo(self) -> DGPOArguments:
        """DGPO's settings, read from `self.args` and validated at every use, so that a callback can change them during
        training (e.g. anneal `dgpo_tau`); `dgpo_uniform_weights` is fixed at construction (a reference or none)."""
        return validate_dgpo_arguments(self.args, warn=False, fixed_uniform_weights=not self._weights_tokens)

    @contextmanager
    def _phase(self, phase: _Scoring | _LossTime):
        """The one piece of state DGPO's overrides share between TRL's hooks: which of TRL's calls is running
        (`_generate_and_score_completions` or `_compute_loss`) and what DGPO keeps for it. Cleared on exit."""
        self._phase_state = phase
        try:
            yield phase
        finally:
            self._phase_state = None

    # ------------------------------------------------------------------------------------------------------------
    # TRL hooks

    def _generate_and_score_completions(self, inputs):
        if not self._weights_tokens:
            return super()._generate_and_score_completions(inputs)
        with self._phase(_Scoring()) as scoring:
            output = super()._generate_and_score_completions(inputs)
        if scoring.statistics is not None:
            # TRL asked for pi_old log-probs: DGPO's pass ran on TRL's forward, for every row with a valid token
            rows = valid_mask(output).any(-1).nonzero().squeeze(-1)
            stats = scoring.statistics.completion_statistics(output["completion_ids"].size(1), self.accelerator.device)
            self._apply_token_weights(output, type(stats)(*(x[rows] for x in stats)), rows)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        trl_forward = super()._get_per_token_logps_and_entropies
        phase = self._phase_state if self._weights_tokens else None
        if isinstance(phase, _Scoring) and self.reference.answers(model, self._unwrap):
            # TRL's reference forward (beta > 0): DGPO's own reference forward yields these log-probs, TRL's exactly,
            # and `_apply_token_weights` writes them before TRL's loss reads them (NaN until then, never read)
            return torch.full((len(input_ids), logits_to_keep), float("nan"), device=input_ids.device), None, None
        if isinstance(phase, _Scoring) and model is self.model:
            # TRL's pi_old forward: DGPO's pass runs it as TRL would, and its statistics on the same hidden states
            phase.statistics = self._statistics_pass(
                policy_forward=lambda inputs, labels: fused_forward(self.model, self._policy(), inputs, labels)
            )
            return trl_forward(phase.statistics, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        if not isinstance(phase, _LossTime) or TOKEN_WEIGHTS in phase.inputs:
            return trl_forward(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        # The micro-batch's first training forward, pi_theta == pi_old: it provides the policy's side
        inputs = phase.trained
        deterministic = not (self._training_noise and self.model.training)
        with captured_hidden_states(self._policy()) if deterministic else nullcontext([]) as captured:
            result = trl_forward(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        kwargs.update(batch_size=None, compute_entropy=False, compute_aux_loss=False)
        multimodal = any(value is not None for key, value in kwargs.items() if key not in _SCORING_OPTIONS)
        wanted = self._rows_wanted(inputs)
        rows = select_rows(wanted, subset_allowed=not multimodal, collective=self._collective_forwards)
        statistics = self._statistics_pass(
            policy_hidden=torch.cat(captured)[rows] if captured else None, policy_logps=result[0].detach()[rows]
        )
        if len(rows):
            trl_forward(statistics, input_ids[rows], attention_mask[rows], logits_to_keep, **kwargs)
        stats = statistics.completion_statistics(logits_to_keep, input_ids.device)
        scored = rows[wanted[rows]]
        stats = type(stats)(*(x[wanted[rows]] for x in stats))
        if phase.rows is None:
            self._apply_token_weights(inputs, stats, scored)
        else:  # the weights belong to the whole micro-batch (a later iteration over it reuses them)
            self._apply_token_weights(phase.inputs, stats, phase.rows[scored])
            weighted = {key: phase.inputs[key] for key in WEIGHTED_KEYS if key in phase.inputs}
            inputs.update(take_rows(weighted, phase.rows))
        return result

    def _compute_loss(self, model, inputs):
        skip = self.dgpo.skip_zero_advantage and not self._skipping_blockers
        trained = trained_rows(inputs, self.loss_type, self._rows_everywhere) if skip else None
        batch = inputs if trained is None else take_rows(inputs, trained.rows)
        with self._phase(_LossTime(inputs, batch, None if trained is None else trained.rows)):
            loss = super()._compute_loss(model, batch)
        metrics = self._metrics["train" if self.model.training else "eval"]
        if trained is None:
            metrics["dgpo/trained_fraction"].append(1.0)
            return loss
        reduce = functools.partial(self.accelerator.reduce, reduction="sum")
        metrics["dgpo/trained_fraction"].append(full_batch_metrics(metrics, inputs, trained, reduce))
        return loss * trained.scale

    def get_high_entropy_mask(self, entropies, mask, threshold):
        entropy_mask = super().get_high_entropy_mask(entropies, mask, threshold)
        phase = self._phase_state
        if isinstance(phase, _LossTime) and WEIGHT_SCORES in phase.inputs:
            # TRL's loss trains only the tokens this mask keeps, and reads inputs["advantages"] right after it: each
            # completion's weight moves onto them (`reallocated_weights`). The kept weights average 1, as GRPO's do
            # under the same mask, and the mass the paper's weights gave masked tokens is not lost.
            inputs = phase.inputs
            inputs["advantages"] = sequence_advantages(inputs).unsqueeze(1) * reallocated_weights(inputs, entropy_mask)
        return entropy_mask

    def log(self, logs, start_time=None):
        # TRL averages each metric over the logging window; DGPO's maxima are the window's (TRL's own `*_max` stay
        # means)
        for values in self._metrics.values():
            for key, window in values.items():
                if key.startswith("dgpo/") and key.endswith("/max") and window:
                    window[:] = [max(window)]
        return super().log(logs, start_time)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:  # the user's PeftModel is left as GRPOTrainer leaves it: without DGPO's reference adapter
            if self.reference is not None:
                self.reference.release(sharded=self._collective_forwards)

    def evaluate(self, *args, **kwargs):
        try:
            return super().evaluate(*args, **kwargs)
        finally:  # an evaluation inside train() keeps it until train() ends
            if self.reference is not None and not self.is_in_train:
                self.reference.release(sharded=self._collective_forwards)

    def _save(self, output_dir=None, state_dict=None):
        # Checkpoints, `save_model` and Hub pushes write the trained adapters only (a resumed or reloaded trainer
        # rebuilds the reference from the model passed)
        with self.reference.saved_without_it() if self.reference is not None else nullcontext():
            return super()._save(output_dir, state_dict)

    # ------------------------------------------------------------------------------------------------------------
    # DGPO's forwards and weights

    def _policy(self):
        return self._unwrap(self.model)

    def _unwrap(self, model):
        """`accelerator.unwrap_model`, cached: it re-reads package metadata on every call (~0.5 ms, many times a step),
        and a wrapper keeps its module for good."""
        cached = self._unwrapped.get(id(model))
        if cached is None or cached[0] is not model:
            cached = self._unwrapped[id(model)] = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    def _statistics_pass(self, **given) -> StatisticsPass:
        # A train-mode forward with dropout cannot serve: the policy's side then comes from a dropout-free forward
        noisy = self._training_noise and self.model.training
        return StatisticsPass(
            dropout_free_hidden=self._dropout_free_hidden if noisy else None,
            reference=self.reference,
            divergence=self._divergence_pass,
            select_rows=functools.partial(select_rows, collective=self._collective_forwards),
            ref_logps=self.beta != 0.0,
            **given,
        )

    def _dropout_free_hidden(self, model_inputs: dict) -> torch.Tensor:
        with eval_mode(self.model):
            return backbone_forward(self.model, self._policy(), model_inputs)

    def _divergence_pass(self, policy_hidden, ref_hidden):
        return divergence_pass(
            policy_hidden, causal_lm(self._policy()).get_output_embeddings(), ref_hidden, self.reference.lm_head,
            cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32, temperature=self.temperature,
            logit_scale=self._logit_scale, final_logit_softcapping=self._softcap, chunk_size=self.dgpo.chunk_size,
        )  # fmt: skip

    def _rows_wanted(self, inputs: dict) -> torch.Tensor:
        """(B,) bool: the completions whose weights matter at loss time, those with a valid token and, unless TRL's
        KL term needs the reference log-probs of every one (beta != 0), a nonzero advantage (A_i * w_t = 0)."""
        wanted = valid_mask(inputs).any(-1)
        if self.dgpo.skip_zero_advantage and self.beta == 0.0:
            wanted &= sequence_advantages(inputs) != 0
        return wanted

    def _rows_everywhere(self, count: int) -> int:
        """The number of rows every process passes TRL's loss: the largest `count` over processes, at least 1."""
        largest = self.accelerator.reduce(torch.tensor(count, device=self.accelerator.device), reduction="max")
        return max(int(largest), 1)

    @property
    def _collective_forwards(self) -> bool:
        """Whether a forward is a collective (ZeRO-3 / FSDP gather parameters), so every rank must run as many."""
        plugin = self.accelerator.state.deepspeed_plugin if self.is_deepspeed_enabled else None
        return self.is_fsdp_enabled or (plugin is not None and plugin.zero_stage == 3)

    def _apply_token_weights(self, inputs: dict, stats, rows: torch.Tensor) -> None:
        """Weights a batch in place: `inputs[TOKEN_WEIGHTS]` (B, T) and TRL's `inputs["advantages"]` = A_i * w_t
        (B, T) (with beta > 0 also TRL's `ref_per_token_logps`), from the statistics of the completions `rows`
        (`stats` fields (len(rows), T)); keeps a few for heatmaps and logs DGPO's metrics."""
        mask, advantages = valid_mask(inputs), sequence_advantages(inputs)
        reduce = functools.partial(self.accelerator.reduce, reduction="sum")
        dtype = torch.float64 if self._policy().dtype == torch.float64 else torch.float32
        batch = weigh(
            stats, mask, rows, advantages, self.dgpo, vocab_size=self._vocab_size, reduce=reduce, dtype=dtype
        )
        inputs[TOKEN_WEIGHTS] = batch.weights
        inputs["advantages"] = advantages.unsqueeze(1) * batch.weights
        if self.top_entropy_quantile < 1.0:  # TRL picks the tokens it trains per loss call: get_high_entropy_mask
            inputs.update(entropy_mask_inputs(batch, mask, rows, advantages))
        if self.beta != 0.0:  # every row with a valid token was scored (`_rows_wanted`); the others have no KL term
            ref_logps = torch.zeros_like(batch.weights, dtype=torch.float32)  # TRL's log-probs are float32
            inputs["ref_per_token_logps"] = ref_logps.index_put_((rows,), stats.ref_logps.float())
        if len(rows):  # a batch with nothing to score keeps the previous batch's for heatmaps
            shown = rows[: self.num_completions_to_show]
            kept = {key: inputs[key][shown].cpu() for key in ("prompt_ids", "prompt_mask", "completion_ids")}
            kept.update(weights=batch.weights[shown].cpu(), mask=mask[shown].cpu(), advantages=advantages[shown].cpu())
            # Evaluation keeps its own, so that it never replaces the training batch's
            setattr(self, "last_token_weights" if self.model.training else "last_eval_token_weights", kept)
        metrics = dgpo_metrics(
            stats, batch.divergence, batch.scores, batch.scored_weights, mask[rows], batch.tau, len(advantages),
            vocab_size=self._vocab_size, accelerator=self.accelerator, fused=last_divergence_path() == "fused",
        )  # fmt: skip
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
