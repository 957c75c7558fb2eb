"""Fixtures and helpers for the toolkit tests (rewards, data, evaluation, heatmaps, examples, notebook).

Imported by those test modules (`from toolkit_fixtures import ...`); the shared tiny models come from conftest.py.
"""

from __future__ import annotations

import importlib.machinery
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"


def length_reward(completions, **kwargs) -> list[float]:
    """A reward that differs between almost any two completions (their length), so every group has nonzero
    advantages and DGPO scores every batch, even on an untrained model."""
    return [float(len(completion)) for completion in completions]


class FakeHub:
    """Stands in for `datasets.load_dataset` with small in-memory tables keyed by Hub id; records every call."""

    def __init__(self, tables: dict):
        self.tables = tables
        self.calls = []

    def __call__(self, hub_id, name=None, split=None):
        from datasets import Dataset

        self.calls.append((hub_id, name, split))
        return Dataset.from_list(self.tables[hub_id])


@pytest.fixture
def fake_trackio(monkeypatch):
    """A stand-in `trackio` module, installed where TRL looks for it; records what gets logged.

    TRL 1.16 reads module-level `trackio` globals in grpo_trainer and extras.profiling (imported only when trackio is
    installed, which it is not here).
    """
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    module.logged = []
    module.Image = lambda image: ("image", image.size)
    module.Table = lambda dataframe: dataframe
    module.log = lambda data, **kwargs: module.logged.append(data)
    monkeypatch.setitem(sys.modules, "trackio", module)
    import trl.extras.profiling
    import trl.trainer.grpo_trainer

    monkeypatch.setattr(trl.trainer.grpo_trainer, "trackio", module, raising=False)
    monkeypatch.setattr(trl.extras.profiling, "trackio", module, raising=False)
    return module
