"""The offline learning study (`benchmarks/learning/`): its tasks, and a `--quick` run end to end."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "benchmarks" / "learning"


def _load_study():
    """study.py under a private name (`benchmarks/learning` is not a package); the environment variables it sets for
    its own processes are undone here."""
    saved_env = dict(os.environ)
    try:
        spec = importlib.util.spec_from_file_location("_learning_study", STUDY / "study.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
        spec.loader.exec_module(module)
        return module
    finally:
        os.environ.clear()
        os.environ.update(saved_env)


def test_study_tasks_are_the_toolkit_tasks_and_their_vocabulary_variants():
    from dgpo_trl.tasks import TASKS as SYNTHETIC_TASKS
    from dgpo_trl.tiny import build_tokenizer

    study = _load_study()
    assert study.NATIVE_VOCAB_SIZE == len(build_tokenizer())
    for name in ("reversal", "filler"):
        task, toolkit = study.TASKS[name], SYNTHETIC_TASKS[name]
        assert task.vocab_size is None and task.base is None
        assert (task.reward, task.description, task.max_completion_length) == (
            toolkit.reward,
            toolkit.description,
            toolkit.max_completion_length,
        )
        assert task.splits(1, 50, 20, 10) == toolkit.splits(1, 50, 20, 10)
    for name, task in study.TASKS.items():
        if task.vocab_size:
            assert name == f"{task.base}_v{task.vocab_size}"
            assert task.splits(1, 50, 20, 10) == study.TASKS[task.base].splits(1, 50, 20, 10)
    assert {task.vocab_size for task in study.TASKS.values()} == {None, *study.VOCAB_SIZES}
    reward = study.padded_aware_reward(study.TASKS["reversal"], n_real=99)
    logged = {}
    # "321" decoded from [7, 6, 5], and from [7, 5000, 6, 5] (the padded id 5000 vanishes when decoded): only the first
    # is right
    assert reward(
        ["321", "321"],
        ["321", "321"],
        completion_ids=[[7, 6, 5], [7, 5000, 6, 5]],
        log_metric=lambda k, v: logged.update({k: v}),
    ) == [1.0, 0.0]
    assert logged == {"padded_fraction": 0.5}


def test_inverse_cdf_sampler_draws_the_given_distribution():
    import torch

    study = _load_study()
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.2], [0.0, 0.0, 0.0, 1.0]])
    torch.manual_seed(0)
    draws = torch.cat([study.inverse_cdf_multinomial(probs, 1) for _ in range(4000)], dim=1)  # (2, 4000)
    assert draws.shape == (2, 4000) and draws.dtype == torch.long
    frequencies = torch.stack([(draws[0] == i).double().mean() for i in range(4)])
    assert torch.allclose(frequencies, probs[0].double(), atol=0.03) and frequencies[1] == 0  # never a zero-prob id
    assert (draws[1] == 3).all()
    with study.fast_sampling():
        assert torch.multinomial is study.inverse_cdf_multinomial
        assert torch.multinomial(probs, 2).shape == (2, 2)  # anything but one sample: torch's own
    assert torch.multinomial is not study.inverse_cdf_multinomial


@pytest.mark.slow
def test_quick_study_runs_end_to_end(tmp_path):
    out = tmp_path / "study"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, str(STUDY / "study.py"), "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in (
        "summary.json",
        "summary.md",
        "tau_sweep.png",
        "final_accuracy.png",
        "reversal_training.png",
        "filler_training.png",
        "vocab_scale.png",
        "whatif_tau.png",
    ):
        assert (out / name).stat().st_size > 0, name
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"reversal", "filler", "reversal_v32000"}
    assert summary["wall_seconds"] > 0 and summary["command"].startswith("python benchmarks/learning/study.py")
    for task_name in ("reversal", "filler"):
        task = summary["tasks"][task_name]
        assert set(task["configs"]) == {"grpo", "dgpo", "dgpo_ess0.8", "dgpo_nats_tau0.5"}
        for config in task["configs"].values():
            for key in ("greedy_accuracy", "sampled_accuracy"):
                assert 0.0 <= config[key][0] <= 1.0
        record = json.loads((out / "runs" / task_name / "dgpo_ess0.8" / "seed0.json").read_text())
        taus = record["history"]["dgpo/tau"]
        assert len(taus) == record["settings"]["rl_steps"]
        assert all(math.isfinite(t) and t > 0 for t in taus)
    # The vocabulary-scale variant: the model's LM head padded to 32,000 rows, both gates, what-if statistics that
    # reproduce the trainer's own ESS at the run's gate and tau
    assert set(summary["tasks"]["reversal_v32000"]["configs"]) == {"grpo", "dgpo", "dgpo_nats_tau0.5"}
    model = json.loads((out / "models" / "reversal_v32000" / "seed0" / "config.json").read_text())
    assert model["vocab_size"] == 32000
    warmup = json.loads((out / "models" / "reversal_v32000" / "seed0" / "warmup.json").read_text())
    assert warmup["real_tokens"] == _load_study().NATIVE_VOCAB_SIZE
    assert warmup["tail_after"]["tail_mass"] < warmup["tail_before"]["tail_mass"]
    history = json.loads((out / "runs" / "reversal_v32000" / "dgpo_nats_tau0.5" / "seed0.json").read_text())["history"]
    assert all(math.isfinite(h) and h > 0 for h in history["dgpo/entropy/mean"])
    assert len(history["padded_fraction"]) == len(history["reward"])
    for own, whatif in zip(history["dgpo/ess"], history["whatif/nats/tau0.5/ess"]):
        assert own == pytest.approx(whatif, abs=1e-6, nan_ok=True)
    # The markdown report carries the tables
    text = (out / "summary.md").read_text()
    assert "| grpo |" in text and "| dgpo_ess0.8 |" in text and "| dgpo_nats_tau0.5 |" in text
    assert "## Vocabulary scale: reversal" in text and "| 32,000 | 10.4 |" in text
