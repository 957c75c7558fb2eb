# Copyright 2026 The dgpo-trl authors. Apache-2.0.
"""Train a model with DGPO (arXiv 2605.03327), TRL-style.

Reproduce the paper (one recipe per setup in `examples/recipes/`; each states the GPUs it assumes):

    accelerate launch --config_file accelerate_configs/zero3.yaml examples/dgpo.py \\
        --config examples/recipes/qwen2.5-7b-math_dgpo.yaml

Any model and dataset, from the command line (every `DGPOConfig`/`GRPOConfig` and `ModelConfig` field is a flag):

    accelerate launch --config_file accelerate_configs/zero3.yaml examples/dgpo.py \\
        --model_name_or_path Qwen/Qwen2.5-Math-1.5B --dataset_name dapo17k \\
        --num_generations 16 --per_device_train_batch_size 16 --learning_rate 1e-6 --dgpo_tau 0.5 \\
        --use_peft --lora_r 32    # LoRA, via TRL's ModelConfig; --load_in_4bit for QLoRA

Offline, on a tiny local model and a built-in synthetic task (what the tests run):

    python examples/dgpo.py --model_name_or_path path/to/tiny --dataset_name reversal \\
        --max_steps 2 --bf16 False --gradient_checkpointing False --report_to none

`--dataset_name` takes a short name (`dapo17k`, `aime2024`, `aime2025`, `math500`, `gsm8k`, or a synthetic task of
`dgpo_trl.tasks`: `reversal`, `addition`, `filler`), the Hub id of one of those math sets (loaded through
`dgpo_trl.data`, which adds the reasoning instruction), or any other Hub dataset already in TRL's format (a `prompt`
column plus the columns its rewards read). Command-line flags override the values of a `--config` file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.data import REASONING_INSTRUCTION, default_reward_funcs, is_synthetic, load_task, resolve_dataset_name
from dgpo_trl.rewards import REWARD_FUNCTIONS, get_reward_function, overlong_penalty


@dataclass
class DGPOScriptArguments(ScriptArguments):
    """Script arguments for `examples/dgpo.py` (on top of TRL's `ScriptArguments`: dataset name, config, splits)."""

    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": f"Reward functions: names in {sorted(REWARD_FUNCTIONS)} or dotted import paths "
            "(my_pkg.rewards.fn). Default: math_accuracy for the math sets, the task's own for the synthetic tasks."
        },
    )
    overlong_buffer_length: int | None = field(
        default=None,
        metadata={
            "help": "Adds DAPO's soft overlong penalty: 0 up to max_completion_length - buffer tokens, then "
            "down to -1 at max_completion_length. DAPO used 4096 (with a 20480-token maximum). Unset: no penalty."
        },
    )
    instruction: str = field(
        default=REASONING_INSTRUCTION,
        metadata={"help": "Reasoning instruction appended to each problem of the built-in math sets."},
    )
    system_prompt: str | None = field(default=None, metadata={"help": "Optional system message for the math sets."})
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N problems only (synthetic tasks: generate N)."}
    )
    recipe_num_processes: int | None = field(
        default=None,
        metadata={
            "help": "The number of training processes a recipe's batch arithmetic assumes. When set, the script stops "
            "under any other count and says which gradient_accumulation_steps keeps the recipe's batch."
        },
    )
    token_weight_heatmaps: int = field(
        default=0,
        metadata={
            "help": "Write token-weight heatmaps (HTML and PNG) of this many completions into "
            "output_dir/token_weights at every logging step, and add them to the completions table under "
            "trackio/wandb. 0: off."
        },
    )


def check_process_count(script_args: DGPOScriptArguments, training_args: DGPOConfig) -> None:
    """Raises a ValueError when a recipe's batch arithmetic does not hold for the launched number of processes."""
    expected = script_args.recipe_num_processes
    actual = training_args.world_size
    if expected is None or expected == actual:
        return
    per_device = training_args.per_device_train_batch_size
    completions_per_update = per_device * expected * training_args.gradient_accumulation_steps
    per_step = per_device * actual
    advice = (
        f"--gradient_accumulation_steps {completions_per_update // per_step}"
        if completions_per_update % per_step == 0
        else "a per_device_train_batch_size and gradient_accumulation_steps whose product times the process count "
        f"is {completions_per_update}"
    )
    raise ValueError(
        f"recipe_num_processes={expected}, but {actual} training processes were launched: the recipe's optimizer step "
        f"of {completions_per_update} completions would change. Launch {expected} processes, or pass {advice} "
        f"--recipe_num_processes {actual}."
    )


def build_reward_funcs(script_args: DGPOScriptArguments, training_args: DGPOConfig, dataset_name: str) -> list:
    """The reward functions by name (defaults follow the dataset), plus DAPO's overlong penalty when asked for."""
    names = script_args.reward_funcs or default_reward_funcs(dataset_name)
    reward_funcs = [get_reward_function(name) for name in names]
    if script_args.overlong_buffer_length is not None:
        reward_funcs.append(overlong_penalty(training_args.max_completion_length, script_args.overlong_buffer_length))
    return reward_funcs


def load_datasets(script_args: DGPOScriptArguments, training_args: DGPOConfig):
    """(train, eval or None): a built-in set through `dgpo_trl.data`, or any Hub dataset in TRL's format."""
    name = script_args.dataset_name
    if not name:
        raise ValueError("dataset_name is required (a built-in name such as 'dapo17k' or 'reversal', or a Hub id).")
    wants_eval = training_args.eval_strategy != "no"
    try:
        short = resolve_dataset_name(name)
    except ValueError:
        short = None
    if short is not None:
        kwargs = {"seed": training_args.seed}
        if not is_synthetic(short):
            kwargs.update(instruction=script_args.instruction, system_prompt=script_args.system_prompt)
        train = load_task(short, script_args.dataset_train_split, limit=script_args.max_train_samples, **kwargs)
        evaluation = load_task(short, script_args.dataset_test_split, **kwargs) if wants_eval else None
        return train, evaluation
    from datasets import load_dataset

    dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    train = dataset[script_args.dataset_train_split]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    return train, (dataset[script_args.dataset_test_split] if wants_eval else None)


def main(script_args: DGPOScriptArguments, training_args: DGPOConfig, model_args: ModelConfig):
    check_process_count(script_args, training_args)
    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    dataset_name = script_args.dataset_name
    try:
        dataset_name = resolve_dataset_name(dataset_name)
    except ValueError:
        if not script_args.reward_funcs:
            raise ValueError(
                f"dataset_name {dataset_name!r} is not a built-in dataset, so it has no default reward: pass "
                "--reward_funcs (e.g. math_accuracy, which reads the gold answer from an 'answer' column)."
            ) from None
    train_dataset, eval_dataset = load_datasets(script_args, training_args)
    trainer = DGPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=build_reward_funcs(script_args, training_args, dataset_name),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=get_peft_config(model_args),
        quantization_config=get_quantization_config(model_args),
    )
    if script_args.token_weight_heatmaps:
        from dgpo_trl.visualize import TokenWeightHeatmapCallback

        trainer.add_callback(TokenWeightHeatmapCallback(trainer, num_completions=script_args.token_weight_heatmaps))

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {os.path.abspath(training_args.output_dir)}")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    trainer.end()  # closes the trackers and the process group
    return trainer


def make_parser() -> TrlParser:
    return TrlParser((DGPOScriptArguments, DGPOConfig, ModelConfig))


if __name__ == "__main__":
    script_args, training_args, model_args = make_parser().parse_args_and_config()
    main(script_args, training_args, model_args)
