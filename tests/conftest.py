"""Shared fixtures: tiny offline models built once per session, and CPU-friendly trainer settings."""

import os

# One thread per process: tiny models run ~10x faster on these machines than with the default thread pool
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """A random-init tiny Llama and its char tokenizer, saved to disk (TRL loads references by path)."""
    from dgpo_trl.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=64, num_layers=2, seed=0)


@pytest.fixture(scope="session")
def warm_model_path(tmp_path_factory):
    """The reversal-task tiny Llama after a short SFT warm-up: sampled completions are sometimes right, so groups
    have nonzero advantages and DGPO has something to redistribute."""
    from dgpo_trl.tasks import reversal_dataset
    from dgpo_trl.tiny import build_tiny_model, supervised_warmup

    path = build_tiny_model(tmp_path_factory.mktemp("warm") / "model", hidden_size=64, num_layers=2, seed=0)
    # ~0.33 sampled accuracy after this warm-up (measured): most groups mix right and wrong completions
    return supervised_warmup(path, reversal_dataset(1000, seed=1), steps=150, batch_size=64, lr=3e-3)


@pytest.fixture(scope="session")
def reversal_train_dataset():
    from dgpo_trl.tasks import reversal_dataset

    return reversal_dataset(128, seed=2)


def cpu_args(output_dir, **overrides):
    """DGPOConfig/GRPOConfig keyword arguments that run quickly on CPU (TRL's defaults assume a GPU)."""
    args = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        num_generations=8,
        max_completion_length=8,
        learning_rate=3e-4,
        max_steps=2,
        logging_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        seed=0,
        disable_tqdm=True,
    )
    args.update(overrides)
    return args
