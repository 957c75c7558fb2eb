"""Recipes: every YAML builds its DGPOConfig through the script's parser, and the paper's batch arithmetic holds."""

import re
import sys

import pytest
import yaml
from toolkit_fixtures import EXAMPLES

sys.path.insert(0, str(EXAMPLES))
from dgpo import build_reward_funcs, check_process_count, make_parser  # noqa: E402

RECIPES = sorted((EXAMPLES / "recipes").glob("*.yaml"))
PAPER_PROMPTS_PER_ROLLOUT = 512
PAPER_PROMPTS_PER_UPDATE = 64
PAPER_GROUP_SIZE = 16


def parse(recipe, *overrides):
    # bf16 needs a GPU (TrainingArguments checks); everything else is built exactly as on the cluster
    return make_parser().parse_args_and_config(["--config", str(recipe), "--bf16", "False", *overrides])


def raw(name):
    return yaml.safe_load((EXAMPLES / "recipes" / name).read_text())


def test_the_expected_recipes_exist():
    names = {recipe.name for recipe in RECIPES}
    assert {
        "qwen2.5-7b-math_dgpo.yaml",
        "qwen2.5-7b-math_dgpo_kappa0.yaml",
        "qwen2.5-7b-math_dgpo_reverse-kl.yaml",
        "qwen2.5-7b-math_grpo.yaml",
        "qwen2.5-7b-math_dapo.yaml",
        "qwen2.5-32b_dgpo.yaml",
        "qwen2.5-32b_grpo.yaml",
        "qwen2.5-32b_dapo.yaml",
    } <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda path: path.name)
def test_recipe_builds_its_config_with_the_papers_setup(recipe):
    script_args, training_args, model_args = parse(recipe)
    assert model_args.model_name_or_path in ("Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-32B")
    assert script_args.dataset_name == "dapo17k"
    assert training_args.num_generations == PAPER_GROUP_SIZE
    assert training_args.learning_rate == 1e-6 and training_args.weight_decay == 0.1
    assert training_args.temperature == 1.0
    assert training_args.use_vllm and training_args.vllm_mode == "server"
    # TRL's batch arithmetic: per_device_train_batch_size counts completions
    processes = script_args.recipe_num_processes
    per_device, accumulation = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    assert per_device * processes * accumulation == PAPER_PROMPTS_PER_UPDATE * PAPER_GROUP_SIZE
    assert training_args.generation_batch_size == PAPER_PROMPTS_PER_ROLLOUT * PAPER_GROUP_SIZE
    micro_steps_per_rollout = training_args.generation_batch_size // (per_device * processes)
    assert micro_steps_per_rollout == 8 * accumulation  # 8 updates of 64 prompts per rollout of 512
    # The arithmetic written in the header comment is the arithmetic of the values below it
    text = recipe.read_text()
    match = re.search(r"= (\d+) per device x (\d+) processes x (\d+) accumulation steps", text)
    assert match, "the header must spell out per_device x processes x accumulation"
    assert tuple(map(int, match.groups())) == (per_device, processes, accumulation)
    assert f"= {micro_steps_per_rollout} micro-steps" in text
    assert reward_names(script_args, training_args)[0] == "math_accuracy_reward"


def reward_names(script_args, training_args):
    return [f.__name__ for f in build_reward_funcs(script_args, training_args, "dapo17k")]


def test_dgpo_recipes_follow_eq_7():
    for name in ("qwen2.5-7b-math_dgpo.yaml", "qwen2.5-32b_dgpo.yaml"):
        _, args, _ = parse(EXAMPLES / "recipes" / name)
        assert (args.dgpo_divergence, args.dgpo_tau, args.dgpo_kappa, args.beta) == ("hellinger", 0.5, 1.0, 0.0)
        # One clipping range (epsilon_high None means epsilon on both sides in TRL)
        assert args.loss_type == "grpo" and args.epsilon == 0.2 and args.epsilon_high in (None, 0.2)


@pytest.mark.parametrize(
    ("ablation", "changed"),
    [
        ("qwen2.5-7b-math_dgpo_kappa0.yaml", {"dgpo_kappa": 0.0}),
        ("qwen2.5-7b-math_dgpo_reverse-kl.yaml", {"dgpo_divergence": "reverse_kl"}),
    ],
)
def test_ablations_change_one_thing(ablation, changed):
    base, variant = raw("qwen2.5-7b-math_dgpo.yaml"), raw(ablation)
    differing = {key for key in base.keys() | variant.keys() if base.get(key) != variant.get(key)}
    assert differing == set(changed) | {"output_dir"}
    assert {key: variant[key] for key in changed} == changed


@pytest.mark.parametrize("size", ["qwen2.5-7b-math", "qwen2.5-32b"])
def test_baselines(size):
    dgpo = raw(f"{size}_dgpo.yaml")
    for method in ("grpo", "dapo"):
        variant = raw(f"{size}_{method}.yaml")
        shared = {k for k in dgpo if not k.startswith(("dgpo_", "token_weight")) and k not in ("output_dir",)}
        method_fields = {"beta", "loss_type", "epsilon", "scale_rewards"}
        assert {k: variant.get(k) for k in shared - method_fields} == {k: dgpo[k] for k in shared - method_fields}
    script_args, grpo, _ = parse(EXAMPLES / "recipes" / f"{size}_grpo.yaml")
    assert grpo.dgpo_uniform_weights and grpo.beta > 0 and grpo.loss_type == "grpo"
    script_args, dapo, _ = parse(EXAMPLES / "recipes" / f"{size}_dapo.yaml")
    assert dapo.dgpo_uniform_weights and dapo.beta == 0.0 and dapo.loss_type == "dapo"
    assert (dapo.epsilon, dapo.epsilon_high) == (0.2, 0.28)  # clip-higher
    assert reward_names(script_args, dapo) == ["math_accuracy_reward", "soft_overlong_punishment_reward"]
    assert 0 < script_args.overlong_buffer_length < dapo.max_completion_length


def test_command_line_overrides_the_recipe():
    recipe = EXAMPLES / "recipes" / "qwen2.5-7b-math_dgpo.yaml"
    _, args, _ = parse(recipe, "--dgpo_tau", "1.0", "--learning_rate", "2e-6")
    assert args.dgpo_tau == 1.0 and args.learning_rate == 2e-6


def test_a_recipe_refuses_another_process_count():
    script_args, args, _ = parse(EXAMPLES / "recipes" / "qwen2.5-7b-math_dgpo.yaml")
    # This test runs one process; the recipe assumes 8 x 8 x 16 = 1,024 completions per update
    assert args.world_size == 1
    with pytest.raises(ValueError, match="--gradient_accumulation_steps 128 --recipe_num_processes 1"):
        check_process_count(script_args, args)
    script_args, args, _ = parse(
        EXAMPLES / "recipes" / "qwen2.5-7b-math_dgpo.yaml",
        *("--recipe_num_processes", "1", "--gradient_accumulation_steps", "128"),
    )
    check_process_count(script_args, args)
