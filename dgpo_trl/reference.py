"""DGPO's frozen reference model: the initial policy, in one of four forms, behind one small surface.

`FrozenReference` is what the trainer holds. Its forms, one constructor each:
- `FrozenReference.copy_of(model, ...)`: a copy of a model passed as an object (`frozen_copy`, taken before TRL patches
  the model), so a model changed in memory (an SFT or a merge before RL) is its own reference;
- `FrozenReference.load(path, ...)`: loaded from the policy's path, as `GRPOTrainer` loads its own for `beta > 0`;
- `FrozenReference.adapter_disabled(policy, root)`: a PEFT model trained from a fresh adapter (`peft_config`) is its
  own reference with the adapter disabled: no second model in memory;
- `FrozenReference.adapter_copy(policy, root)`: a `PeftModel` passed with a pretrained adapter keeps a frozen copy of
  that adapter beside it (the "ref" adapter, as TRL names its own), the base model plus that copy being the reference.

What the trainer asks of it: `hidden_states(inputs)` (the last hidden states, no LM-head projection),
`log_probs_and_hidden_states(inputs, labels)` (TRL's own label log-probs, for TRL's KL term when beta > 0, and the
hidden states of the same forward), `lm_head`, `answers(model)` (whether a call TRL makes with `model` is its reference
forward), and `excluded_adapters` (what a save leaves out). Every forward runs through the module its engine prepared,
in eval mode (a frozen reference has no dropout), without grad.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from contextlib import contextmanager, nullcontext

import torch
from accelerate.utils import DistributedType
from peft import PeftModel
from transformers import TrainerCallback
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, use_adapter

from .forwards import backbone_forward, causal_lm, eval_mode, fused_forward

# The name of the frozen adapter that holds the reference of a pretrained adapter (the name TRL gives its own)
REFERENCE_ADAPTER = "ref"


class FrozenReference:
    """DGPO's frozen reference. Build it with one of the constructors (see the module docstring).

    Args:
        model: the unwrapped model whose backbone and LM head are the reference's (for the PEFT forms, the policy's
            `PeftModel`).
        root: returns the module a forward goes through (the prepared reference, or the policy's current root: the
            trainer's model, which `Trainer.train()` wraps later).
        adapter: for the PEFT forms, the adapter active while the reference runs (`None`: adapters disabled).
        prepared: the prepared reference module of the separate-model forms (TRL's `ref_model`); `None` for PEFT.
    """

    _NO_ADAPTER = object()

    def __init__(self, model, root: Callable[[], torch.nn.Module], adapter=_NO_ADAPTER, prepared=None):
        self.model = model
        self._root = root
        self._adapter = adapter
        self.prepared = prepared
        self._released_adapter: dict[str, torch.Tensor] | None = None

    # -- constructors ------------------------------------------------------------------------------------------------

    @classmethod
    def copy_of(cls, model: torch.nn.Module, accelerator, args, temperature: float) -> FrozenReference:
        """The reference of a model passed as an object: `model` is the copy `frozen_copy` took before TRL patched
        the policy; prepared here like TRL prepares its own reference."""
        prepared = prepare_reference_model(model, accelerator, args, temperature)
        return cls(model, root=lambda: prepared, prepared=prepared)

    @classmethod
    def load(cls, policy: torch.nn.Module, accelerator, args, temperature: float, quantization_config=None):
        """The reference of a policy given as a path: loaded from that path as `GRPOTrainer.__init__` loads its own."""
        model = load_reference_model(policy, args, quantization_config)
        return cls.copy_of(model, accelerator, args, temperature)

    @classmethod
    def adapter_disabled(cls, policy: PeftModel, root: Callable[[], torch.nn.Module]) -> FrozenReference:
        """A fresh adapter: the reference is the policy with its adapters disabled."""
        return cls(policy, root, adapter=None)

    @classmethod
    def adapter_copy(cls, policy: PeftModel, root: Callable[[], torch.nn.Module]) -> FrozenReference:
        """A pretrained adapter: the reference is the base model plus a frozen copy of it, `REFERENCE_ADAPTER`."""
        add_reference_adapter(policy)
        return cls(policy, root, adapter=REFERENCE_ADAPTER)

    @classmethod
    def for_policy(
        cls,
        policy,
        root,
        *,
        copied,
        pretrained_adapter: bool,
        accelerator,
        args,
        temperature: float,
        quantization_config=None,
    ) -> FrozenReference:
        """The form that follows from what the user passed: a PEFT policy is its own reference (a pretrained adapter
        passed in a `PeftModel` gets a frozen copy of it); a full model passed as an object has its `copied` copy;
        a full model passed as a path is loaded from that path."""
        if isinstance(policy, PeftModel):
            return cls.adapter_copy(policy, root) if pretrained_adapter else cls.adapter_disabled(policy, root)
        if copied is not None:
            return cls.copy_of(copied, accelerator, args, temperature)
        return cls.load(policy, accelerator, args, temperature, quantization_config)

    # -- what the trainer asks -----------------------------------------------------------------------------------

    @property
    def uses_policy(self) -> bool:
        """Whether the reference is the policy itself under an adapter setting (the PEFT forms)."""
        return self._adapter is not self._NO_ADAPTER

    @property
    def lm_head(self) -> torch.nn.Module:
        return causal_lm(self.model).get_output_embeddings()

    @property
    def excluded_adapters(self) -> tuple[str, ...]:
        """The adapters that belong to DGPO, not to the user: saves leave them out."""
        return (REFERENCE_ADAPTER,) if self._adapter == REFERENCE_ADAPTER else ()

    @contextmanager
    def saved_without_it(self):
        """Inside the block, `save_pretrained` of the policy writes the trained adapters only: DGPO's frozen reference
        adapter is not something the user trains."""
        policy = self.model
        if not self.excluded_adapters or not set(self.excluded_adapters) & set(policy.peft_config):
            yield
            return
        adapters = [name for name in policy.peft_config if name not in self.excluded_adapters]
        policy.save_pretrained = functools.partial(policy.save_pretrained, selected_adapters=adapters)
        try:
            yield
        finally:
            del policy.save_pretrained

    def hidden_states(self, model_inputs: dict) -> torch.Tensor:
        """The reference's last hidden states (B, L, H) for TRL-built model inputs; no LM-head projection."""
        with self._running() as root:
            return backbone_forward(root, self.model, model_inputs)

    def log_probs_and_hidden_states(self, model_inputs: dict, labels: torch.Tensor):
        """TRL's label log-probs of the reference (its fused LM head, as TRL scores its own reference) and the last
        hidden states of the same forward."""
        with self._running() as root, torch.no_grad():
            output, hidden = fused_forward(root, self.model, model_inputs, labels)
        return output.log_probs, hidden

    def answers(self, model: torch.nn.Module, unwrap: Callable) -> bool:
        """Whether TRL's call of `_get_per_token_logps_and_entropies` with `model` is its reference forward: with the
        prepared reference, or with the policy while the reference's adapter setting is active (TRL's
        `use_adapter`)."""
        if not self.uses_policy:
            return model is self.prepared
        policy = unwrap(model)
        if not isinstance(policy, PeftModel) or policy is not self.model:
            return False
        if self._adapter is None:
            return policy._adapters_disabled
        return policy.active_adapter == self._adapter

    def release(self, sharded: bool) -> None:
        """Leaves the user's `PeftModel` as GRPOTrainer would (after `train()`): without the reference adapter. Its
        weights are kept here and put back on the next use. Under a sharding engine the model stays as it is."""
        if self._adapter != REFERENCE_ADAPTER or sharded or REFERENCE_ADAPTER not in self.model.peft_config:
            return
        part = f".{REFERENCE_ADAPTER}."
        self._released_adapter = {
            name: param.detach().clone() for name, param in self.model.named_parameters() if part in name
        }
        self._released_config = self.model.peft_config[REFERENCE_ADAPTER]
        self.model.delete_adapter(REFERENCE_ADAPTER)

    def _restore(self) -> None:
        if self._released_adapter is None:
            return
        trained = self.model.active_adapter
        self.model.add_adapter(REFERENCE_ADAPTER, self._released_config)
        self.model.set_adapter(trained)
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self._released_adapter:
                    param.copy_(self._released_adapter[name])
                    param.requires_grad_(False)
        self._released_adapter = None

    @contextmanager
    def _running(self):
        """The reference's root, in eval mode (no dropout), under its adapter setting."""
        self._restore()
        root = self._root()
        with (
            use_adapter(self.model, adapter_name=self._adapter) if self.uses_policy else nullcontext(),
            eval_mode(root),
        ):
            yield root


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
            "DGPO scores tokens against a frozen copy of the model passed to the trainer, but a quantized model cannot"
            " be copied. Pass a `peft_config` (the reference is then the same model with its adapter disabled, as in"
            " QLoRA), or pass the model's path as a string with `quantization_config` so the reference is loaded from"
            " it."
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
    buffers, copied_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    for kind, names, copy_names in (("parameters", params, copies), ("buffers", buffers, copied_buffers)):
        if names.keys() != copy_names.keys():
            missing, extra = sorted(names.keys() - copy_names.keys()), sorted(copy_names.keys() - names.keys())
            raise RuntimeError(
                f"Copying {type(model).__name__} for DGPO's reference gave other {kind} than the model's (built from "
                f"its config: missing {missing[:5]}, unexpected {extra[:5]}). Pass the model's path as a string "
                "instead."
            )
    for name, param in params.items():
        with (
            deepspeed.zero.GatheredParameters([param]),
            deepspeed.zero.GatheredParameters([copies[name]], modifier_rank=0),
        ):
            if rank == 0:
                copies[name].data.copy_(param.data)
    for name, buffer in buffers.items():
        copied_buffers[name].data.copy_(buffer.data)
    return reference


def check_reference_adapter(model) -> None:
    """Refuses a `PeftModel` whose active adapter has the name DGPO gives its reference adapter (before anything
    touches the model)."""
    if isinstance(model, PeftModel) and model.active_adapter == REFERENCE_ADAPTER:
        raise ValueError(
            f"The PeftModel's active adapter is named {REFERENCE_ADAPTER!r}, the name DGPO gives the frozen copy of "
            "the adapter that serves as its reference. Give the adapter you train another name."
        )


def add_reference_adapter(model: PeftModel) -> None:
    """Keeps the initial policy of a pretrained adapter as a frozen adapter, `REFERENCE_ADAPTER`, beside it.

    The reference of a `PeftModel` passed in is the base model plus its active adapter as passed. A model that already
    carries the reference adapter (e.g. left by a trainer under a sharding engine) gets it refreshed from the active
    adapter as it is now, as a full model passed as an object gets a fresh copy.
    """
    check_reference_adapter(model)
    trained = model.active_adapter
    if REFERENCE_ADAPTER in model.peft_config:
        model.delete_adapter(REFERENCE_ADAPTER)
    model.add_adapter(REFERENCE_ADAPTER, copy.deepcopy(model.peft_config[trained]))
    model.set_adapter(trained)  # add_adapter may leave another adapter active; the trained one stays the active one
    trained_part, reference_part = f".{trained}.", f".{REFERENCE_ADAPTER}."
    with torch.no_grad():
        for name, param in model.named_parameters():
            if trained_part in name:
                model.get_parameter(name.replace(trained_part, reference_part)).copy_(param)
    for name, param in model.named_parameters():
        if reference_part in name:
            param.requires_grad_(False)


def load_reference_model(policy: torch.nn.Module, args, quantization_config=None) -> torch.nn.Module:
    """The reference of a policy given as a path: loaded from it as `GRPOTrainer.__init__` loads its own."""
    from trl.trainer.utils import get_config_model_id

    model_init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        model_init_kwargs["device_map"] = None
    model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    model_init_kwargs.setdefault("dtype", policy.dtype)
    model_init_kwargs.setdefault("attn_implementation", policy.config._attn_implementation)
    return create_model_from_path(get_config_model_id(policy.config), **model_init_kwargs)


def prepare_reference_model(ref_model: torch.nn.Module, accelerator, args, temperature: float) -> torch.nn.Module:
    """Frozen, and prepared as `GRPOTrainer.__init__` prepares its own reference for beta != 0, with TRL's fused LM
    head (DGPO takes the reference's log-probs from it when beta > 0).

    One difference: under FSDP2 TRL shards its reference as a single unit (`trl.models.prepare_fsdp`), so each of its
    forwards gathers the whole model on every rank at once. DGPO's reference is sharded like the policy instead, one
    unit per decoder layer (the launch's auto-wrap policy) under the root, so a forward gathers one layer at a time.
    """
    ref_model.requires_grad_(False)
    if args.disable_dropout:
        disable_dropout_in_model(ref_model)
    if args.cast_lm_head_to_fp32:
        cast_lm_head_to_fp32(ref_model)
    add_fused_lm_head(ref_model, temperature=temperature, cast_lm_head_to_fp32=args.cast_lm_head_to_fp32)
    engine = accelerator.distributed_type
    if engine == DistributedType.DEEPSPEED:
        return prepare_deepspeed(ref_model, accelerator)
    if engine == DistributedType.FSDP:
        plugin = accelerator.state.fsdp_plugin
        if plugin.fsdp_version == 2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up

            plugin.set_auto_wrap_policy(ref_model)  # as accelerate does before sharding the policy
            wraps = fsdp2_prepare_auto_wrap_policy(plugin, ref_model)
            for module in get_module_children_bottom_up(ref_model)[:-1] if wraps is not None else ():
                if wraps(module):
                    prepare_fsdp(module, accelerator)
        return prepare_fsdp(ref_model, accelerator)
    return accelerator.prepare_model(ref_model, evaluation_mode=True)


def cast_lm_head_to_fp32(model: torch.nn.Module) -> None:
    """What `GRPOTrainer.__init__` does to the policy's (and its own reference's) LM head for `cast_lm_head_to_fp32`:
    the head's weights in float32, a head call in float32, and with tied embeddings the embedding's output cast back to
    the model's dtype. The reference's head is then what the policy's is (the same values: an exact upcast), so TRL's
    fused head, which reads the weight in float32 under that option, scores either model."""
    head = model.get_output_embeddings()
    dtype = head.weight.dtype
    head.float()
    head.forward = lambda hidden: torch.nn.functional.linear(
        hidden.float(), head.weight.float(), None if head.bias is None else head.bias.float()
    )
    if model.config.get_text_config().tie_word_embeddings:
        model.get_input_embeddings().register_forward_hook(lambda module, args, output: output.to(dtype))


class ReferenceKernels(TrainerCallback):
    """Gives DGPO's reference the Liger kernels `Trainer.train()` applies to the policy when `use_liger_kernel=True`.

    transformers patches the policy at the start of `train()`, just before `on_train_begin`; a reference with the
    standard kernels would differ from the policy by kernel numerics alone (d_t > 0 before any update).
    """

    def __init__(self, reference: FrozenReference):
        self.reference = reference

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(self.reference.model, args.liger_kernel_config)
