"""How DGPO runs a model: through the module the engine prepared, dropout-free, with TRL's own fused LM head.

- `fused_forward` is TRL's forward (`model(..., labels=..., fused_lm_head=True)`, TRL's `add_fused_lm_head`): its
  label log-probs are TRL's own bit for bit, in every dtype and on both of TRL's head paths, because TRL's code
  computes them. DGPO takes every log-prob it hands TRL (pi_old at scoring time, the reference's when beta > 0) from
  it, and the last hidden states of the same forward for its own statistics.
- `backbone_forward` runs only the backbone (no LM-head projection), for the forwards whose hidden states are all
  DGPO needs.
- `eval_mode` and `training_noise`: DGPO's statistics compare two distributions that are equal at step 1; dropout in
  one of the forwards would make them differ by noise. `training_noise` names what makes a model's train-mode forward
  differ from its eval-mode one, so that DGPO knows when a train-mode forward's hidden states can serve.

Every forward goes through `root`, the module a normal forward of the model calls (the FSDP2 root, a DeepSpeed engine,
a PEFT wrapper, or the model), so the hooks its engine installed run as in a normal forward: FSDP2 unshards the root's
own parameters (the embedding among them) in its pre-forward hook, and ZeRO-3 traces the same module order.
"""

from __future__ import annotations

import re
from contextlib import contextmanager

import torch
from peft import PeftModel


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The `PreTrainedModel` under a PEFT wrapper (adapter layers included), or the (unwrapped) model itself."""
    # isinstance, not accelerate's is_peft_model: that one re-reads package metadata on every call (~0.5 ms)
    return model.get_base_model() if isinstance(model, PeftModel) else model


@contextmanager
def captured_hidden_states(model: torch.nn.Module):
    """Collects the last hidden states (detached) of `model`'s backbone from the forwards run inside the block."""
    captured = []
    backbone = causal_lm(model).base_model
    handle = backbone.register_forward_hook(lambda module, args, output: captured.append(output[0].detach()))
    try:
        yield captured
    finally:
        handle.remove()


def fused_forward(root: torch.nn.Module, model: torch.nn.Module, model_inputs: dict, labels: torch.Tensor):
    """TRL's fused-LM-head forward of `root` on `model_inputs` and `labels`: returns TRL's output (its `log_probs` are
    the labels' log-probs exactly as TRL computes its own) and the backbone's last hidden states (B, L, H) of that
    same forward. `model` is the unwrapped model under `root` (a `PreTrainedModel` or `PeftModel`)."""
    with captured_hidden_states(model) as captured:
        output = root(**model_inputs, labels=labels, fused_lm_head=True)
    return output, captured[-1]


def backbone_forward(root: torch.nn.Module, model: torch.nn.Module, model_inputs: dict) -> torch.Tensor:
    """The last hidden states (B, L, H) of `model`'s backbone on `model_inputs`, computed inside a forward of `root`
    without projecting the LM head. No grad.

    For one call, the causal LM's forward (the method TRL's fused LM head replaces) runs only the backbone, so every
    module from the root down to the causal LM runs with the hooks its engine installed; a backbone called on its own
    can meet sharded parameters under FSDP2, depending on what ran before. The LM-head module is never called (under
    ZeRO-3 a call of the policy's before its training forward corrupts the backward). The causal LM's own forward is
    restored afterwards, also when the call raises.
    """
    lm = causal_lm(model)
    backbone = lm.base_model

    def forward(*args, labels=None, **kwargs):  # `labels`: a PEFT wrapper passes them through
        return backbone(*args, **kwargs)[0]

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


@contextmanager
def eval_mode(module: torch.nn.Module):
    """`module` and every submodule in eval mode inside the block (no dropout); each one's own mode restored after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# Config fields that switch on randomness inside a module's forward in train mode without an `nn.Dropout` module: the
# attention's dropout probability (`attention_dropout`, read by most decoder attentions as
# `0.0 if not self.training else self.attention_dropout`), functional dropouts (`dropout`, `hidden_dropout`, ...) and
# MoE routers' jitter noise. GPT-style `*_pdrop` fields (and classifier/summary heads') configure `nn.Dropout` modules,
# which are checked themselves (TRL's `disable_dropout` zeroes them, not the config).
_NOISE_FIELD = re.compile(r"dropout|jitter")
_MODULE_BACKED_FIELD = re.compile(r"pdrop|^classifier|^summary")


def training_noise(model: torch.nn.Module) -> list[str]:
    """What makes a train-mode forward of `model` differ from an eval-mode one: `nn.Dropout` modules with p > 0 (LoRA
    dropout included) and config fields that enable dropout or noise inside modules (e.g. `attention_dropout=0.1`).
    Empty when a train-mode forward is deterministic, so its hidden states are the dropout-free ones."""
    found = []
    modules = [(name, m.p) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.dropout._DropoutNd)]
    active = [(name, p) for name, p in modules if p > 0]
    if active:
        # Named by their own attribute, e.g. "lora_dropout" for ...q_proj.lora_dropout.default
        labels = {next((part for part in reversed(name.split(".")) if "drop" in part), name) for name, _ in active}
        found.append(f"{len(active)} dropout modules ({', '.join(sorted(labels))}; p={max(p for _, p in active):g})")
    configs = [getattr(causal_lm(model), "config", None)]
    seen = set()
    while configs:
        config = configs.pop()
        if config is None or id(config) in seen:
            continue
        seen.add(id(config))
        for key, value in vars(config).items():
            if hasattr(value, "to_dict"):  # a sub-config (text, vision, ...)
                configs.append(value)
            elif (
                _NOISE_FIELD.search(key)
                and not _MODULE_BACKED_FIELD.search(key)
                and isinstance(value, (int, float))
                and not isinstance(value, bool)
                and value > 0
            ):
                found.append(f"config {key}={value:g}")
    return found


def training_noise_warning(noise: list[str]) -> str:
    """What DGPO tells a user whose policy has `training_noise`."""
    return (
        f"The policy's train-mode forward is not deterministic ({'; '.join(noise)}). TRL trains with it as "
        "configured; DGPO computes d_t and H_t from an extra dropout-free forward of the policy (no grad) per scored "
        "completion, so that dropout noise does not enter the token weights. Set those values to 0 (e.g. "
        "lora_dropout=0, disable_dropout=True, the config's attention_dropout=0) to save that forward."
    )
