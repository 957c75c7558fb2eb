"""Datasets in TRL's prompt format: the paper's math sets (by public Hub id) and offline synthetic tasks.

Every loader returns a `datasets.Dataset` with the columns TRL's `GRPOTrainer` and `dgpo_trl.evaluation` expect:

- `prompt`: a conversation `[{"role": "user", "content": problem + instruction}]` for the math sets (TRL applies the
  model's chat template), or a plain string for the synthetic tasks (the tiny tokenizer has no chat template);
- `answer`: the gold answer as a string (TRL passes it to the reward functions as `answer=`);
- `id`: a stable problem id (the evaluation resumes by it).

Math sets (network needed, as `datasets.load_dataset` downloads them; tests pass a fake `load_fn`):

| name       | Hub id                             | split used by default |
|------------|------------------------------------|-----------------------|
| `dapo17k`  | `open-r1/DAPO-Math-17k-Processed`  | `train` (config `all`: DAPO-17K de-duplicated) |
| `aime2024` | `HuggingFaceH4/aime_2024`          | `train` (the 30 problems) |
| `aime2025` | `math-ai/aime25`                   | `test` (the 30 problems) |
| `math500`  | `HuggingFaceH4/MATH-500`           | `test` |
| `gsm8k`    | `openai/gsm8k` (config `main`)     | `test` |

DAPO-17K's prompts carry DAPO's own instruction ("... The last line of your response should be of the form
Answer: $Answer ..."); the loader strips it so every set gets the same reasoning instruction (pass
`instruction=None` to keep prompts as they are; `dgpo_trl.rewards` reads both `\\boxed{}` and `Answer:` lines).

Synthetic tasks (offline, seconds to minutes to learn on a tiny model; `dgpo_trl.tasks`): `reversal` (`r12345>` ->
`54321`), `addition` (`a3+4=` -> `7`) and `filler` (`f3825>` -> letters, `=`, `5283`); each trains with its task's
reward (`exact_match`, `final_answer`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .tasks import TASKS

__all__ = [
    "MATH_DATASETS",
    "REASONING_INSTRUCTION",
    "DatasetSpec",
    "default_reward_funcs",
    "gsm8k_final_answer",
    "is_synthetic",
    "load_math_dataset",
    "load_synthetic_dataset",
    "load_task",
    "math_prompt",
    "resolve_dataset_name",
    "strip_dapo_instruction",
]

REASONING_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
"""Appended to every math problem (Qwen2.5-Math's instruction); `math_accuracy_reward` reads the last `\\boxed{}`."""

_DAPO_HEADER = "Solve the following math problem step by step."
_DAPO_REMINDER = re.compile(r'\s*Remember to put your answer on its own line after "Answer:"\.?\s*$')


def strip_dapo_instruction(prompt: str) -> str:
    """The bare problem of a DAPO-17K prompt: drops DAPO's instruction header paragraph and closing reminder.

    Text without DAPO's wrapper is returned unchanged (stripped of surrounding whitespace).
    """
    text = prompt.strip()
    if text.startswith(_DAPO_HEADER):
        _, separator, body = text.partition("\n\n")
        if separator:
            text = body
    return _DAPO_REMINDER.sub("", text).strip()


def gsm8k_final_answer(solution: str) -> str:
    """GSM8K's gold answer: the number after `####` in its worked solution, without thousands separators."""
    _, separator, final = str(solution).rpartition("####")
    if not separator:
        raise ValueError(f"GSM8K answers end with '#### <number>'; got {solution[-80:]!r}.")
    return final.strip().replace(",", "")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a math set lives on the Hub and which columns hold its problem, answer and id."""

    hub_id: str
    split: str
    problem_column: str
    answer_column: str
    config: str | None = None
    id_column: str | None = None
    problem_transform: Callable[[str], str] | None = None
    answer_transform: Callable[[str], str] | None = None


MATH_DATASETS: dict[str, DatasetSpec] = {
    "dapo17k": DatasetSpec(
        "open-r1/DAPO-Math-17k-Processed",
        split="train",
        problem_column="prompt",
        answer_column="solution",
        config="all",
        problem_transform=strip_dapo_instruction,
    ),
    "aime2024": DatasetSpec(
        "HuggingFaceH4/aime_2024", split="train", problem_column="problem", answer_column="answer", id_column="id"
    ),
    "aime2025": DatasetSpec(
        "math-ai/aime25", split="test", problem_column="problem", answer_column="answer", id_column="id"
    ),
    "math500": DatasetSpec(
        "HuggingFaceH4/MATH-500", split="test", problem_column="problem", answer_column="answer", id_column="unique_id"
    ),
    "gsm8k": DatasetSpec(
        "openai/gsm8k",
        split="test",
        problem_column="question",
        answer_column="answer",
        config="main",
        answer_transform=gsm8k_final_answer,
    ),
}
"""The paper's training set (DAPO-17K) and the evaluation sets, by short name."""


# Held-out splits are drawn with a different seed than training: `seed + _TEST_SEED_OFFSET`
_TEST_SEED_OFFSET = 10_000


def resolve_dataset_name(name: str) -> str:
    """The short name (`"aime2024"`, `"reversal"`, ...) of a dataset given by short name or known Hub id."""
    if name in MATH_DATASETS or name in TASKS:
        return name
    for short, spec in MATH_DATASETS.items():
        if name == spec.hub_id:
            return short
    raise ValueError(
        f"dataset name must be one of {sorted(MATH_DATASETS)} (or their Hub ids "
        f"{sorted(spec.hub_id for spec in MATH_DATASETS.values())}) or a synthetic task {sorted(TASKS)}; "
        f"got {name!r}."
    )


def is_synthetic(name: str) -> bool:
    """Whether `name` is an offline synthetic task (`dgpo_trl.tasks`: string prompts, its own reward)."""
    return resolve_dataset_name(name) in TASKS


def default_reward_funcs(name: str) -> list[str]:
    """The reward functions (names in `dgpo_trl.rewards.REWARD_FUNCTIONS`) a dataset trains with by default: a
    synthetic task's own reward, `math_accuracy` for the math sets."""
    from .rewards import REWARD_FUNCTIONS

    short = resolve_dataset_name(name)
    if short not in TASKS:
        return ["math_accuracy"]
    return [next(key for key, reward in REWARD_FUNCTIONS.items() if reward is TASKS[short].reward)]


def math_prompt(
    problem: str, instruction: str | None = REASONING_INSTRUCTION, system_prompt: str | None = None
) -> list:
    """A conversational prompt: an optional system message, then the problem followed by the instruction."""
    content = problem.strip() if instruction is None else f"{problem.strip()}\n\n{instruction}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": content}]


def load_math_dataset(
    name: str,
    split: str | None = None,
    *,
    instruction: str | None = REASONING_INSTRUCTION,
    system_prompt: str | None = None,
    limit: int | None = None,
    load_fn: Callable | None = None,
):
    """One of `MATH_DATASETS` (short name or Hub id) in TRL's conversational prompt format.

    Args:
        name: `"dapo17k"`, `"aime2024"`, `"aime2025"`, `"math500"`, `"gsm8k"` or the matching Hub id.
        split: the split to load; defaults to the set's usual one (see the module docstring).
        instruction: appended to each problem; `None` keeps the problem text as it is (DAPO's wrapper included).
        system_prompt: optional system message.
        limit: keep only the first `limit` problems.
        load_fn: `load_fn(hub_id, name=config, split=split)` returning a `datasets.Dataset`; defaults to
            `datasets.load_dataset` (which downloads). Tests pass an in-memory fake.

    Returns a Dataset with columns `prompt`, `answer`, `id` and `source` (rows with an empty problem or answer are
    dropped: they cannot be scored).
    """
    short = resolve_dataset_name(name)
    if short not in MATH_DATASETS:
        raise ValueError(
            f"{name!r} is a synthetic task; use load_synthetic_dataset (math sets: {sorted(MATH_DATASETS)})."
        )
    spec = MATH_DATASETS[short]
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None or an integer >= 1, got {limit!r}.")
    if load_fn is None:
        from datasets import load_dataset as load_fn
    raw = load_fn(spec.hub_id, name=spec.config, split=split or spec.split)
    missing = {spec.problem_column, spec.answer_column} - set(raw.column_names)
    if missing:
        raise ValueError(
            f"{spec.hub_id} has no column(s) {sorted(missing)} (columns: {raw.column_names}); the Hub dataset changed?"
        )

    from datasets import Dataset

    rows = []
    for index, example in enumerate(raw):
        problem = str(example[spec.problem_column] or "")
        if spec.problem_transform is not None and instruction is not None:
            problem = spec.problem_transform(problem)
        answer = example[spec.answer_column]
        answer = "" if answer is None else str(answer)
        if spec.answer_transform is not None:
            answer = spec.answer_transform(answer)
        if not problem.strip() or not answer.strip():
            continue
        problem_id = example.get(spec.id_column) if spec.id_column else None
        rows.append(
            {
                "prompt": math_prompt(problem, instruction, system_prompt),
                "answer": answer.strip(),
                "id": str(problem_id if problem_id is not None else f"{short}-{index}"),
                "source": short,
            }
        )
        if limit is not None and len(rows) >= limit:
            break
    return Dataset.from_list(rows)


def load_synthetic_dataset(name: str, split: str = "train", *, size: int | None = None, seed: int = 0):
    """An offline synthetic task (a name in `dgpo_trl.tasks.TASKS`) with `prompt`, `answer` and `id` columns.

    `split="test"` draws its problems with a different seed than `"train"`; default sizes 2,000 / 200.
    """
    if name not in TASKS:
        raise ValueError(f"synthetic task must be one of {sorted(TASKS)}, got {name!r}.")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' for synthetic tasks, got {split!r}.")
    if size is None:
        size = 2000 if split == "train" else 200
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}.")
    dataset = TASKS[name].dataset(size, seed=seed if split == "train" else seed + _TEST_SEED_OFFSET)
    return dataset.add_column("id", [f"{name}-{split}-{i}" for i in range(size)])


def load_task(name: str, split: str | None = None, *, limit: int | None = None, seed: int = 0, **math_kwargs):
    """Any dataset this module knows, by short name or Hub id: a math set or a synthetic task."""
    short = resolve_dataset_name(name)
    if short in TASKS:
        return load_synthetic_dataset(short, split or "train", size=limit, seed=seed)
    return load_math_dataset(short, split, limit=limit, **math_kwargs)
