"""`DGPOTrainer`: TRL's `GRPOTrainer` with DGPO's distribution-guided per-token advantages."""

from __future__ import annotations

import copy
import inspect
import math
import textwrap
from contextlib import contextmanager
from types import SimpleNamespace

import torch
from accelerate.utils import is_peft_model
from peft import PeftModel
from torch.distributed.tensor import DTensor

from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import (
    add_fused_lm_head,
    create_model_from_path,
    disable_dropout_in_model,
    get_config_model_id,
    maybe_gather_lm_head_ctx,
    use_adapter,
)

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


# Keyword arguments of `GRPOTrainer._get_per_token_logps_and_entropies` that are options, not model inputs
_SCORING_OPTIONS = ("batch_size", "compute_entropy", "compute_aux_loss")
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


def _causal_lm(model):
    """The `PreTrainedModel` under a PEFT wrapper (adapter layers included), or the (unwrapped) model itself."""
    # isinstance, not accelerate's is_peft_model: that one re-reads package metadata on every call (~0.5 ms)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def _full(param: torch.Tensor | None) -> torch.Tensor | None:
    """The whole tensor of a parameter FSDP2 shards as a DTensor (as TRL's fused LM head gathers it)."""
    return param.full_tensor() if isinstance(param, DTensor) else param


@contextmanager
def _captured_hidden(backbone: torch.nn.Module):
    """Collects `backbone`'s last hidden states (detached) from the forwards run inside the block."""
    captured = []
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of `model` as it is now, to serve as DGPO's frozen reference: same weights, buffers and config.

    A model loaded under DeepSpeed ZeRO-3's `zero.Init` holds only its shard of every parameter on each rank: the copy
    is built from the same config (partitioned the same way) and filled one gathered parameter at a time, so no rank
    ever holds more than its shard of the copy plus one full parameter. Any other model is deep-copied.

    Raises `ValueError` where no faithful copy can be made: a quantized model (its packed weights and quantization
    state do not survive a copy) or a model whose parameters are on the meta device (they hold no values).
    """
    quantized = getattr(model, "hf_quantizer", None) is not None
    if quantized or getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        raise ValueError(
            "DGPO scores tokens against a frozen copy of the model passed to the trainer, but a quantized model cannot "
            "be copied. Pass a `peft_config` (the reference is then the same model with its adapter disabled, as in "
            "QLoRA), or pass the model's path as a string with `quantization_config` so the reference is loaded from it."
        )
    if any(param.is_meta for param in model.parameters()):
        raise ValueError(
            "DGPO scores tokens against a frozen copy of the model passed to the trainer, but this model's parameters "
            "are on the meta device and hold no values. Load its weights first (e.g. `from_pretrained`), or pass the "
            "model's path as a string."
        )
    if not any(hasattr(param, "ds_id") for param in model.parameters()):
        return copy.deepcopy(model)
    import deepspeed

    # `_from_config` builds under `zero.Init` while ZeRO-3 is configured, so the copy is partitioned like the model
    reference = type(model)._from_config(
        copy.deepcopy(model.config), dtype=model.dtype, attn_implementation=model.config._attn_implementation
    )
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params, copies = dict(model.named_parameters()), dict(reference.named_parameters())
    if params.keys() != copies.keys():
        raise RuntimeError(f"Copying {type(model).__name__} for the reference gave other parameters than the model's.")
    for name, param in params.items():
        with deepspeed.zero.GatheredParameters([param]), deepspeed.zero.GatheredParameters(
            [copies[name]], modifier_rank=0
        ):
            if rank == 0:
                copies[name].data.copy_(param.data)
    for (_, buffer), (_, copied) in zip(model.named_buffers(), reference.named_buffers()):
        copied.data.copy_(buffer.data)
    return reference


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


class _ReferenceKernels(TrainerCallback):
    """Gives DGPO's reference the Liger kernels `Trainer.train()` applies to the policy when `use_liger_kernel=True`.

    transformers patches the policy at the start of `train()`, just before `on_train_begin`; a reference with the
    standard kernels would differ from the policy by kernel numerics alone (d_t > 0 before any update).
    """

    def __init__(self, trainer: DGPOTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(self.trainer._reference(), args.liger_kernel_config)


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
        if self.scoring:
            policy_hidden = trainer._policy_hidden(model_inputs)
        else:
            policy_hidden = self.policy_hidden[self.rows_done : self.rows_done + labels.shape[0]]
            self.rows_done += labels.shape[0]
        ref_hidden = trainer._reference_hidden(model_inputs)
        # Position t's hidden state predicts token t + 1; only completion tokens carry a label
        targets = labels[:, 1:]
        mask = targets != -100
        stats = trainer._divergence_pass(policy_hidden[:, :-1][mask], ref_hidden[:, :-1][mask], targets[mask])
        per_position = TokenStatistics(*(x.new_zeros(mask.shape).masked_scatter(mask, x) for x in stats))
        self.chunks.append(per_position)
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
      the same model with the adapter disabled (or a frozen "ref" adapter copy of a pretrained adapter). With
      `use_liger_kernel=True` a callback gives the reference the Liger kernels `train()` gives the policy.
    - `_generate_and_score_completions`: switches off TRL's reference forward (DGPO's pass yields those log-probs)
      and applies the weights when they were computed at scoring time.
    - `_get_per_token_logps_and_entropies`: routes TRL's scoring-time policy forward, and the loss-time statistics,
      through DGPO's joint pass (`_JointPass`), which reuses TRL's own input building.
    - `_compute_loss`: marks the micro-batch whose weights are computed from the training forward.
    - `get_high_entropy_mask` (only with `top_entropy_quantile < 1`): moves each completion's weight onto the tokens
      TRL's high-entropy mask keeps, so the weights average 1 over the tokens that receive gradient.
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
        if needs_reference and peft_config is None and wrapped_peft_model:
            # A pretrained adapter: the reference is the initial policy, base model plus this adapter, kept as a frozen
            # "ref" adapter copy (what TRL does for beta != 0; TRL's __init__ sees beta = 0 below).
            model.add_adapter("ref", model.peft_config["default"])
            for name, param in model.named_parameters():
                if ".default." in name:
                    model.get_parameter(name.replace(".default.", ".ref.")).data.copy_(param.data)
        # A model passed as an object may differ from what its config's path holds (changed in memory, or built from
        # a config): its reference is a copy of it, taken before TRL patches its forward (a copy of a patched model
        # would keep calling the original's). A model passed as a path gets its reference from that path.
        reference = None
        if needs_reference and peft_config is None and not wrapped_peft_model and not isinstance(model, str):
            reference = frozen_copy(model)

        sync_reference = needs_reference and args.sync_ref_model
        if sync_reference and (peft_config is not None or wrapped_peft_model):
            raise NotImplementedError(
                "sync_ref_model=True is not supported with a PEFT model: the reference is the policy with its "
                "adapter disabled, so there is no separate reference to synchronize. Set sync_ref_model=False."
            )
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
        if needs_reference and not isinstance(self._policy(), PeftModel):
            if reference is None:
                reference = self._load_reference_model(given.get("quantization_config"))
            self.ref_model = self._prepare_reference_model(reference)
            if args.use_liger_kernel:
                self.add_callback(_ReferenceKernels(self))
        if sync_reference:
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        policy = _causal_lm(self._policy())
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

    def _load_reference_model(self, quantization_config):
        """The reference of a policy given as a path: loaded from it as `GRPOTrainer.__init__` loads its own."""
        model_init_kwargs = dict(self.args.model_init_kwargs or {})
        if quantization_config is not None:
            model_init_kwargs["quantization_config"] = quantization_config
        if self.args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
            model_init_kwargs["device_map"] = None
        model_init_kwargs.setdefault("trust_remote_code", self.args.trust_remote_code)
        model_init_kwargs.setdefault("dtype", self.model.dtype)
        model_init_kwargs.setdefault("attn_implementation", self.model.config._attn_implementation)
        return create_model_from_path(get_config_model_id(self.model.config), **model_init_kwargs)

    def _prepare_reference_model(self, ref_model):
        """Frozen, and prepared exactly as `GRPOTrainer.__init__` prepares its own reference for beta != 0 (with its
        fused LM head too, so TRL code that scores `ref_model` works on it; DGPO's pass does not use it)."""
        ref_model.requires_grad_(False)
        if self.args.disable_dropout:
            disable_dropout_in_model(ref_model)
        add_fused_lm_head(ref_model, temperature=self.temperature, cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32)
        if self.is_deepspeed_enabled:
            return prepare_deepspeed(ref_model, self.accelerator)
        if self.is_fsdp_enabled:
            return prepare_fsdp(ref_model, self.accelerator)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

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
        """The reference's last hidden states for a chunk of TRL-built model inputs.

        A full reference runs its own forward through its root module, so ZeRO-3 and FSDP gather what they shard, with
        `logits_to_keep=1` so its LM head projects one position only. With PEFT the policy's backbone runs with the
        adapter disabled (TRL's frozen "ref" adapter if present) and never through the `lm_head` module: under ZeRO-3
        that module call would corrupt the policy's next backward. The LM-head weights are used in `_divergence_pass`.
        """
        reference = self._reference()
        with torch.no_grad():
            if self.ref_model is not None:
                with _captured_hidden(_causal_lm(reference).base_model) as captured:
                    self.ref_model(**model_inputs, logits_to_keep=1, use_cache=False)
                return captured[0]
            with use_adapter(reference, adapter_name="ref" if "ref" in reference.peft_config else None):
                return _causal_lm(reference).base_model(**model_inputs, use_cache=False)[0]

    def _policy_hidden(self, model_inputs) -> torch.Tensor:
        """The policy's last hidden states for a chunk of TRL-built model inputs, from its backbone alone (no grad).

        The backbone is what TRL's fused LM head runs before projecting (`model.base_model`), with the same inputs.
        The policy's `lm_head` module is never called: under ZeRO-3 such a call before the training forward would
        corrupt its backward.
        """
        with torch.no_grad():
            return _causal_lm(self._policy()).base_model(**model_inputs, use_cache=False)[0]

    def _captured_policy_hidden(self):
        """Collects the policy backbone's last hidden states from the forwards run inside the block."""
        return _captured_hidden(_causal_lm(self._policy()).base_model)

    def _divergence_pass(self, policy_hidden, ref_hidden, labels) -> TokenStatistics:
        policy_head = _causal_lm(self._policy()).get_output_embeddings()
        ref_head = _causal_lm(self._reference()).get_output_embeddings()
        if self.args.cast_lm_head_to_fp32:
            policy_hidden, ref_hidden = policy_hidden.float(), ref_hidden.float()
        # Collective under ZeRO-3 (and FSDP2): every rank runs it once per chunk, whatever its number of tokens
        with maybe_gather_lm_head_ctx(policy_head.weight, policy_head.bias, ref_head.weight, ref_head.bias):
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
            # TRL asked for pi_old log-probs, and DGPO's pass gave them, with its statistics, for every row
            completion_ids = output["completion_ids"]
            rows = torch.arange(completion_ids.size(0), device=completion_ids.device)
            self._apply_token_weights(output, joint.completion_statistics(completion_ids.size(1)), rows)
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
        rows = self._rows_to_score(inputs["advantages"], subset_allowed=not multimodal)
        # A sharded model's forward is a collective: a rank with nothing to score still runs one (on row 0, discarded)
        forward_rows = rows if len(rows) or not self._collective_forwards else rows.new_zeros(1)
        joint = _JointPass(self, policy_hidden=torch.cat(captured, dim=0)[forward_rows])
        if len(forward_rows):
            super()._get_per_token_logps_and_entropies(
                joint, input_ids[forward_rows], attention_mask[forward_rows], logits_to_keep, **kwargs
            )
        stats = joint.completion_statistics(logits_to_keep)
        self._apply_token_weights(inputs, TokenStatistics(*(x[: len(rows)] for x in stats)), rows)
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

    def _rows_to_score(self, advantages: torch.Tensor, subset_allowed: bool) -> torch.Tensor:
        """Indices of the completions whose weights matter: those with A_i != 0 (TRL's KL term needs them all)."""
        if self.dgpo.skip_zero_advantage and self.beta == 0.0 and subset_allowed:
            return (advantages != 0).nonzero().squeeze(-1)
        return torch.arange(advantages.size(0), device=advantages.device)

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
        mask = inputs["completion_mask"]
        if "tool_mask" in inputs:
            mask = mask * inputs["tool_mask"]
        mask = mask.bool()
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
        if self.beta != 0.0:  # every row was scored (see `_rows_to_score`)
            inputs["ref_per_token_logps"] = stats.ref_logps
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
