"""The example scripts, run as a user runs them (subprocesses, offline, on tiny local models)."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from toolkit_fixtures import EXAMPLES, REPO_ROOT


def run(args, cwd, timeout=300):
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        # toolkit_fixtures.length_reward is passed to the training script by dotted path
        PYTHONPATH=os.pathsep.join([str(REPO_ROOT / "tests"), env.get("PYTHONPATH", "")]),
    )
    result = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_training_script_runs_two_lora_steps_offline(tiny_model_path, tmp_path):
    output_dir = tmp_path / "run"
    result = run(
        [
            EXAMPLES / "dgpo.py",
            *("--model_name_or_path", tiny_model_path, "--dataset_name", "reversal", "--max_train_samples", "64"),
            *("--reward_funcs", "exact_match", "toolkit_fixtures.length_reward"),
            *("--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj"),
            *("--max_steps", "2", "--per_device_train_batch_size", "16", "--num_generations", "8"),
            *("--max_completion_length", "8", "--learning_rate", "1e-3", "--logging_steps", "1"),
            *("--bf16", "False", "--gradient_checkpointing", "False", "--report_to", "none", "--save_strategy", "no"),
            *("--token_weight_heatmaps", "2", "--output_dir", output_dir),
        ],
        cwd=tmp_path,
    )
    assert "Model saved to" in result.stdout
    assert (output_dir / "adapter_config.json").exists()  # ModelConfig's --use_peft reached the trainer
    heatmaps = sorted(path.name for path in (output_dir / "token_weights").iterdir())
    assert heatmaps == ["step_000001.html", "step_000001.png", "step_000002.html", "step_000002.png"]


def test_training_script_needs_rewards_for_an_unknown_dataset(tmp_path):
    sys.path.insert(0, str(EXAMPLES))
    from dgpo import main, make_parser

    script_args, training_args, model_args = make_parser().parse_args_and_config(
        [
            "--model_name_or_path",
            "unused",
            "--dataset_name",
            "my/hub-dataset",
            "--bf16",
            "False",
            "--output_dir",
            str(tmp_path),
        ]
    )
    # Raised before any model or data is loaded
    with pytest.raises(ValueError, match="not a built-in dataset.*--reward_funcs"):
        main(script_args, training_args, model_args)


@pytest.mark.slow
def test_evaluation_script_prints_a_table_and_resumes(warm_model_path, tmp_path):
    output = tmp_path / "eval.json"
    args = [
        EXAMPLES / "evaluate.py",
        *("--model_name_or_path", warm_model_path, "--dataset_name", "reversal", "--limit", "6"),
        *("--num_samples", "4", "--pass_k", "1", "4", "--max_new_tokens", "8", "--output_file", output),
    ]
    first = run(args, cwd=tmp_path)
    assert "| problems | Avg@4 | Cons@4 | Pass@1 | Pass@4 |" in first.stdout
    results = json.loads(output.read_text())
    assert len(results["problems"]) == 6
    assert results["config"]["top_p"] == 0.7 and results["config"]["temperature"] == 1.0  # the paper's defaults
    correct = [problem["num_correct"] for problem in results["problems"].values()]
    assert results["summary"]["avg@4"] == pytest.approx(sum(correct) / 24)
    assert results["summary"]["pass@4"] == pytest.approx(sum(c > 0 for c in correct) / 6)

    # A second run finds every problem done: nothing is regenerated and the file is unchanged
    before = output.read_text()
    second = run(args, cwd=tmp_path)
    assert json.loads(output.read_text())["problems"] == json.loads(before)["problems"]
    assert json.loads(second.stdout.strip().splitlines()[-1]) == pytest.approx(results["summary"])


@pytest.mark.slow
def test_demo_runs_end_to_end_on_a_small_budget(tmp_path):
    output_dir = tmp_path / "demo"
    result = run(
        [
            EXAMPLES / "demo.py",
            *("--output-dir", output_dir, "--steps", "4", "--warmup-steps", "40", "--prompts-per-step", "8"),
            *("--eval-problems", "8", "--eval-samples", "4"),
        ],
        cwd=tmp_path,
    )
    assert (output_dir / "reward_curves.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((output_dir / "summary.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["warm start", "DGPO", "GRPO"]
    for row in summary["rows"]:
        assert 0.0 <= row["avg@4"] <= row["pass@4"] <= 1.0
    assert "| DGPO" in result.stdout and "| GRPO" in result.stdout
    # The one-seed note states this run's difference and its sampling noise, as its own results file holds them
    avg = {row["method"]: row["avg@4"] for row in summary["rows"]}
    difference, sampling = printed_noise(result.stdout)
    assert difference == pytest.approx(100 * (avg["DGPO"] - avg["GRPO"]), abs=0.05 + 1e-9)
    assert sampling == pytest.approx(binomial_95(avg["DGPO"], avg["GRPO"], draws=8 * 4), abs=0.05 + 1e-9)
    assert f"Reward curves:  {(output_dir / 'reward_curves.png').resolve()}" in result.stdout
    # The heatmap shows each completion under its string to reverse and the expected answer
    page = (output_dir / "token_weights.html").read_text()
    rows = re.findall(
        r'prompt <span class="dgpo-text" title="r(\d+)&gt;">r\1&gt;</span> · expected '
        r'<span class="dgpo-text">(\d+)</span>',
        page,
    )
    assert len(rows) == page.count('class="dgpo-completion"') > 0
    assert all(expected == digits[::-1] for digits, expected in rows)
    assert (output_dir / "token_weights.png").read_bytes()[:4] == b"\x89PNG"


def printed_noise(text):
    """The difference and the sampling noise (95%, points) that the demo's one-seed note prints."""
    difference = float(re.search(r"DGPO - GRPO is ([+-]\d+\.\d) points", text).group(1))
    sampling = float(re.search(r"about ±(\d+\.\d) \(95%\)", text).group(1))
    return difference, sampling


def binomial_95(avg_a, avg_b, draws):
    """Half-width, in points, of the 95% interval of a difference of two Avg@n over `draws` samples each."""
    p = (avg_a + avg_b) / 2
    return 100 * 1.96 * math.sqrt(2 * p * (1 - p) / draws)


@pytest.mark.parametrize(("avg_dgpo", "avg_grpo", "problems", "samples"), [(0.564, 0.596, 100, 8), (0.9, 0.5, 8, 4)])
def test_the_demo_notes_the_difference_it_measured_and_its_sampling_noise(avg_dgpo, avg_grpo, problems, samples):
    import importlib.util

    spec = importlib.util.spec_from_file_location("demo", EXAMPLES / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    note = demo.noise_note(avg_dgpo, avg_grpo, problems=problems, samples=samples)
    difference, sampling = printed_noise(note)
    assert difference == pytest.approx(100 * (avg_dgpo - avg_grpo), abs=0.05 + 1e-9)
    assert sampling == pytest.approx(binomial_95(avg_dgpo, avg_grpo, problems * samples), abs=0.05 + 1e-9)
    # Every file of the repository the note sends the reader to exists
    named = re.findall(r"\b(?:docs|benchmarks|examples)/[\w./-]+\.(?:md|py)\b", note)
    assert named and all((REPO_ROOT / path).is_file() for path in named), named
