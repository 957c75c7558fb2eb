"""The offline learning study (`benchmarks/learning/`): its tasks, and a `--quick` run end to end."""

import importlib.util
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "learning"

# Loaded under a private name: `benchmarks/learning` is not a package, and a bare `tasks` could shadow another module
_spec = importlib.util.spec_from_file_location("_learning_study_tasks", STUDY / "tasks.py")
tasks = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = tasks  # dataclasses resolve their module through sys.modules
_spec.loader.exec_module(tasks)
TASKS, answer_positions, final_answer_reward = tasks.TASKS, tasks.answer_positions, tasks.final_answer_reward


def test_splits_are_disjoint_and_deterministic():
    for task in TASKS.values():
        splits = task.splits(seed=3, n_sft=300, n_train=200, n_eval=100)
        prompts = {name: {row["prompt"] for row in rows} for name, rows in splits.items()}
        assert [len(prompts[k]) for k in ("sft", "train", "eval")] == [300, 200, 100]
        assert not (prompts["eval"] & prompts["train"]) and not (prompts["eval"] & prompts["sft"])
        assert not (prompts["train"] & prompts["sft"])
        assert task.splits(seed=3, n_sft=300, n_train=200, n_eval=100) == splits


def test_filler_task_rewards_only_the_answer_after_the_last_equals_sign():
    task = TASKS["filler"]
    prompt, answer = task.make_prompt(random.Random(0))
    target = task.sft_target(answer, random.Random(1))
    assert target.endswith("=" + answer) and len(target) <= task.max_completion_length
    assert final_answer_reward([target, "abc=" + answer, "x=1=" + answer, answer, target + "0"], [answer] * 5) == [
        1.0, 1.0, 1.0, 0.0, 0.0,
    ]
    tokens = list("abca=321") + ["<eos>"]
    assert answer_positions(tokens) == [False] * 4 + [True] * 5
    assert answer_positions(list("abc")) == [False] * 3


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(STUDY / "study.py"), "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("summary.json", "summary.md", "tau_sweep.png", "final_accuracy.png", "reversal_training.png",
                 "filler_training.png"):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"reversal", "filler"}
    assert summary["wall_seconds"] > 0 and summary["command"].startswith("python benchmarks/learning/study.py")
    for task_name, task in summary["tasks"].items():
        assert set(task["configs"]) == {"grpo", "dgpo", "dgpo_ess0.8"}
        for config in task["configs"].values():
            for key in ("greedy_accuracy", "sampled_accuracy"):
                assert 0.0 <= config[key][0] <= 1.0
        record = json.loads((out / "runs" / task_name / "dgpo_ess0.8" / "seed0.json").read_text())
        taus = record["history"]["dgpo/tau"]
        assert len(taus) == record["settings"]["rl_steps"]
        assert all(math.isfinite(t) and t > 0 for t in taus)
    # The markdown report carries the tables
    text = (out / "summary.md").read_text()
    assert "| grpo |" in text and "| dgpo_ess0.8 |" in text
