"""DGPO's reference model and its forwards (`dgpo_trl.reference`): a reused PEFT model, what a save writes, rows with
nothing to score, bf16 heads, the partitioned copy, and the forward routed through the model's root."""

import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import cpu_args
from toolkit_fixtures import length_reward

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.forwards import backbone_forward, causal_lm
from dgpo_trl.reference import REFERENCE_ADAPTER
from dgpo_trl.tasks import exact_match_reward

ROOT = Path(__file__).resolve().parents[1]


def history(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def pretrained_adapter(model_path):
    """A PeftModel whose adapter is not the identity (B != 0), as a user's pretrained adapter is."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora)


def adapter_state(model, adapter):
    return {
        name.replace(f".{adapter}.", "."): param.detach().clone()
        for name, param in model.named_parameters()
        if f".{adapter}." in name
    }


def test_a_refused_peft_model_is_left_as_it_was(warm_model_path, reversal_train_dataset, tmp_path):
    model = pretrained_adapter(warm_model_path)
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    args = DGPOConfig(**cpu_args(tmp_path, sync_ref_model=True))
    with pytest.raises(NotImplementedError, match="sync_ref_model=True is not supported with a PEFT model"):
        DGPOTrainer(model, exact_match_reward, args=args, train_dataset=reversal_train_dataset)
    assert list(model.peft_config) == ["default"]  # no reference adapter left behind
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(torch.equal(after[name], before[name]) for name in before)


def test_two_trainers_in_a_row_on_one_peft_model(warm_model_path, reversal_train_dataset, tmp_path):
    """A notebook cell run twice: each trainer's reference is the model as passed to it (the second one's is the
    adapter the first one trained), so each starts with d = 0 and moves away from it."""
    model = pretrained_adapter(warm_model_path)
    for run in ("first", "second"):
        passed = adapter_state(model, "default")
        args = DGPOConfig(**cpu_args(tmp_path / run, max_steps=2, learning_rate=3e-3, dgpo_skip_zero_advantage=False))
        trainer = DGPOTrainer(model, length_reward, args=args, train_dataset=reversal_train_dataset)
        assert sorted(model.peft_config) == ["default", REFERENCE_ADAPTER] and model.active_adapter == "default"
        reference = adapter_state(model, REFERENCE_ADAPTER)
        assert reference.keys() == passed.keys()
        assert all(torch.equal(reference[name], passed[name]) for name in passed), run
        assert not any(p.requires_grad for n, p in model.named_parameters() if f".{REFERENCE_ADAPTER}." in n)
        trainer.train()
        divergence = history(trainer, "dgpo/divergence/max")
        assert divergence[0] == 0.0 and divergence[-1] > 0.0, (run, divergence)
        trained = adapter_state(model, "default")
        assert any(not torch.equal(trained[name], passed[name]) for name in passed), run
        # After training the model holds what GRPOTrainer leaves: the trained adapter only
        assert sorted(model.peft_config) == ["default"], run


def test_saves_and_resume_leave_the_reference_adapter_out(warm_model_path, reversal_train_dataset, tmp_path):
    """Checkpoints and `save_model` write the adapter the user trains, not DGPO's frozen reference copy (a Hub push
    writes what `save_model` writes); resuming from such a checkpoint reproduces the uninterrupted run."""
    from safetensors.torch import load_file

    initial = pretrained_adapter(warm_model_path)
    kw = dict(max_steps=4, save_strategy="steps", save_steps=2, dgpo_tau=0.05, learning_rate=3e-3)
    runs = {}
    for name, resume in (("full", None), ("resumed", str(tmp_path / "full" / "checkpoint-2"))):
        model = copy.deepcopy(initial)
        trainer = DGPOTrainer(
            model, length_reward, args=DGPOConfig(**cpu_args(tmp_path / name, **kw)),
            train_dataset=reversal_train_dataset,
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        runs[name] = adapter_state(model, "default")
    trainer.save_model(str(tmp_path / "saved"))
    for directory in (tmp_path / "full" / "checkpoint-2", tmp_path / "full" / "checkpoint-4", tmp_path / "saved"):
        files = sorted(str(path.relative_to(directory)) for path in directory.rglob("*adapter*"))
        assert files == ["adapter_config.json", "adapter_model.safetensors"], (directory, files)
        saved = load_file(directory / "adapter_model.safetensors")
        assert saved and not any(REFERENCE_ADAPTER in key.split(".") for key in saved), sorted(saved)[:4]
    # The saved adapter is the trained one
    saved = load_file(tmp_path / "saved" / "adapter_model.safetensors")
    assert saved.keys() == runs["resumed"].keys()
    assert all(torch.equal(value, runs["resumed"][key]) for key, value in saved.items())
    for name, value in runs["full"].items():
        torch.testing.assert_close(runs["resumed"][name], value, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(value, adapter_state(initial, "default")[name]) for name, value in runs["full"].items())


@pytest.mark.parametrize("steps_per_generation", [1, 2], ids=["loss_time", "scoring_time"])
def test_rows_without_a_valid_token_are_neither_forwarded_nor_counted(
    tiny_model_path, reversal_train_dataset, tmp_path, steps_per_generation
):
    """Every completion truncated and masked (`mask_truncated_completions`): no row has a valid token, so no
    reference forward runs and `dgpo/scored_fraction` reads 0 (it read 1.0, with a reference forward per row)."""
    args = DGPOConfig(**cpu_args(
        tmp_path, max_steps=2, max_completion_length=3, mask_truncated_completions=True,
        steps_per_generation=steps_per_generation, dgpo_skip_zero_advantage=False,
    ))  # fmt: skip
    trainer = DGPOTrainer(tiny_model_path, exact_match_reward, args=args, train_dataset=reversal_train_dataset)
    # No completion ends (with EOS or padding) within 3 tokens: all are truncated
    trainer.generation_config.suppress_tokens = [*trainer.eos_token_ids, trainer.processing_class.pad_token_id]
    forwards = []
    backbone = causal_lm(trainer.reference.model).base_model
    handle = backbone.register_forward_hook(lambda module, args, output: forwards.append(args))
    trainer.train()
    handle.remove()
    assert history(trainer, "completions/clipped_ratio") == [1.0] * len(history(trainer, "completions/clipped_ratio"))
    assert forwards == []
    scored = history(trainer, "dgpo/scored_fraction")
    assert scored and all(fraction == 0.0 for fraction in scored), scored
    assert all(torch.isfinite(torch.tensor(history(trainer, "loss"))))


@pytest.mark.parametrize("cast_lm_head_to_fp32", [False, True])
def test_bf16_policy_and_reference_are_scored_alike(
    tiny_model_path, reversal_train_dataset, tmp_path, cast_lm_head_to_fp32
):
    """A bf16 model: at step 1 pi_theta == pi_ref, so every token's divergence is exactly 0, whether TRL runs the LM
    head in fp32 (`cast_lm_head_to_fp32`, which TRL applies to the policy's head) or in bf16."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.bfloat16)
    args = DGPOConfig(**cpu_args(
        tmp_path, max_steps=1, cast_lm_head_to_fp32=cast_lm_head_to_fp32, dgpo_skip_zero_advantage=False,
        steps_per_generation=2,
    ))  # fmt: skip
    trainer = DGPOTrainer(model, exact_match_reward, args=args, train_dataset=reversal_train_dataset)
    policy_head = causal_lm(trainer._policy()).get_output_embeddings().weight
    reference_head = causal_lm(trainer.reference.model).get_output_embeddings().weight
    assert policy_head.dtype == reference_head.dtype == (torch.float32 if cast_lm_head_to_fp32 else torch.bfloat16)
    trainer.train()
    assert history(trainer, "dgpo/divergence/max") == [0.0]
    assert history(trainer, "dgpo/scored_fraction") == [1.0]


def test_backbone_forward_restores_the_forward_it_replaces(tiny_model_path, reversal_train_dataset, tmp_path):
    """The redirection returns the backbone's hidden states through the root's call, and puts back TRL's fused
    forward (an instance attribute) afterwards, also when the call raises."""
    trainer = DGPOTrainer(
        tiny_model_path, exact_match_reward, args=DGPOConfig(**cpu_args(tmp_path)),
        train_dataset=reversal_train_dataset,
    )  # fmt: skip
    policy = trainer._policy()
    fused = vars(policy)["forward"]
    calls = []
    handle = policy.register_forward_pre_hook(lambda module, args: calls.append(module))  # the root's own hooks run
    ids = torch.tensor([[5, 6, 7, 8]])
    hidden = backbone_forward(policy, policy, {"input_ids": ids})
    torch.testing.assert_close(hidden, policy.base_model(input_ids=ids).last_hidden_state)
    assert calls == [policy] and vars(policy)["forward"] is fused

    handle.remove()

    def failing_layer(module, args):
        raise RuntimeError("boom")

    handle = policy.base_model.layers[0].register_forward_pre_hook(failing_layer)
    with pytest.raises(RuntimeError, match="boom"):
        backbone_forward(policy, policy, {"input_ids": ids})
    assert vars(policy)["forward"] is fused
    handle.remove()


@pytest.mark.slow
def test_a_partitioned_copy_pairs_buffers_by_name(tiny_model_path, tmp_path):
    """`frozen_copy` of a model partitioned by ZeRO-3's zero.Init (one gloo rank, in a subprocess): buffers are copied
    by name (a buffer changed in memory reaches the copy), and a model with buffers its config does not build fails
    with an error naming them, instead of copying them by position into other buffers."""
    script = textwrap.dedent(
        f"""
        import os, torch, deepspeed
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{_free_port()}", RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="gloo")
        from transformers import AutoModelForCausalLM
        from transformers.integrations import HfDeepSpeedConfig
        from dgpo_trl.reference import frozen_copy

        config = HfDeepSpeedConfig({{"zero_optimization": {{"stage": 3}}, "train_batch_size": 1}})
        model = AutoModelForCausalLM.from_pretrained({str(tiny_model_path)!r}, dtype=torch.float32)
        assert all(hasattr(p, "ds_id") for p in model.parameters())
        rotary = dict(model.named_buffers())["model.rotary_emb.inv_freq"]
        rotary.mul_(0.5)  # changed in memory, as a context extension would
        copied = dict(frozen_copy(model).named_buffers())
        assert torch.equal(copied["model.rotary_emb.inv_freq"], rotary), "buffer not copied by name"
        model.model.register_buffer("extra_scale", torch.ones(3))  # a buffer the config does not build
        try:
            frozen_copy(model)
        except RuntimeError as error:
            assert "other buffers" in str(error) and "model.extra_scale" in str(error), error
            print("OK")
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    log = result.stdout[-2000:] + result.stderr[-4000:]
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), log


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_ref_named_adapter_is_refused_before_the_model_is_touched(warm_model_path, reversal_train_dataset, tmp_path):
    """Refused before GRPOTrainer patches the model's forward (it used to be refused after)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(warm_model_path)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM"),
                           adapter_name=REFERENCE_ADAPTER)  # fmt: skip
    with pytest.raises(ValueError, match="active adapter is named 'ref'"):
        DGPOTrainer(model, exact_match_reward, args=DGPOConfig(**cpu_args(tmp_path)),
                    train_dataset=reversal_train_dataset)  # fmt: skip
    assert "forward" not in vars(base)  # TRL's fused LM head patches it as an instance attribute


@pytest.mark.slow
def test_the_users_peft_model_is_left_without_the_reference_adapter(warm_model_path, reversal_train_dataset, tmp_path):
    """After train() the user's PeftModel holds what GRPOTrainer leaves (its save writes no ref/ folder); the trainer
    puts its reference back when it needs it again (an evaluation: d = 0 there would mean a wrong reference)."""
    model = pretrained_adapter(warm_model_path)
    passed = adapter_state(model, "default")
    args = DGPOConfig(**cpu_args(tmp_path, max_steps=2, learning_rate=3e-3, dgpo_skip_zero_advantage=False,
                                 eval_strategy="no", per_device_eval_batch_size=32))  # fmt: skip
    trainer = DGPOTrainer(model, length_reward, args=args, train_dataset=reversal_train_dataset,
                          eval_dataset=reversal_train_dataset.select(range(8)))  # fmt: skip
    trainer.train()
    assert sorted(model.peft_config) == ["default"]
    model.save_pretrained(tmp_path / "saved")
    assert sorted(os.listdir(tmp_path / "saved")) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    metrics = trainer.evaluate()
    assert metrics["eval_dgpo/divergence/max"] > 0.0  # the trained adapter against the initial one
    assert sorted(model.peft_config) == ["default"]
    # The reference it put back (and released again) is the adapter as passed
    kept = {
        name.replace(f".{REFERENCE_ADAPTER}.", "."): value
        for name, value in trainer.reference._released_adapter.items()
    }
    assert kept.keys() == passed.keys() and all(torch.equal(kept[name], passed[name]) for name in passed)
