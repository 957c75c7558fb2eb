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
from peft import PeftModel

from trl import GRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import get_config_model_id

from .checks import check_dataset
from .config import DGPOArguments, DGPOConfig, validate_dgpo_arguments
from .forwards import backbone_forward, captured_hidden_states, causal_lm, eval_mode, fused_forward, training_noise
from .functional import SCORES, last_divergence_path, nonfinite_sequences, tau_for_target_ess, token_scores, weights_from_scores, wide_dtype
from .metrics import dgpo_metrics
from .reference import FrozenReference, ReferenceKernels, check_reference_adapter, frozen_copy
from .scoring import StatisticsPass, divergence_pass, logit_transform


# Keys DGPO adds to TRL's batch (TRL splits and shuffles every tensor of it along dim 0, so they follow their rows):
# A_i (B,); the token weights w (B, T), present once DGPO has weighted the rows; with TRL's high-entropy token mask
# (`top_entropy_quantile < 1`), the scores s_t (B, T) and tau (B,) the weights come from
SEQUENCE_ADVANTAGES = "dgpo_sequence_advantages"
TOKEN_WEIGHTS = "dgpo_token_weights"
WEIGHT_SCORES, WEIGHT_TAU = "dgpo_weight_scores", "dgpo_weight_tau"
# Keyword arguments of `GRPOTrainer._get_per_token_logps_and_entropies` that are options, not model inputs
_SCORING_OPTIONS = ("batch_size", "compute_entropy", "compute_aux_loss")


@dataclass
class _Scoring:
    """While TRL generates and scores a batch: DGPO's pass answering TRL's pi_old forward, if TRL asks for one."""

    statistics: StatisticsPass | None = None


@dataclass
class _LossTime:
    """While TRL computes a micro-batch's loss: the micro-batch."""

    inputs: dict


def _sequence_advantages(inputs: dict) -> torch.Tensor:
    """A_i (B,): TRL's advantages, kept under DGPO's key before DGPO replaces TRL's with per-token ones."""
    return inputs.setdefault(SEQUENCE_ADVANTAGES, inputs["advantages"])


class DGPOTrainer(GRPOTrainer):
    """
    Trainer for Distribution-Guided Policy Optimization (DGPO, [arXiv 2605.03327](https://arxiv.org/abs/2605.03327)).

    Same constructor, options and behaviour as TRL's [`~trl.GRPOTrainer`]; only the advantages change. Each completion
    i's sequence advantage A_i is redistributed over its valid tokens (`completion_mask * tool_mask`) as
    A_{i,t} = A_i * w_t, with w_t = T_i * softmax_t(d_t * (H_t / log|V|) ** kappa / tau) (or H_t in nats,
    `dgpo_entropy="nats"`): d_t is the squared Hellinger distance (or reverse KL) between pi_theta and a frozen
    reference over the full vocabulary, H_t the entropy of pi_theta, both under TRL's sampling temperature and logit
    transform. TRL's `_compute_loss` takes the resulting (B, T) advantages unchanged. The KL penalty is dropped
    (`beta=0`); a user's `beta > 0` keeps TRL's KL term too, against DGPO's reference.

    pi_theta is the policy that generated the batch (pi_old), and each completion's weights are computed once, from
    a forward TRL runs anyway: TRL's scoring-time pi_old forward when it asks for one (off-policy steps, vLLM
    importance sampling), otherwise the first training forward of the micro-batch (no optimizer step has happened
    since generation, so it is pi_old), for the completions whose advantage is nonzero (`dgpo_skip_zero_advantage`).
    Every log-prob TRL receives is computed by TRL's own code (its fused LM head), so PPO ratios and TRL's KL term are
    what GRPOTrainer's would be, in every dtype. DGPO adds one reference forward per scored completion (replacing TRL's
    when beta > 0) and a divergence pass over (tokens x vocabulary) tiles that never holds full logits; where the
    policy's train-mode forward has dropout, one dropout-free policy forward too, so that d_t carries no dropout noise.

    What is overridden, and why:
    - `__init__`: builds the frozen reference (`dgpo_trl.reference.FrozenReference`), which replaces TRL's: TRL's
      __init__ runs with beta = 0 and no sync_ref_model, so it loads none.
    - `_generate_and_score_completions`: records A_i, and applies the weights when they were computed at scoring time.
    - `_get_per_token_logps_and_entropies`: routes TRL's scoring-time pi_old forward, and the loss-time statistics,
      through DGPO's statistics pass (`dgpo_trl.scoring.StatisticsPass`), which reuses TRL's own input building; answers
      TRL's scoring-time reference forward (DGPO's pass provides those log-probs).
    - `_compute_loss`: marks the micro-batch whose loss TRL computes (see `_phase`).
    - `get_high_entropy_mask` (only with `top_entropy_quantile < 1`): moves each completion's weight onto the tokens
      TRL's high-entropy mask keeps, so the weights average 1 over the tokens that receive gradient.
    - `_save`, `train` and `evaluate`: DGPO's frozen "ref" adapter stays out of saves, and out of the user's model
      once `train()` or `evaluate()` returns (it is put back when the trainer needs it again).
    - `log`: `dgpo/*/max` metrics are the maxima of the logging window (TRL averages every metric over it).
    """

    _tag_names = ["trl", "dgpo"]
    _name = "DGPO"
    # The model card's "trained with DGPO, a method introduced in ..." and its citation; GRPOTrainer's would credit
    # DGPO to the GRPO paper. The year is the arXiv identifier's (2605: May 2026); the paper's text gives none.
    _paper = {
        "title": "DGPO: Distribution-Guided Policy Optimization for Fine-Grained Credit Assignment",
        "id": "2605.03327",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @article{jin2026dgpo,
                title        = {{DGPO: Distribution-Guided Policy Optimization for Fine-Grained Credit Assignment}},
                author       = {Hongbo Jin and Rongpeng Zhu and Zhongjing Du and Xu Jiang and Jingqi Tian and Qiaoman Zhang and Jiayu Ding},
                year         = 2026,
                eprint       = {arXiv:2605.03327},
            }"""),
    }

    def __init__(self, model, reward_funcs=None, args=None, *trainer_args, **trainer_kwargs):
        if args is None:
            model_name = model if isinstance(model, str) else get_config_model_id(model.config)
            args = DGPOConfig(f"{model_name.split('/')[-1]}-DGPO")
        # A plain GRPOConfig (a pipeline that only swapped the trainer class) runs with DGPO's defaults
        weights_tokens = self._weights_tokens = validate_dgpo_arguments(args, warn=not isinstance(args, DGPOConfig)).score != "uniform"
        given = inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *trainer_args, **trainer_kwargs).arguments
        for name in ("train_dataset", "eval_dataset"):
            check_dataset(given.get(name), name, environment=given.get("environment_factory") is not None)
        peft_config = given.get("peft_config")
        passed_peft_model = not isinstance(model, str) and is_peft_model(model)
        if weights_tokens and args.sync_ref_model and (peft_config is not None or passed_peft_model):
            raise NotImplementedError(
                "sync_ref_model=True is not supported with a PEFT model: the reference is the policy with its "
                "adapter disabled, so there is no separate reference to synchronize. Set sync_ref_model=False."
            )
        if weights_tokens:
            check_reference_adapter(model)  # before anything touches the model
        # A model passed as an object may differ from what its config's path holds (changed in memory, or built from
        # a config): its reference is a copy of it, taken before TRL patches its forward (a copy of a patched model
        # would keep calling the original's). A model passed as a path gets its reference from that path.
        copied = None
        if weights_tokens and peft_config is None and not passed_peft_model and not isinstance(model, str):
            copied = frozen_copy(model)

        # DGPO's reference replaces TRL's: TRL's __init__ sees beta = 0 so that it loads none (it would reload the
        # model from its path), and no sync_ref_model, which it refuses with beta = 0; both are restored right after.
        hidden = {"beta": 0.0, "sync_ref_model": False} if weights_tokens else {}
        restore = {key: getattr(args, key) for key in hidden}
        for key, value in hidden.items():
            setattr(args, key, value)
        try:
            super().__init__(model, reward_funcs, args, *trainer_args, **trainer_kwargs)
        finally:
            for key, value in restore.items():
                setattr(args, key, value)
        self.beta = args.beta
        self._unwrapped: dict[int, tuple] = {}
        self._phase_state: _Scoring | _LossTime | None = None
        self.reference = self._build_reference(copied, passed_peft_model, given) if weights_tokens else None
        if self.reference is not None and not self.reference.uses_policy:
            self.ref_model = self.reference.prepared
            if args.use_liger_kernel:
                self.add_callback(ReferenceKernels(self.reference))
            if args.sync_ref_model:
                self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        policy = causal_lm(self._policy())
        self._logit_scale, self._softcap = logit_transform(policy.config)
        self._vocab_size = getattr(policy.get_output_embeddings(), "out_features", None) or policy.config.get_text_config().vocab_size
        self._training_noise = training_noise(self._policy()) if weights_tokens else []
        if self._training_noise:
            warnings.warn(
                f"The policy's train-mode forward is not deterministic ({'; '.join(self._training_noise)}). TRL trains "
                "with it as configured; DGPO computes d_t and H_t from an extra dropout-free forward of the policy "
                "(no grad) per scored completion, so that dropout noise does not enter the token weights. Set those "
                "values to 0 (e.g. lora_dropout=0, disable_dropout=True, the config's attention_dropout=0) to save "
                "that forward.",
                UserWarning,
                stacklevel=2,
            )
        # A few scored completions of the latest training batch that scored any, and their token weights (CPU), for
        # heatmaps and inspection: {"prompt_ids", "prompt_mask", "completion_ids", "weights", "mask"}: (n, ...) each,
        # "advantages": (n,); the same for the latest evaluation batch
        self.last_token_weights: dict[str, torch.Tensor] | None = None
        self.last_eval_token_weights: dict[str, torch.Tensor] | None = None
        self.num_completions_to_show = 8

    def _build_reference(self, copied, passed_peft_model: bool, given: dict) -> FrozenReference:
        """The reference's form follows from what was passed (see `dgpo_trl.reference`)."""
        policy = self._policy()
        if isinstance(policy, PeftModel):
            root = lambda: self.model  # noqa: E731 - Trainer.train() wraps the model later
            if passed_peft_model and given.get("peft_config") is None:
                return FrozenReference.adapter_copy(policy, root)
            return FrozenReference.adapter_disabled(policy, root)
        if copied is not None:
            return FrozenReference.copy_of(copied, self.accelerator, self.args, self.temperature)
        return FrozenReference.load(policy, self.accelerator, self.args, self.temperature, given.get("quantization_config"))

    @property
    def dgpo(self) -> DGPOArguments:
        """DGPO's settings, read from `self.args` and validated (with `DGPOConfig`'s messages) at every use, so that a
        callback can change them during training, e.g. anneal `dgpo_tau`. Only whether tokens are weighted at all
        (`dgpo_score="uniform"` or not) is fixed at construction, which loads a reference model or none."""
        settings = validate_dgpo_arguments(self.args, warn=False)
        if (settings.score != "uniform") != self._weights_tokens:
            raise ValueError(
                f"dgpo_score cannot change between 'uniform' and {[s for s in SCORES if s != 'uniform']} after the "
                f"trainer is built (it loaded {'a' if self._weights_tokens else 'no'} reference model for it), got "
                f"{settings.score!r}. Build a new trainer instead."
            )
        return settings

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
            rows = self._valid_mask(output).any(-1).nonzero().squeeze(-1)
            stats = scoring.statistics.completion_statistics(output["completion_ids"].size(1), self.accelerator.device)
            self._apply_token_weights(output, type(stats)(*(x[rows] for x in stats)), rows)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        phase = self._phase_state
        if isinstance(phase, _Scoring) and self.reference.answers(model, self._unwrap):
            # TRL's reference forward (beta > 0): DGPO's own reference forward yields these log-probs, TRL's exactly,
            # and `_apply_token_weights` writes them before TRL's loss reads them (NaN until then, never read)
            return torch.full((len(input_ids), logits_to_keep), float("nan"), device=input_ids.device), None, None
        if isinstance(phase, _Scoring) and model is self.model:
            # TRL's pi_old forward: DGPO's pass runs it as TRL would, and its statistics on the same hidden states
            phase.statistics = self._statistics_pass(
                policy_forward=lambda inputs, labels: fused_forward(self.model, self._policy(), inputs, labels)
            )
            return super()._get_per_token_logps_and_entropies(
                phase.statistics, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        if not isinstance(phase, _LossTime) or TOKEN_WEIGHTS in phase.inputs:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        # The micro-batch's first training forward, pi_theta == pi_old: it provides the policy's side
        inputs = phase.inputs
        deterministic = not (self._training_noise and self.model.training)
        with captured_hidden_states(self._policy()) if deterministic else nullcontext([]) as captured:
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, *args, **kwargs)
        kwargs.update(batch_size=None, compute_entropy=False, compute_aux_loss=False)
        multimodal = any(value is not None for key, value in kwargs.items() if key not in _SCORING_OPTIONS)
        wanted = self._rows_wanted(inputs)
        rows = self._select_rows(wanted, subset_allowed=not multimodal)
        statistics = self._statistics_pass(
            policy_hidden=torch.cat(captured)[rows] if captured else None, policy_logps=result[0].detach()[rows]
        )
        if len(rows):
            super()._get_per_token_logps_and_entropies(
                statistics, input_ids[rows], attention_mask[rows], logits_to_keep, **kwargs
            )
        stats = statistics.completion_statistics(logits_to_keep, input_ids.device)
        scored = wanted[rows]
        self._apply_token_weights(inputs, type(stats)(*(x[scored] for x in stats)), rows[scored])
        return result

    def _compute_loss(self, model, inputs):
        if not self._weights_tokens:
            return super()._compute_loss(model, inputs)
        with self._phase(_LossTime(inputs)):
            return super()._compute_loss(model, inputs)

    def get_high_entropy_mask(self, entropies, mask, threshold):
        entropy_mask = super().get_high_entropy_mask(entropies, mask, threshold)
        phase = self._phase_state
        if isinstance(phase, _LossTime) and WEIGHT_SCORES in phase.inputs:
            # TRL's loss trains only the tokens this mask keeps, and reads inputs["advantages"] right after it: each
            # completion's weight moves onto them, w_t = K_i * softmax of s_t / tau over its K_i kept tokens (0 on the
            # others). The kept weights average 1, as GRPO's do under the same mask, and the mass the paper's weights
            # gave masked tokens is not lost. The mask is TRL's own, from this forward's entropies.
            inputs = phase.inputs
            weights = weights_from_scores(inputs[WEIGHT_SCORES], entropy_mask, inputs[WEIGHT_TAU].unsqueeze(-1))
            inputs["advantages"] = inputs[SEQUENCE_ADVANTAGES].unsqueeze(1) * weights
        return entropy_mask

    def log(self, logs, start_time=None):
        # TRL averages each metric over the logging window; DGPO's maxima are the window's maxima instead (TRL's own
        # `*_max`, e.g. `clip_ratio/high_max`, stay means of per-step maxima, as TRL logs them)
        for values in self._metrics.values():
            for key, window in values.items():
                if key.startswith("dgpo/") and key.endswith("/max") and window:
                    window[:] = [max(window)]
        return super().log(logs, start_time)

    def train(self, *args, **kwargs):
        try:
            return super().train(*args, **kwargs)
        finally:
            self._release_reference()

    def evaluate(self, *args, **kwargs):
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            if not self.is_in_train:  # an evaluation inside train() keeps it until train() ends
                self._release_reference()

    def _release_reference(self):
        # The user's PeftModel is left as GRPOTrainer leaves it: without DGPO's reference adapter (restored on use)
        if self.reference is not None:
            self.reference.release(sharded=self._collective_forwards)

    def _save(self, output_dir=None, state_dict=None):
        # DGPO's frozen reference adapter is not something the user trains: checkpoints, `save_model` and Hub pushes
        # write the trained adapters only (a resumed or reloaded trainer rebuilds the reference from the model passed)
        policy = self._policy()
        excluded = self.reference.excluded_adapters if self.reference is not None else ()
        if not isinstance(policy, PeftModel) or not set(excluded) & set(policy.peft_config):
            return super()._save(output_dir, state_dict)
        adapters = [name for name in policy.peft_config if name not in excluded]
        policy.save_pretrained = functools.partial(policy.save_pretrained, selected_adapters=adapters)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del policy.save_pretrained

    # ------------------------------------------------------------------------------------------------------------
    # DGPO's forwards

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
            select_rows=self._select_rows,
            ref_logps=self.beta != 0.0,
            **given,
        )

    def _dropout_free_hidden(self, model_inputs: dict) -> torch.Tensor:
        with eval_mode(self.model):
            return backbone_forward(self.model, self._policy(), model_inputs)

    def _divergence_pass(self, policy_hidden, ref_hidden):
        return divergence_pass(
            policy_hidden,
            causal_lm(self._policy()).get_output_embeddings(),
            ref_hidden,
            self.reference.lm_head,
            cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
            temperature=self.temperature,
            logit_scale=self._logit_scale,
            final_logit_softcapping=self._softcap,
            chunk_size=self.dgpo.chunk_size,
        )

    @staticmethod
    def _valid_mask(inputs: dict) -> torch.Tensor:
        """The tokens a completion's weights are spread over: its completion tokens minus tool outputs, (B, T) bool."""
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        return mask.bool()

    def _rows_wanted(self, inputs: dict) -> torch.Tensor:
        """(B,) bool: the completions whose weights matter at loss time, those with a valid token and, unless TRL's
        KL term needs the reference log-probs of every one (beta != 0), a nonzero advantage (A_i * w_t = 0)."""
        wanted = self._valid_mask(inputs).any(-1)
        if self.dgpo.skip_zero_advantage and self.beta == 0.0:
            wanted &= _sequence_advantages(inputs) != 0
        return wanted

    def _select_rows(self, wanted: torch.Tensor, subset_allowed: bool) -> torch.Tensor:
        """Indices of the rows to run DGPO's forwards on: the `wanted` ones, or all of them where the model inputs
        cannot be split by row (multimodal inputs)."""
        if not subset_allowed:
            return torch.arange(len(wanted), device=wanted.device)
        rows = wanted.nonzero().squeeze(-1)
        # A sharded model's forward is a collective: a rank with nothing to score still runs one (on row 0, discarded)
        return rows if len(rows) or not self._collective_forwards else rows.new_zeros(1)

    @property
    def _collective_forwards(self) -> bool:
        """Whether a forward is a collective (ZeRO-3 / FSDP gather parameters), so every rank must run as many."""
        if self.is_fsdp_enabled:
            return True
        plugin = self.accelerator.state.deepspeed_plugin
        return self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3

    # ------------------------------------------------------------------------------------------------------------
    # Weights

    def _apply_token_weights(self, inputs: dict, stats, rows: torch.Tensor) -> None:
        """Weights the completions of a batch, in place: `inputs[TOKEN_WEIGHTS]` (B, T) and TRL's
        `inputs["advantages"]` = A_i * w_t (B, T) (and, when beta > 0, TRL's `ref_per_token_logps`); logs metrics.

        `stats` holds the statistics of the completions `rows`, each field (len(rows), T). The other completions
        have A_i = 0, so their weights never reach the loss; they keep w = 1.
        """
        mask = self._valid_mask(inputs)
        advantages = _sequence_advantages(inputs)
        scored_mask = mask[rows]
        dgpo = self.dgpo  # read now: a callback may have changed them since the last batch
        divergence = stats.divergence(dgpo.score)
        scores = token_scores(
            divergence, stats.entropy, kappa=dgpo.kappa, vocab_size=self._vocab_size, entropy_gate=dgpo.entropy_gate
        )
        tau = dgpo.tau
        if dgpo.target_ess is not None:
            tau = tau_for_target_ess(
                scores,
                scored_mask & (advantages[rows] != 0).unsqueeze(-1),
                dgpo.target_ess,
                fallback=dgpo.tau,
                reduce=lambda x: self.accelerator.reduce(x, reduction="sum"),
            )
        # In float64: the metrics must resolve weight spreads far below float32's resolution near w = 1
        scored_weights = weights_from_scores(scores.to(wide_dtype(scores.device)), scored_mask, tau)
        weights = mask.float()
        weights[rows] = scored_weights.float()
        inputs[TOKEN_WEIGHTS] = weights
        inputs["advantages"] = advantages.unsqueeze(1) * weights
        if self.top_entropy_quantile < 1.0:
            # TRL picks the tokens it trains in each loss call; `get_high_entropy_mask` reallocates from these
            weight_scores = torch.zeros_like(weights, dtype=scores.dtype)
            finite = ~nonfinite_sequences(scores, scored_mask).unsqueeze(-1)  # the others fall back to uniform
            weight_scores[rows] = torch.where(scored_mask & finite, scores, 0.0)
            inputs[WEIGHT_SCORES] = weight_scores
            inputs[WEIGHT_TAU] = torch.full_like(advantages, tau, dtype=scores.dtype)
        if self.beta != 0.0:  # every row with a valid token was scored (`_rows_wanted`); the others have no KL term
            ref_logps = torch.zeros_like(weights)
            ref_logps[rows] = stats.ref_logps
            inputs["ref_per_token_logps"] = ref_logps
        if len(rows):  # a batch with nothing to score keeps the previous batch's for heatmaps
            shown = rows[: self.num_completions_to_show]
            shown_weights = {
                "prompt_ids": inputs["prompt_ids"][shown].cpu(),
                "prompt_mask": inputs["prompt_mask"][shown].cpu(),
                "completion_ids": inputs["completion_ids"][shown].cpu(),
                "weights": weights[shown].cpu(),
                "mask": mask[shown].cpu(),
                "advantages": advantages[shown].cpu(),
            }
            # Evaluation keeps its own, so that it never replaces the training batch's
            if self.model.training:
                self.last_token_weights = shown_weights
            else:
                self.last_eval_token_weights = shown_weights
        metrics = dgpo_metrics(
            stats, divergence, scores, scored_weights, scored_mask, tau, len(advantages),
            vocab_size=self._vocab_size, accelerator=self.accelerator, fused=last_divergence_path() == "fused",
        )  # fmt: skip
        mode = "train" if self.model.training else "eval"
        for name, value in metrics.items():
            self._metrics[mode][name].append(value)
