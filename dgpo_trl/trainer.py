"""`DGPOTrainer`: TRL's `GRPOTrainer` with DGPO's distribution-guided per-token advantages."""

from __future__ import annotations

import functools
import inspect
import math
import textwrap
from types import SimpleNamespace

import torch
from accelerate.utils import is_peft_model
from peft import PeftModel
from torch.distributed.tensor import DTensor

from trl import GRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import get_config_model_id, maybe_gather_lm_head_ctx, use_adapter

from .config import DGPOArguments, DGPOConfig, validate_dgpo_arguments
from .functional import (
    SCORES,
    TokenStatistics,
    effective_sample_size,
    nonfinite_sequences,
    sequence_moments,
    tau_for_target_ess,
    token_scores,
    token_statistics,
    weights_from_scores,
    wide_dtype,
)
from .reference import (
    REFERENCE_ADAPTER,
    ReferenceKernels,
    add_reference_adapter,
    backbone_forward,
    captured_hidden_states,
    causal_lm,
    frozen_copy,
    load_reference_model,
    prepare_reference_model,
    trained_adapters,
)


# Keyword arguments of `GRPOTrainer._get_per_token_logps_and_entropies` that are options, not model inputs
_SCORING_OPTIONS = ("batch_size", "compute_entropy", "compute_aux_loss")
# Model inputs that hold one row per completion, so a subset of completions is a subset of their rows
_PER_ROW_INPUTS = {"input_ids", "attention_mask"}
# With TRL's high-entropy token mask (`top_entropy_quantile < 1`), what reallocating a completion's weight onto the
# tokens the mask keeps takes, stored with its batch (TRL splits and shuffles every tensor of it along dim 0):
# A_i (B,), and the softmax logits s_t / tau (B, T) of DGPO's weights (0 on rows weighted uniformly)
_SEQUENCE_ADVANTAGES = "dgpo_sequence_advantages"
_WEIGHT_LOGITS = "dgpo_weight_logits"


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


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a parameter FSDP2 shards as a DTensor (as TRL's fused LM head gathers it)."""
    return param.full_tensor() if isinstance(param, DTensor) else param


def _check_prompt_column(dataset, name: str, environment: bool = False) -> None:
    """Refuses, at construction, a dataset GRPOTrainer could only fail on or silently not use, saying what is wrong.

    An empty dataset (GRPOTrainer would train zero steps, or evaluate nothing, without a word). A dataset without a
    "prompt" column, unless an `environment_factory` builds the prompts (`environment=True`: TRL 1.16 then trains on a
    dataset with, e.g., only an "environment" column): GRPOTrainer reads every prompt from that column and would fail
    on the first batch with a bare `KeyError`.
    """
    if isinstance(dataset, dict):  # DatasetDict, or a dict of eval datasets
        for key, value in dataset.items():
            _check_prompt_column(value, f"{name}[{key!r}]", environment)
        return
    if dataset is None or not hasattr(dataset, "__len__"):  # IterableDataset: no length, maybe unknown features
        return
    if len(dataset) == 0:
        raise ValueError(
            f"{name} is empty (0 rows): there is nothing to {'evaluate' if name.startswith('eval') else 'train'} on. "
            "Check the split, or any filter applied to it."
        )
    columns = getattr(dataset, "column_names", None)
    if environment or columns is None or "prompt" in columns:
        return
    raise ValueError(
        f"{name} has no 'prompt' column, which GRPOTrainer and DGPOTrainer read each example's prompt from; its "
        f"columns are {list(columns)}. Rename the column that holds the prompts, e.g. "
        f"`dataset.rename_column({(columns[0] if columns else 'question')!r}, 'prompt')`, or pass an "
        "`environment_factory` whose environments build the prompts."
    )


class _JointPass:
    """Stands in for the policy model inside `GRPOTrainer._get_per_token_logps_and_entropies`.

    TRL's method slices the batch into row chunks, builds each chunk's model inputs (multimodal fields included) and
    labels, and calls `model(**inputs, labels=labels, fused_lm_head=True)`. Passing this object instead lets DGPO reuse
    that input building, and run, per chunk, the reference forward and the divergence pass over the scored positions.

    The policy's hidden states come from a forward TRL would run anyway. At loss time they are given, captured from
    TRL's training forward. At scoring time (TRL's no-grad forward for pi_old log-probs, `scoring=True`) this object
    runs the policy's backbone itself and returns TRL the label log-probs of its own pass: TRL's fused LM head would
    project the policy's LM head a second time for the same numbers.
    """

    def __init__(self, trainer: DGPOTrainer, policy_hidden: torch.Tensor | None = None, scoring: bool = False):
        self.trainer = trainer
        self.scoring = scoring
        self.policy_hidden = policy_hidden  # (B, L, H), at loss time
        self.rows_done = 0
        self.chunks: list[TokenStatistics] = []

    def __call__(self, labels, fused_lm_head=True, **model_inputs):
        trainer = self.trainer
        # Position t's hidden state predicts token t + 1; only completion tokens carry a label
        targets = labels[:, 1:]
        mask = targets != -100
        per_position = TokenStatistics(*(torch.zeros(mask.shape, device=mask.device) for _ in TokenStatistics._fields))
        self.chunks.append(per_position)
        if self.scoring:
            # Rows without a completion token (e.g. truncated and masked) need neither forward
            rows = trainer._forward_rows(mask.any(-1), subset_allowed=model_inputs.keys() <= _PER_ROW_INPUTS)
            if len(rows) < len(mask):
                model_inputs = {key: value[rows] for key, value in model_inputs.items()}
        else:  # the caller forwards only the rows it scores
            rows = torch.arange(len(mask), device=mask.device)
        if len(rows) == 0:
            return SimpleNamespace(log_probs=per_position.policy_logps, entropy=per_position.entropy, aux_loss=None)
        targets, mask = targets[rows], mask[rows]
        ref_hidden = trainer._reference_hidden(model_inputs)[:, :-1][mask]

        def statistics(policy_hidden):
            return trainer._divergence_pass(policy_hidden[:, :-1][mask], ref_hidden, targets[mask])

        if self.scoring:
            stats = trainer._policy_forward(model_inputs, statistics)
        else:
            stats = statistics(self.policy_hidden[self.rows_done : self.rows_done + len(rows)])
            self.rows_done += len(rows)
        for field, values in zip(per_position, stats):
            field[rows] = values.new_zeros(mask.shape).masked_scatter(mask, values)
        return SimpleNamespace(log_probs=per_position.policy_logps, entropy=per_position.entropy, aux_loss=None)

    def completion_statistics(self, logits_to_keep: int) -> TokenStatistics:
        """The collected statistics over the completion positions, each (rows, logits_to_keep); rows may be 0."""
        if not self.chunks:
            empty = torch.zeros(0, logits_to_keep, device=self.trainer.accelerator.device)
            return TokenStatistics(*(empty for _ in TokenStatistics._fields))
        return TokenStatistics(*(torch.cat(field, dim=0)[:, -logits_to_keep:] for field in zip(*self.chunks)))


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

    pi_theta is the policy that generated the batch (pi_old), and each completion's weights are computed once:
    - when TRL asks for pi_old log-probs at scoring time (off-policy steps or vLLM importance sampling), DGPO answers
      the call: per chunk of TRL's own inputs, the policy's backbone, the reference forward and the divergence pass,
      whose policy label log-probs are TRL's old log-probs (the policy's LM head is projected once);
    - otherwise the parameters cannot change before the completion is trained on, so DGPO takes pi_theta's hidden
      states from the training forward itself and runs only the reference forward, for the completions whose
      advantage is nonzero (`dgpo_skip_zero_advantage`).
    Either way DGPO adds no policy forward, one reference forward per scored completion (replacing TRL's when
    beta > 0), and a divergence pass over (tokens x vocabulary) tiles that never holds full logits.

    What is overridden, and why:
    - `__init__`: builds the frozen reference, which replaces TRL's (TRL's __init__ runs with beta = 0 and no
      sync_ref_model, so it loads none): a copy of a model passed as an object, taken before TRL patches it (a model
      changed in memory is its own reference), or loaded from a model's path as TRL loads its own; for a PEFT model,
      the same model with the adapter disabled (or a frozen "ref" adapter copy of a pretrained adapter). Its life
      cycle is in `dgpo_trl.reference`. With `use_liger_kernel=True` a callback gives the reference the Liger kernels
      `train()` gives the policy.
    - `_generate_and_score_completions`: switches off TRL's reference forward (DGPO's pass yields those log-probs)
      and applies the weights when they were computed at scoring time.
    - `_get_per_token_logps_and_entropies`: routes TRL's scoring-time policy forward, and the loss-time statistics,
      through DGPO's joint pass (`_JointPass`), which reuses TRL's own input building.
    - `_compute_loss`: marks the micro-batch whose weights are computed from the training forward.
    - `_save`: leaves DGPO's frozen "ref" adapter out of what checkpoints, `save_model` and Hub pushes write.
    - `get_high_entropy_mask` (only with `top_entropy_quantile < 1`): moves each completion's weight onto the tokens
      TRL's high-entropy mask keeps, so the weights average 1 over the tokens that receive gradient.

    Every forward DGPO runs goes through the module the engine prepared (`dgpo_trl.reference.backbone_forward`),
    so FSDP2's and ZeRO-3's hooks run as in a normal forward; the policy's LM-head module is never called.
    """

    _tag_names = ["trl", "dgpo"]
    _name = "DGPO"
    _entropy_masked_inputs: dict | None = None  # the micro-batch in TRL's `_compute_loss`, for `get_high_entropy_mask`
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
        dgpo = validate_dgpo_arguments(args, warn=not isinstance(args, DGPOConfig))
        needs_reference = self._weights_tokens = dgpo.score != "uniform"
        given = inspect.signature(GRPOTrainer.__init__).bind(
            self, model, reward_funcs, args, *trainer_args, **trainer_kwargs
        ).arguments
        peft_config = given.get("peft_config")
        for name in ("train_dataset", "eval_dataset"):
            _check_prompt_column(given.get(name), name, environment=given.get("environment_factory") is not None)
        wrapped_peft_model = not isinstance(model, str) and is_peft_model(model)
        sync_reference = needs_reference and args.sync_ref_model
        if sync_reference and (peft_config is not None or wrapped_peft_model):
            raise NotImplementedError(
                "sync_ref_model=True is not supported with a PEFT model: the reference is the policy with its "
                "adapter disabled, so there is no separate reference to synchronize. Set sync_ref_model=False."
            )
        # A model passed as an object may differ from what its config's path holds (changed in memory, or built from
        # a config): its reference is a copy of it, taken before TRL patches its forward (a copy of a patched model
        # would keep calling the original's). A model passed as a path gets its reference from that path.
        reference = None
        if needs_reference and peft_config is None and not wrapped_peft_model and not isinstance(model, str):
            reference = frozen_copy(model)

        # DGPO's reference replaces TRL's: TRL's __init__ sees beta = 0 so that it loads none (it would reload the
        # model from its path), and no sync_ref_model, which it refuses with beta = 0; both are restored right after.
        hidden = {"beta": 0.0, "sync_ref_model": False} if needs_reference else {}
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
        if needs_reference and peft_config is None and wrapped_peft_model:
            # A pretrained adapter: the reference is the initial policy, base model plus this adapter, kept as a frozen
            # adapter copy (what TRL does for beta != 0). Added once the trainer exists: a refused construction leaves
            # the user's model as it was.
            add_reference_adapter(model)
        if needs_reference and not isinstance(self._policy(), PeftModel):
            if reference is None:
                reference = load_reference_model(self, given.get("quantization_config"))
            self.ref_model = prepare_reference_model(self, reference)
            if args.use_liger_kernel:
                self.add_callback(ReferenceKernels(self))
        if sync_reference:
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        policy = causal_lm(self._policy())
        self._logit_scale, self._softcap = logit_transform(policy.config)
        head = policy.get_output_embeddings()
        self._vocab_size = getattr(head, "out_features", None) or policy.config.get_text_config().vocab_size
        self._scoring: _JointPass | None = None  # set while TRL scores a generation batch
        self._loss_inputs: dict | None = None  # the micro-batch whose weights come from the training forward
        # A few scored completions of the latest training batch that scored any, and their token weights (CPU), for
        # heatmaps and inspection: {"completion_ids", "weights", "mask"}: (n, T) each, "advantages": (n,); the same
        # for the latest evaluation batch
        self.last_token_weights: dict[str, torch.Tensor] | None = None
        self.last_eval_token_weights: dict[str, torch.Tensor] | None = None
        self.num_completions_to_show = 8

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

    # ------------------------------------------------------------------------------------------------------------
    # Models

    def _policy(self):
        return self._unwrap(self.model)

    def _unwrap(self, model):
        """`accelerator.unwrap_model`, cached: it re-reads package metadata on every call (~0.5 ms, many times a step),
        and a wrapper keeps its module for good."""
        cached = self._unwrapped.get(id(model))
        if cached is None or cached[0] is not model:
            cached = self._unwrapped[id(model)] = (model, self.accelerator.unwrap_model(model))
        return cached[1]

    def _reference(self):
        """The frozen reference model (unwrapped), or with PEFT the policy itself, whose adapter `_reference_hidden`
        disables."""
        return self._policy() if self.ref_model is None else self._unwrap(self.ref_model)

    def _reference_hidden(self, model_inputs) -> torch.Tensor:
        """The reference's last hidden states for a chunk of TRL-built model inputs (no grad).

        A full reference runs through its own prepared module. With PEFT the policy runs with the adapter disabled
        (or DGPO's frozen reference adapter active), through the policy's root, as its training forward does. Neither
        projects an LM head: `_divergence_pass` uses the head weights.
        """
        if self.ref_model is not None:
            return backbone_forward(self.ref_model, self._reference(), model_inputs)
        policy = self._policy()
        adapter = REFERENCE_ADAPTER if REFERENCE_ADAPTER in policy.peft_config else None
        with use_adapter(policy, adapter_name=adapter):
            return backbone_forward(self.model, policy, model_inputs)

    def _policy_forward(self, model_inputs, head):
        """`head(the policy's last hidden states)` for a chunk of TRL-built model inputs (no grad), computed inside a
        forward of the policy's root as TRL's fused LM head computes its log-probs, on the same inputs."""
        return backbone_forward(self.model, self._policy(), model_inputs, head)

    def _captured_policy_hidden(self):
        """Collects the policy backbone's last hidden states from the forwards run inside the block."""
        return captured_hidden_states(causal_lm(self._policy()).base_model)

    def _divergence_pass(self, policy_hidden, ref_hidden, labels) -> TokenStatistics:
        policy_head = causal_lm(self._policy()).get_output_embeddings()
        ref_head = causal_lm(self._reference()).get_output_embeddings()
        if self.args.cast_lm_head_to_fp32:
            policy_hidden, ref_hidden = policy_hidden.float(), ref_hidden.float()
        # Collective under ZeRO-3 (and FSDP2): every rank runs it once per chunk, whatever its number of tokens
        heads = (policy_head.weight, policy_head.bias, ref_head.weight, ref_head.bias)
        with torch.no_grad(), maybe_gather_lm_head_ctx(*heads):
            return token_statistics(
                policy_hidden,
                _full(policy_head.weight),
                ref_hidden,
                _full(ref_head.weight),
                labels,
                policy_bias=_full(policy_head.bias),
                ref_bias=_full(ref_head.bias),
                temperature=self.temperature,
                logit_scale=self._logit_scale,
                final_logit_softcapping=self._softcap,
                chunk_size=self.dgpo.chunk_size,
            )

    # ------------------------------------------------------------------------------------------------------------
    # TRL hooks

    def _generate_and_score_completions(self, inputs):
        if self.dgpo.score == "uniform":
            return super()._generate_and_score_completions(inputs)
        # TRL scores the reference only when beta != 0; DGPO's own reference forward yields those log-probs, so TRL's
        # is switched off while it scores (restored before anything reads beta again).
        beta, self.beta = self.beta, 0.0
        self._scoring = _JointPass(self, scoring=True)
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self.beta = beta
            joint, self._scoring = self._scoring, None
        if joint.chunks:
            # TRL asked for pi_old log-probs, and DGPO's pass gave them, with its statistics, for every row that has a
            # completion token
            rows = self._valid_mask(output).any(-1).nonzero().squeeze(-1)
            stats = joint.completion_statistics(output["completion_ids"].size(1))
            self._apply_token_weights(output, TokenStatistics(*(x[rows] for x in stats)), rows)
        return output

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        if self._scoring is not None and model is self.model:
            # TRL's scoring-time policy forward (pi_old log-probs): DGPO's joint pass answers it
            return super()._get_per_token_logps_and_entropies(
                self._scoring, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        inputs, self._loss_inputs = self._loss_inputs, None
        if inputs is None:
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        # Loss time with pi_theta == pi_old: the training forward provides the policy's hidden states
        with self._captured_policy_hidden() as captured:
            result = super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, *args, **kwargs
            )
        kwargs.update(batch_size=None, compute_entropy=False, compute_aux_loss=False)
        multimodal = any(value is not None for key, value in kwargs.items() if key not in _SCORING_OPTIONS)
        wanted = self._rows_wanted(inputs)
        forward_rows = self._forward_rows(wanted, subset_allowed=not multimodal)
        joint = _JointPass(self, policy_hidden=torch.cat(captured, dim=0)[forward_rows])
        if len(forward_rows):
            super()._get_per_token_logps_and_entropies(
                joint, input_ids[forward_rows], attention_mask[forward_rows], logits_to_keep, **kwargs
            )
        stats = joint.completion_statistics(logits_to_keep)
        scored = wanted[forward_rows]
        self._apply_token_weights(inputs, TokenStatistics(*(x[scored] for x in stats)), forward_rows[scored])
        return result

    def _compute_loss(self, model, inputs):
        if self.dgpo.score != "uniform" and inputs["advantages"].dim() == 1:
            # Not weighted at scoring time (nor by an earlier iteration over this micro-batch): no optimizer step has
            # happened since generation, so the training forward below is pi_old and provides the statistics.
            self._loss_inputs = inputs
        self._entropy_masked_inputs = inputs  # see `get_high_entropy_mask`
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_inputs = self._entropy_masked_inputs = None

    def get_high_entropy_mask(self, entropies, mask, threshold):
        entropy_mask = super().get_high_entropy_mask(entropies, mask, threshold)
        inputs = self._entropy_masked_inputs
        if inputs is not None and _WEIGHT_LOGITS in inputs:
            # TRL's loss trains only the tokens this mask keeps, and reads inputs["advantages"] right after it: each
            # completion's weight moves onto them, w_t = K_i * softmax of s_t / tau over its K_i kept tokens (0 on the
            # others). The kept weights average 1, as GRPO's do under the same mask, and the mass the paper's weights
            # gave masked tokens is not lost. The mask is TRL's own, from this forward's entropies.
            weights = weights_from_scores(inputs[_WEIGHT_LOGITS], entropy_mask, 1.0)
            inputs["advantages"] = inputs[_SEQUENCE_ADVANTAGES].unsqueeze(1) * weights
        return entropy_mask

    def _save(self, output_dir=None, state_dict=None):
        # DGPO's frozen reference adapter is not something the user trains: checkpoints, `save_model` and Hub pushes
        # write the trained adapters only (a resumed or reloaded trainer rebuilds the reference from the model passed)
        policy = self._policy()
        adapters = trained_adapters(policy)
        if adapters is None or REFERENCE_ADAPTER not in policy.peft_config:
            return super()._save(output_dir, state_dict)
        policy.save_pretrained = functools.partial(policy.save_pretrained, selected_adapters=adapters)
        try:
            return super()._save(output_dir, state_dict)
        finally:
            del policy.save_pretrained

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
            wanted &= inputs["advantages"] != 0
        return wanted

    def _forward_rows(self, wanted: torch.Tensor, subset_allowed: bool) -> torch.Tensor:
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
    # Weights and metrics

    def _apply_token_weights(self, inputs: dict, stats: TokenStatistics, rows: torch.Tensor) -> None:
        """Turns `inputs["advantages"]` (B,) into DGPO's per-token advantages (B, T), in place, and logs metrics.

        `stats` holds the statistics of the completions `rows`, each field (len(rows), T). The other completions
        have A_i = 0, so their weights never reach the loss; they keep w = 1.
        """
        mask = self._valid_mask(inputs)
        advantages = inputs["advantages"]
        scored_mask = mask[rows]
        dgpo = self.dgpo  # read now: a callback may have changed them since the last batch
        divergence = stats.divergence(dgpo.score)
        scores = token_scores(
            divergence,
            stats.entropy,
            kappa=dgpo.kappa,
            vocab_size=self._vocab_size,
            entropy_gate=dgpo.entropy_gate,
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
        inputs["advantages"] = advantages.unsqueeze(1) * weights
        if self.top_entropy_quantile < 1.0:
            # TRL picks the tokens it trains in each loss call; `get_high_entropy_mask` reallocates from these
            logits = torch.zeros_like(weights)
            finite = ~nonfinite_sequences(scores, scored_mask).unsqueeze(-1)  # the others fall back to uniform
            logits[rows] = torch.where(scored_mask & finite, scores / tau, 0.0).to(logits.dtype)
            inputs[_SEQUENCE_ADVANTAGES], inputs[_WEIGHT_LOGITS] = advantages, logits
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
        if self.beta != 0.0:  # every row with a valid token was scored (`_rows_wanted`); the others have no KL term
            ref_logps = torch.zeros_like(weights)
            ref_logps[rows] = stats.ref_logps
            inputs["ref_per_token_logps"] = ref_logps
        self._log_dgpo_metrics(stats, divergence, scores, scored_weights, scored_mask, tau, len(advantages))

    def _log_dgpo_metrics(self, stats, divergence, scores, weights, mask, tau, batch_rows) -> None:
        """Logs DGPO's statistics over the scored tokens, reduced across processes, under `dgpo/`.

        Means are over scored tokens (`/mean`) or sequences (`ess`). Spreads are within-sequence, from deviations
        in float64 (`sequence_moments`): `weight/std` is the pooled std of w around each sequence's mean of exactly 1,
        `score/std` that of s, the spread the softmax turns into weights (relative to tau).
        """
        mode = "train" if self.model.training else "eval"
        wide = weights.dtype
        valid = mask & torch.isfinite(scores)
        non_empty = mask.any(dim=-1)
        scored_rows = valid.any(dim=-1)
        normalized_entropy = (stats.entropy / math.log(self._vocab_size)).clamp(0.0, 1.0)
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
            ]
        )
        sums = self.accelerator.reduce(sums, reduction="sum")
        # weight/max in float64 too: a weight of 1 + 1e-7 must not read as exactly 1 (uniform)
        maxima = torch.stack([maximum(divergence).to(wide), maximum(scores).to(wide), maximum(weights)]).unsqueeze(0)
        maxima = self.accelerator.gather(maxima).amax(0)
        (
            d, h_normalized, h, s, kl, n_valid, weight_ss, n_weighted, score_ss, ess, n_seqs, n_nonfinite, n_scored,
            n_rows, tau_sum,
        ) = sums.tolist()
        metrics = self._metrics[mode]
        metrics["dgpo/nonfinite_sequences"].append(n_nonfinite)
        metrics["dgpo/scored_fraction"].append(n_scored / max(n_rows, 1.0))
        metrics["dgpo/tau"].append(tau_sum / self.accelerator.num_processes)
        if n_valid == 0:
            return
        metrics["dgpo/divergence/mean"].append(d / n_valid)
        metrics["dgpo/divergence/max"].append(maxima[0].item())
        metrics["dgpo/entropy/mean"].append(h / n_valid)
        metrics["dgpo/entropy_normalized/mean"].append(h_normalized / n_valid)
        metrics["dgpo/score/mean"].append(s / n_valid)
        metrics["dgpo/score/std"].append(math.sqrt(score_ss / n_valid))
        metrics["dgpo/score/max"].append(maxima[1].item())
        metrics["dgpo/reverse_kl/mean"].append(kl / n_valid)
        metrics["dgpo/weight/max"].append(maxima[2].item())
        metrics["dgpo/weight/std"].append(math.sqrt(weight_ss / n_weighted))
        metrics["dgpo/ess"].append(ess / n_seqs)
