"""DGPO where users train: bf16 (weights or autocast), dropout, and TRL's GPU head path, on CPU.

- bf16: the log-probs DGPO hands TRL (pi_old at scoring time, the reference's when beta > 0) are TRL's own, bit for
  bit, so the PPO ratio on the first micro-step after a generation is exactly 1 and TRL's `kl` at step 1 is exactly 0,
  as with GRPOTrainer. Checked on a model whose logits exceed 15 (a random tiny model's are ~1, which hides rounding).
- dropout: at step 1 pi_theta == pi_ref, so every token's divergence is exactly 0 whatever dropout the model has
  (`nn.Dropout` modules, a config's `attention_dropout`, LoRA dropout); TRL's training forward keeps the dropout.
- compact: TRL projects only the labelled positions where Triton runs (GPUs) and every position on CPU; switched to
  its GPU path here (`trl_head.compact_lm_head`), DGPO trains exactly as on the every-position path and its weights
  match a float64 recomputation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import cpu_args
from test_architectures import _expected, _log_probs
from trl import GRPOConfig, GRPOTrainer
from trl_head import compact_lm_head

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.tasks import reversal_dataset
from dgpo_trl.tiny import build_tiny_model, build_tokenizer

REGIMES = {
    "fp32": {},
    "bf16_weights": {"model_init_kwargs": {"dtype": "bfloat16"}},
    # accelerate runs bf16 autocast on CPU only with use_cpu=True
    "bf16_autocast": {"bf16": True, "use_cpu": True},
}
HEAD_PATHS = ("every_position", "compact")


def digit_fraction_reward(completions, **kwargs):
    """Varies between a random model's completions, so most groups have nonzero advantages."""
    return [sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions]


def history(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def head_path(name):
    return compact_lm_head() if name == "compact" else _no_switch()


class _no_switch:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.fixture(scope="module")
def sharp_model_path(tmp_path_factory):
    """A tiny Llama whose random weights are 30x the usual std: its logits reach beyond 15, like a real LLM's."""
    from transformers import AutoModelForCausalLM

    path = build_tiny_model(tmp_path_factory.mktemp("sharp") / "model", hidden_size=64, num_layers=2, seed=0,
                            initializer_range=0.6)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(path)
    ids = torch.tensor([list(range(4, 40))])
    with torch.no_grad():
        assert model(input_ids=ids).logits.abs().max() > 15
    return path


def _first_micro_step_log_ratios(trainer):
    """Runs `trainer.train()` and returns, for each generation batch, max |log pi_theta - old_per_token_logps| over
    the valid tokens of its first micro-batch, with pi_theta computed by TRL's own method on the model as it is then
    (no optimizer step has happened since generation, so GRPO's ratio is exactly 1 there)."""
    ratios = []
    compute_loss = trainer._compute_loss

    def spy(model, inputs):
        if trainer._step % trainer.args.steps_per_generation == 0:
            ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
            mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
            with torch.no_grad():
                logps, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(
                    trainer, model, ids, mask, inputs["completion_ids"].size(1)
                )
            valid = inputs["completion_mask"].bool()
            ratios.append((logps - inputs["old_per_token_logps"])[valid].abs().max().item())
        return compute_loss(model, inputs)

    trainer._compute_loss = spy
    trainer.train()
    return ratios


@pytest.mark.parametrize("path", HEAD_PATHS)
@pytest.mark.parametrize("regime", list(REGIMES))
@pytest.mark.parametrize("trainer_cls", [DGPOTrainer, GRPOTrainer], ids=["DGPO", "GRPO"])
def test_bf16_first_micro_step_ratio_is_exactly_one(sharp_model_path, tmp_path, trainer_cls, regime, path):
    """steps_per_generation=2: TRL scores pi_old at generation time; on the first micro-step no update has happened.
    Before DGPO handed TRL its own label log-probs (fp32 logit tiles), bf16 gave 3.6e-2 (bf16 weights) and 7.6e-2
    (autocast) here, where TRL rounds each logit tile to bf16."""
    config_cls = DGPOConfig if trainer_cls is DGPOTrainer else GRPOConfig
    args = config_cls(**cpu_args(
        tmp_path, steps_per_generation=2, max_steps=4, per_device_train_batch_size=16, num_generations=4,
        **REGIMES[regime],
    ))  # fmt: skip
    trainer = trainer_cls(
        sharp_model_path, digit_fraction_reward, args=args, train_dataset=reversal_dataset(64, seed=3)
    )
    with head_path(path):
        ratios = _first_micro_step_log_ratios(trainer)
    assert len(ratios) == 2
    assert ratios == [0.0, 0.0], ratios
    if trainer_cls is DGPOTrainer:
        assert history(trainer, "dgpo/divergence/max")[0] == 0.0


@pytest.mark.parametrize("regime", ["bf16_weights", "bf16_autocast"])
def test_bf16_kl_is_zero_at_step_one(sharp_model_path, tmp_path, regime):
    """beta=0.04: TRL's KL term uses the reference log-probs DGPO hands it. At step 1 pi_theta == pi_ref, so TRL's
    logged `kl` is exactly 0, as with GRPOTrainer (before: 5.6e-5 with bf16 weights, 1.0e-4 under autocast)."""
    logged = {}
    for trainer_cls, config_cls in ((GRPOTrainer, GRPOConfig), (DGPOTrainer, DGPOConfig)):
        args = config_cls(**cpu_args(
            tmp_path / trainer_cls.__name__, beta=0.04, max_steps=1, per_device_train_batch_size=16,
            num_generations=4, **REGIMES[regime],
        ))  # fmt: skip
        trainer = trainer_cls(sharp_model_path, digit_fraction_reward, args=args,
                              train_dataset=reversal_dataset(64, seed=3))  # fmt: skip
        trainer.train()
        logged[trainer_cls.__name__] = history(trainer, "kl")
    assert logged == {"GRPOTrainer": [0.0], "DGPOTrainer": [0.0]}


# --------------------------------------------------------------------------------------------------------------------
# Dropout


def _gpt2_path(path):
    """A tiny GPT-2: dropout in `nn.Dropout` modules (0.1 each: embeddings, attention, residual), tied head."""
    import transformers

    tokenizer = build_tokenizer()
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    assert config.attn_pdrop == config.resid_pdrop == config.embd_pdrop == 0.1
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _attention_dropout_path(path):
    """A tiny Llama with `attention_dropout=0.3` in its config: a float the attention reads in train mode, not an
    `nn.Dropout` module, so TRL's `disable_dropout=True` leaves it on."""
    from transformers import AutoConfig

    path = build_tiny_model(path, hidden_size=64, num_layers=2, seed=0)
    config = AutoConfig.from_pretrained(path)
    config.attention_dropout = 0.3
    config.save_pretrained(path)
    return path


def _pretrained_adapter(path, lora_dropout):
    """A `PeftModel` with a pretrained (nonzero) LoRA adapter and LoRA dropout: DGPO's reference is a frozen copy of
    that adapter, so at step 1 the policy equals the reference and only dropout could tell them apart."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(path, hidden_size=64, num_layers=2, seed=0))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=lora_dropout,
                        task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return peft_model


DROPOUT_KINDS = ("nn_dropout", "attention_dropout", "lora_dropout")
DGPO_PATHS = {"loss_time": {}, "scoring_time": {"steps_per_generation": 2, "gradient_accumulation_steps": 1}}


@pytest.mark.parametrize("path_name", list(DGPO_PATHS))
@pytest.mark.parametrize("kind", DROPOUT_KINDS)
def test_dropout_leaves_step_one_divergence_at_zero(tmp_path, kind, path_name):
    """Before, the policy's statistics came from a train-mode forward with dropout and the reference's without:
    step-1 `dgpo/divergence/max` read 1.8e-3 (GPT-2) and 1.1e-3 (attention_dropout=0.3) here. TRL's training forward
    keeps the dropout the user asked for: a dropout module or the attention runs in train mode during it."""
    from transformers import PreTrainedTokenizerFast

    overrides = dict(max_steps=1, per_device_train_batch_size=16, num_generations=4, **DGPO_PATHS[path_name])
    if kind == "nn_dropout":
        model = _gpt2_path(tmp_path / "gpt2")
    elif kind == "attention_dropout":
        model = _attention_dropout_path(tmp_path / "llama")
        overrides["disable_dropout"] = True  # zeroes nn.Dropout modules only
    else:
        model = _pretrained_adapter(tmp_path / "llama", lora_dropout=0.1)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path / ("gpt2" if kind == "nn_dropout" else "llama"))
    trainer = DGPOTrainer(model, digit_fraction_reward, args=DGPOConfig(**cpu_args(tmp_path / "out", **overrides)),
                          train_dataset=reversal_dataset(64, seed=3), processing_class=tokenizer)  # fmt: skip
    # Dropout applied in TRL's training forward (with grad): a module that drops in train mode runs in train mode
    policy = trainer.accelerator.unwrap_model(trainer.model)
    dropping = [m for m in policy.modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
    if kind == "attention_dropout":
        dropping = [m for m in policy.modules() if getattr(m, "attention_dropout", 0) > 0]
    assert dropping
    in_training_forward = []
    hooks = [m.register_forward_hook(lambda module, *_: in_training_forward.append(
        module.training and torch.is_grad_enabled())) for m in dropping]  # fmt: skip
    trainer.train()
    for hook in hooks:
        hook.remove()
    assert any(in_training_forward)
    assert history(trainer, "dgpo/divergence/max") == [0.0]
    assert history(trainer, "dgpo/weight/max") == [1.0]


# --------------------------------------------------------------------------------------------------------------------
# TRL's GPU head path


def _trained_parameters(path, tmp_path, head, peft_config, **overrides):
    args = DGPOConfig(**cpu_args(
        tmp_path, max_steps=2, per_device_train_batch_size=16, num_generations=4, learning_rate=1e-2,
        lr_scheduler_type="constant", temperature=0.7, dgpo_tau=0.02, **overrides,
    ))  # fmt: skip
    trainer = DGPOTrainer(path, digit_fraction_reward, args=args, train_dataset=reversal_dataset(64, seed=3),
                          peft_config=peft_config)  # fmt: skip
    trainer.num_completions_to_show = 10**6
    with head_path(head):
        trainer.train()
    params = {name: param.detach().clone() for name, param in trainer.model.named_parameters() if param.requires_grad}
    return trainer, params


@pytest.mark.parametrize("path_name", list(DGPO_PATHS))
@pytest.mark.parametrize("peft", [False, True], ids=["full", "lora"])
def test_compact_head_path_trains_exactly_like_every_position(tiny_model_path, tmp_path, peft, path_name):
    """Two steps on each head path: the same parameters (to float32 rounding); then a fresh batch's weights on the
    compact path against a float64 recomputation from the two models' own forwards."""
    from peft import LoraConfig

    peft_config = (
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, task_type="CAUSAL_LM")
        if peft
        else None
    )
    overrides = DGPO_PATHS[path_name]
    runs = {head: _trained_parameters(tiny_model_path, tmp_path / head, head, peft_config, **overrides)
            for head in HEAD_PATHS}  # fmt: skip
    assert runs["compact"][1].keys() == runs["every_position"][1].keys()
    for name, value in runs["every_position"][1].items():
        # The forward values agree bit for bit (the ratio tests above); TRL's backward accumulates the LM head's
        # gradient over other matrix shapes on the two paths, so the parameters agree to float32 rounding: 6.4e-6
        # here after two steps at lr 1e-2, as GRPOTrainer's own two paths (6.5e-6)
        torch.testing.assert_close(runs["compact"][1][name], value, rtol=0, atol=2e-5, msg=name)
    trainer = runs["compact"][0]

    batch = [reversal_dataset(4, seed=11)[i // 4] for i in range(16)]
    applied = []
    apply = trainer._apply_token_weights
    trainer._apply_token_weights = lambda inputs, stats, rows: applied.append((rows.clone(), stats)) or apply(
        inputs, stats, rows)  # fmt: skip
    with compact_lm_head():
        output = trainer._generate_and_score_completions(batch)
        if not applied:  # loss time: the training forward provides the statistics
            trainer._compute_loss(trainer.model, output)
    ((rows, stats),) = applied
    policy = trainer.accelerator.unwrap_model(trainer.model)
    ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
    attention = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
    width = output["completion_ids"].size(1)
    mask = output["completion_mask"].bool()
    policy.eval()  # LoRA dropout off for the recomputation
    if peft:
        log_p = _log_probs(policy, ids, attention, width)
        with policy.disable_adapter():
            log_q = _log_probs(policy, ids, attention, width)
    else:
        log_p = _log_probs(policy, ids, attention, width)
        log_q = _log_probs(trainer.accelerator.unwrap_model(trainer.ref_model), ids, attention, width)
    hellinger, entropy, weights = _expected(log_p, log_q, mask, trainer.dgpo.tau, trainer.dgpo.kappa)
    valid = mask[rows]
    assert hellinger[rows][valid].max() > 1e-4, "the policy did not move away from the reference"
    torch.testing.assert_close(stats.hellinger[valid].double(), hellinger[rows][valid], atol=2e-6, rtol=0)
    torch.testing.assert_close(stats.entropy[valid].double(), entropy[rows][valid], rtol=1e-6, atol=0)
    torch.testing.assert_close(trainer.last_token_weights["weights"][valid].double(), weights[rows][valid],
                               rtol=1e-4, atol=0)  # fmt: skip
