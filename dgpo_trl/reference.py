"""DGPO's frozen reference model: where it comes from, how it is prepared for the engine, and how both models are run
to last hidden states.

The reference is the initial policy, frozen:
- a model passed as a path gets a reference loaded from that path, as `GRPOTrainer` loads its own for `beta > 0`;
- a model passed as an object gets a copy of itself as passed (`frozen_copy`), so a model changed in memory (an SFT or
  a merge before RL) is its own reference;
- a PEFT model is its own reference with the adapter disabled (`peft_config`, a fresh adapter), or, for a pretrained
  adapter passed in a `PeftModel`, with a frozen copy of that adapter (`add_reference_adapter`).

Every forward DGPO runs goes through the module the engine prepared, as a normal forward does (`backbone_forward`):
FSDP2 unshards a module's own parameters in its pre-forward hook, so calling a submodule such as the backbone directly
can meet sharded parameters, depending on what ran before.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from peft import PeftModel

from transformers import TrainerCallback
from trl.models import prepare_deepspeed, prepare_fsdp
from trl.trainer.utils import add_fused_lm_head, create_model_from_path, disable_dropout_in_model, get_config_model_id


# The name of the frozen adapter that holds the reference of a pretrained adapter (the name TRL gives its own)
REFERENCE_ADAPTER = "ref"


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The `PreTrainedModel` under a PEFT wrapper (adapter layers included), or the (unwrapped) model itself."""
    # isinstance, not accelerate's is_peft_model: that one re-reads package metadata on every call (~0.5 ms)
    return model.get_base_model() if isinstance(model, PeftModel) else model


def backbone_forward(root: torch.nn.Module, model: torch.nn.Module, model_inputs: dict, head=None):
    """Runs `model`'s backbone on `model_inputs` inside a forward of `root`, and returns `head(last hidden states)`,
    computed inside that forward too (the last hidden states themselves when `head` is None). No grad.

    `root` is the module a normal forward of the model calls (the FSDP2 root, a DeepSpeed engine, or the model), and
    `model` the model under it (a `PreTrainedModel` or `PeftModel`). For one call, the causal LM's forward (the method
    TRL's fused LM head replaces) runs the backbone and `head` instead, so every module from the root down to the
    causal LM runs with the hooks its engine installed, as in a normal forward: FSDP2 unshards the root's own
    parameters (the embedding among them) and ZeRO-3 traces the same module order; a backbone called on its own can
    meet sharded parameters, depending on what ran before. The LM-head module is never called (under ZeRO-3 a call of
    the policy's before its training forward corrupts the backward); a `head` that reads the LM-head weights reads them
    where TRL's fused head does, inside the causal LM's forward (ZeRO-3 registers them there as that module's
    parameters). The causal LM's own forward is restored afterwards, also when the call raises.
    """
    lm = causal_lm(model)
    backbone = lm.base_model

    def forward(*args, labels=None, **kwargs):  # `labels`: a PEFT wrapper passes them through
        hidden = backbone(*args, **kwargs)[0]
        return hidden if head is None else head(hidden)

    patched = vars(lm).get("forward")  # TRL's fused LM head is itself an instance attribute `forward`
    lm.forward = forward
    try:
        with torch.no_grad():
            return root(**model_inputs, use_cache=False)
    finally:
        if patched is None:
            del lm.forward
        else:
            lm.forward = patched


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
        with deepspeed.zero.GatheredParameters([param]), deepspeed.zero.GatheredParameters(
            [copies[name]], modifier_rank=0
        ):
            if rank == 0:
                copies[name].data.copy_(param.data)
    for name, buffer in buffers.items():
        copied_buffers[name].data.copy_(buffer.data)
    return reference


def add_reference_adapter(model: PeftModel) -> None:
    """Keeps the initial policy of a pretrained adapter as a frozen adapter, `REFERENCE_ADAPTER`, beside it.

    The reference of a `PeftModel` passed in is the base model plus its active adapter as passed. A model that already
    carries the reference adapter (a second trainer on the same model, e.g. a notebook cell run twice) gets it
    refreshed from the active adapter as it is now, as a full model passed as an object gets a fresh copy.
    """
    trained = model.active_adapter
    if trained == REFERENCE_ADAPTER:
        raise ValueError(
            f"The PeftModel's active adapter is named {REFERENCE_ADAPTER!r}, the name DGPO gives the frozen copy of "
            "the adapter that serves as its reference. Give the adapter you train another name."
        )
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


def trained_adapters(model: torch.nn.Module) -> list[str] | None:
    """The adapters a save should write: all but DGPO's frozen reference adapter (`None`: not a PEFT model)."""
    if not isinstance(model, PeftModel):
        return None
    return [name for name in model.peft_config if name != REFERENCE_ADAPTER]


def load_reference_model(trainer, quantization_config=None) -> torch.nn.Module:
    """The reference of a policy given as a path: loaded from it as `GRPOTrainer.__init__` loads its own."""
    args = trainer.args
    model_init_kwargs = dict(args.model_init_kwargs or {})
    if quantization_config is not None:
        model_init_kwargs["quantization_config"] = quantization_config
    if args.distributed_state.distributed_type in ["MULTI_GPU", "DEEPSPEED"]:
        model_init_kwargs["device_map"] = None
    model_init_kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    model_init_kwargs.setdefault("dtype", trainer.model.dtype)
    model_init_kwargs.setdefault("attn_implementation", trainer.model.config._attn_implementation)
    return create_model_from_path(get_config_model_id(trainer.model.config), **model_init_kwargs)


def prepare_reference_model(trainer, ref_model: torch.nn.Module) -> torch.nn.Module:
    """Frozen, and prepared as `GRPOTrainer.__init__` prepares its own reference for beta != 0 (with TRL's fused LM
    head too, so TRL code that scores `ref_model` works on it; DGPO's pass does not use it).

    One difference: under FSDP2 TRL shards its reference as a single unit (`trl.models.prepare_fsdp`), so each of its
    forwards gathers the whole model on every rank at once. DGPO's reference is sharded like the policy instead, one
    unit per decoder layer (the launch's auto-wrap policy) under the root, so a forward gathers one layer at a time.
    """
    ref_model.requires_grad_(False)
    if trainer.args.disable_dropout:
        disable_dropout_in_model(ref_model)
    if trainer.args.cast_lm_head_to_fp32:
        cast_lm_head_to_fp32(ref_model)
    cast = trainer.args.cast_lm_head_to_fp32
    add_fused_lm_head(ref_model, temperature=trainer.temperature, cast_lm_head_to_fp32=cast)
    accelerator = trainer.accelerator
    if trainer.is_deepspeed_enabled:
        return prepare_deepspeed(ref_model, accelerator)
    if trainer.is_fsdp_enabled:
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

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        from transformers.integrations.liger import apply_liger_kernel

        apply_liger_kernel(self.trainer._reference(), args.liger_kernel_config)


@contextmanager
def captured_hidden_states(backbone: torch.nn.Module):
    """Collects `backbone`'s last hidden states (detached) from the forwards run inside the block."""
    captured = []
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()
