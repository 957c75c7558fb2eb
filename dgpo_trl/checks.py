"""Checks DGPOTrainer makes at construction that GRPOTrainer would only fail on later, or silently skip."""

from __future__ import annotations

from .reference import check_reference_adapter


def check_trainer_arguments(model, args, given: dict, weighted: bool, peft: bool) -> None:
    """What DGPOTrainer refuses before anything touches the model. `given`: GRPOTrainer's arguments by name;
    `weighted`: DGPO's weights are on (a reference is built); `peft`: the policy is a PEFT model."""
    for name in ("train_dataset", "eval_dataset"):
        check_dataset(given.get(name), name, environment=given.get("environment_factory") is not None)
    if weighted and args.sync_ref_model and peft:
        raise NotImplementedError(
            "sync_ref_model=True is not supported with a PEFT model: the reference is the policy with its adapter "
            "disabled, so there is no separate reference to synchronize. Set sync_ref_model=False."
        )
    if weighted:
        check_reference_adapter(model)


def check_dataset(dataset, name: str, environment: bool = False) -> None:
    """Refuses, at construction, a dataset GRPOTrainer could only fail on or silently not use, saying what is wrong.

    An empty dataset (GRPOTrainer would train zero steps, or evaluate nothing, without a word). A dataset without a
    "prompt" column, unless an `environment_factory` builds the prompts (`environment=True`: TRL 1.16 then trains on a
    dataset with, e.g., only an "environment" column): GRPOTrainer reads every prompt from that column and would fail
    on the first batch with a bare `KeyError`; checked on a streaming `IterableDataset` too when its columns are
    known.
    """
    if isinstance(dataset, dict):  # DatasetDict, or a dict of eval datasets
        for key, value in dataset.items():
            check_dataset(value, f"{name}[{key!r}]", environment)
        return
    if dataset is None:
        return
    # A streaming `IterableDataset` has no length, and its columns only when its features are known
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(
            f"{name} is empty (0 rows): there is nothing to {'evaluate' if name.startswith('eval') else 'train'} on. "
            "Check the split, or any filter applied to it."
        )
    columns = getattr(dataset, "column_names", None)
    if environment or columns is None or "prompt" in columns:
        return
    raise ValueError(
        f"{name} has no 'prompt' column, which GRPOTrainer and DGPOTrainer read each example's prompt from; its "
        f"columns are {list(columns)}. Rename the column that holds the prompts, e.g. "
        f"`dataset.rename_column({(columns[0] if columns else 'question')!r}, 'prompt')`, or pass an "
        "`environment_factory` whose environments build the prompts."
    )
