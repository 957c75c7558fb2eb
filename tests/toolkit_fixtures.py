"""Helpers for the toolkit tests (rewards, data, evaluation, heatmaps, examples, notebook).

Imported by those test modules (`from toolkit_fixtures import ...`); the shared tiny models come from conftest.py.
"""

from __future__ import annotations

from pathlib import Path

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
