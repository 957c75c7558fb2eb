"""Offline synthetic tasks: prompts a tiny model learns in seconds to minutes, their answers and rewards.

Every task draws plain-string prompts (standard, non-conversational format: the tiny tokenizer has no chat template)
from a `random.Random`, knows the expected answer of each of its prompts (`Task.expected_answer`, what heatmaps show
beside a completion), reads the answer a completion states (`Task.stated_answer`) and has a TRL reward function.

| name       | prompt -> completion              | completion tokens                          | reward                |
|------------|-----------------------------------|--------------------------------------------|-----------------------|
| `reversal` | `r12345>` -> `54321`              | 3-6 digits + EOS, each decides the reward  | `exact_match_reward`  |
| `addition` | `a3+4=` -> `7`                    | 1-2 digits + EOS                           | `exact_match_reward`  |
| `filler`   | `f3825>` -> `<8-12 letters>=5283` | 12-17 + EOS; the digits after the last `=` | `final_answer_reward` |

`filler` is built for credit assignment: its letters are free, high-entropy tokens the reward ignores (drawn uniformly
from `FILLER_LETTERS`), so a sequence-level advantage spread uniformly (GRPO) lands mostly on tokens that do not
matter, and the entropy gate cannot single out the answer tokens by entropy alone. Its dataset rows hold the digits
(`answer`, what the reward compares); `Task.sft_target` gives a full completion to warm a model up on.

`Task.dataset(n, seed)` is a `datasets.Dataset` with `prompt` and `answer` columns (TRL passes `answer=` to the reward
functions); `Task.splits(...)` draws disjoint prompt sets for a warm-up, RL and a held-out evaluation.
"""

from __future__ import annotations

import random
import re
import string
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "ADDITION",
    "FILLER",
    "FILLER_LETTERS",
    "REVERSAL",
    "TASKS",
    "Task",
    "answer_positions",
    "exact_match_reward",
    "final_answer_reward",
    "reversal_dataset",
]

FILLER_LETTERS = "abcdefgh"
FILLER_MIN, FILLER_MAX = 8, 12


def _digits(rng: random.Random, min_digits: int, max_digits: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(min_digits, max_digits)))


def _after_last_equals(completion: str) -> str | None:
    return completion.rsplit("=", 1)[1].strip() if "=" in completion else None


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion (before EOS, stripped) equals the answer, else 0.0. A TRL reward function."""
    return [1.0 if completion.strip() == target else 0.0 for completion, target in zip(completions, answer)]


def final_answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion contains `=` and the text after its last `=` equals the answer; what comes before it
    is ignored. A TRL reward function."""
    return [1.0 if _after_last_equals(c) == target else 0.0 for c, target in zip(completions, answer)]


def answer_positions(tokens: list[str]) -> list[bool]:
    """For a `filler` completion's tokens (one character each, EOS included): True from the last `=` on (the tokens
    the reward reads), False on the filler before it; all False when there is no `=`."""
    if "=" not in tokens:
        return [False] * len(tokens)
    start = len(tokens) - 1 - tokens[::-1].index("=")
    return [i >= start for i in range(len(tokens))]


@dataclass(frozen=True)
class Task:
    """A synthetic task: how to draw a prompt, the answer of a prompt, how to read a completion's answer, the reward.

    `make_prompt(rng, **options)` draws one prompt; `solve(prompt)` is its answer, `None` for text that is not one of
    the task's prompts. `stated_answer(completion)` is the answer a completion states (`None`: none), and `reward`
    (a TRL reward function) gives 1.0 exactly when it equals the answer. `sft_target(answer, rng)` is the completion a
    supervised warm-up trains on (`None`: the answer itself). `decisive(tokens)` says which of a completion's tokens
    decide the reward (`None`: every one).
    """

    name: str
    description: str
    make_prompt: Callable[..., str]
    solve: Callable[[str], str | None]
    stated_answer: Callable[[str], str | None]
    reward: Callable
    max_completion_length: int
    sft_target: Callable[[str, random.Random], str] | None = None
    decisive: Callable[[list[str]], list[bool]] | None = None

    def expected_answer(self, prompt: str) -> str | None:
        """The answer of `prompt` (surrounding whitespace ignored); `None` for text that is not one of its prompts."""
        return self.solve(prompt.strip())

    def example(self, rng: random.Random, **options) -> dict:
        """One `{"prompt", "answer"}` row; `options` go to `make_prompt` (e.g. `max_digits` for reversal)."""
        prompt = self.make_prompt(rng, **options)
        return {"prompt": prompt, "answer": self.solve(prompt)}

    def dataset(self, n: int, seed: int = 0, **options):
        """A `datasets.Dataset` of `n` rows `{"prompt", "answer"}` drawn with `random.Random(seed)`."""
        from datasets import Dataset

        rng = random.Random(seed)
        return Dataset.from_list([self.example(rng, **options) for _ in range(n)])

    def splits(self, seed: int, n_sft: int, n_train: int, n_eval: int, n_val: int = 128) -> dict[str, list[dict]]:
        """Disjoint prompt sets `{"sft", "val", "train", "eval"}` of `{"prompt", "answer"}` rows: a warm-up trains on
        `sft` and decides when to stop on `val`, RL trains on `train`, a held-out evaluation uses `eval`. The `sft`
        rows' answer is the completion the warm-up trains on (`sft_target`)."""
        rng = random.Random(seed)
        seen: set[str] = set()
        out: dict[str, list[dict]] = {}
        for split, n in (("eval", n_eval), ("val", n_val), ("train", n_train), ("sft", n_sft)):
            rows = []
            attempts = 0
            while len(rows) < n:
                attempts += 1
                if attempts > 100 * n + 1000:
                    raise ValueError(f"task {self.name}: cannot draw {n} distinct {split} prompts")
                row = self.example(rng)
                if row["prompt"] in seen:
                    continue
                seen.add(row["prompt"])
                rows.append(row)
            out[split] = rows
        if self.sft_target is not None:
            out["sft"] = [{"prompt": r["prompt"], "answer": self.sft_target(r["answer"], rng)} for r in out["sft"]]
        return out


def _reversal_prompt(rng: random.Random, min_digits: int = 3, max_digits: int = 6) -> str:
    return f"r{_digits(rng, min_digits, max_digits)}>"


def _reversal_answer(prompt: str) -> str | None:
    match = re.fullmatch(r"r(\d+)>", prompt)
    return match[1][::-1] if match else None


def _addition_prompt(rng: random.Random) -> str:
    return f"a{rng.randrange(10)}+{rng.randrange(10)}="


def _addition_answer(prompt: str) -> str | None:
    match = re.fullmatch(r"a(\d)\+(\d)=", prompt)
    return str(int(match[1]) + int(match[2])) if match else None


def _filler_prompt(rng: random.Random) -> str:
    return f"f{_digits(rng, 3, 4)}>"


def _filler_answer(prompt: str) -> str | None:
    match = re.fullmatch(r"f(\d+)>", prompt)
    return match[1][::-1] if match else None


def _filler_target(answer: str, rng: random.Random) -> str:
    filler = "".join(rng.choice(FILLER_LETTERS) for _ in range(rng.randint(FILLER_MIN, FILLER_MAX)))
    return f"{filler}={answer}"


def _whole_completion(completion: str) -> str | None:
    return completion.strip() or None


REVERSAL = Task(
    "reversal",
    "r12345> -> 54321 (3-6 digits); every completion token decides the reward",
    make_prompt=_reversal_prompt,
    solve=_reversal_answer,
    stated_answer=_whole_completion,
    reward=exact_match_reward,
    max_completion_length=8,
)
ADDITION = Task(
    "addition",
    "a3+4= -> 7 (single digits); every completion token decides the reward",
    make_prompt=_addition_prompt,
    solve=_addition_answer,
    stated_answer=_whole_completion,
    reward=exact_match_reward,
    max_completion_length=4,
)
FILLER = Task(
    "filler",
    f"f3825> -> {FILLER_MIN}-{FILLER_MAX} random letters from '{FILLER_LETTERS}', '=', then the reversed 3-4 digits; "
    "only the digits after the last '=' decide the reward",
    make_prompt=_filler_prompt,
    solve=_filler_answer,
    stated_answer=_after_last_equals,
    reward=final_answer_reward,
    max_completion_length=20,
    sft_target=_filler_target,
    decisive=answer_positions,
)

TASKS: dict[str, Task] = {task.name: task for task in (REVERSAL, ADDITION, FILLER)}
"""Every synthetic task, by name."""


def reversal_dataset(n: int, seed: int = 0, min_digits: int = 3, max_digits: int = 6):
    """A `datasets.Dataset` of `n` string-reversal prompts (`r12345>`, answer `54321`) of `min_digits` to
    `max_digits` digits."""
    return REVERSAL.dataset(n, seed, min_digits=min_digits, max_digits=max_digits)
