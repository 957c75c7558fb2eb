"""Reward functions for math reasoning, in the form TRL's `GRPOTrainer`/`DGPOTrainer` call them.

A TRL reward function takes `completions` (strings, or lists of chat messages for conversational data) plus one
keyword argument per dataset column, and returns one float per completion, or `None` where the completion cannot be
scored (TRL then leaves it out of that reward's statistics).

- `math_accuracy_reward` / `MathAccuracyReward`: 1.0 when the completion's final answer (its last `\\boxed{...}`, or
  an `Answer: ...` line as in DAPO's prompt) is mathematically equivalent to the gold answer under `math-verify`;
  0.0 when it is not, or when the completion states no readable answer; `None` when the gold answer itself cannot be
  parsed. Every parse and comparison runs under math-verify's timeout, so pathological inputs (e.g. `10^{10^{10}}`)
  score 0.0 instead of hanging.
- `format_reward`: 1.0 when the completion states a final answer the accuracy reward can read.
- `overlong_penalty`: DAPO's soft overlong punishment (Eq. 13 of arXiv 2503.14476), TRL's own implementation.
- `REWARD_FUNCTIONS`: these and the synthetic tasks' rewards (`dgpo_trl.tasks`), by the names
  `examples/dgpo.py --reward_funcs` takes.

`extract_final_answer`, `parse_answer` and `answers_equivalent` are the building blocks the evaluation's majority
vote (Cons@n) uses too.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Sequence

from .tasks import exact_match_reward, final_answer_reward

__all__ = [
    "REWARD_FUNCTIONS",
    "MathAccuracyReward",
    "answers_equivalent",
    "completion_text",
    "extract_final_answer",
    "format_reward",
    "get_reward_function",
    "math_accuracy_reward",
    "overlong_penalty",
    "parse_answer",
]

DEFAULT_TIMEOUT_SECONDS = 5
"""Seconds math-verify may spend on one parse or one comparison before the answer counts as unreadable/wrong."""

MAX_ANSWER_CHARS = 1000
"""Longer extracted answers are not parsed: no real answer is that long, and sympy can stall on such inputs."""

_BOXED = re.compile(r"\\(?:boxed|fbox)[ \t]*\{")
# No two adjacent quantifiers over overlapping characters: a line of spaces must not make the match quadratic
_ANSWER_LINE = re.compile(r"^[ \t*]*(?:final[ \t]+)?answer[ \t*]*:(.*)$", re.IGNORECASE | re.MULTILINE)


def completion_text(completion) -> str:
    """The text of a completion as TRL passes it: a string, or a list of chat messages (the last one's content)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content") or "")
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return ""


def _boxed_contents(text: str) -> list[str]:
    """The contents of every closed `\\boxed{...}` (or `\\fbox{...}`) in `text`, nested braces balanced, in the order
    the boxes open. One pass with a brace stack: linear even for thousands of unclosed boxes."""
    box_braces = {match.end() - 1 for match in _BOXED.finditer(text)}
    open_braces, closed = [], []
    for i, char in enumerate(text):
        if char == "{":
            open_braces.append(i)
        elif char == "}" and open_braces:
            start = open_braces.pop()
            if start in box_braces:
                closed.append((start, text[start + 1 : i]))
    return [content for _, content in sorted(closed)]


def extract_final_answer(completion) -> str | None:
    """The final answer a completion states, as text, or `None` when it states none.

    The last closed `\\boxed{...}` wins (the convention of the reasoning instruction in `dgpo_trl.data`); otherwise the
    last `Answer: ...` line (DAPO's prompt format). Surrounding `$` delimiters of an `Answer:` line are kept: they
    are LaTeX for `parse_answer`.
    """
    text = completion_text(completion)
    if not text:
        return None
    boxed = [content.strip() for content in _boxed_contents(text)]
    boxed = [content for content in boxed if content]
    if boxed:
        return boxed[-1]
    lines = _ANSWER_LINE.findall(text)
    if lines:
        # Markdown emphasis and a closing period are not part of the answer: "**Answer:** **12**." -> "12"
        answer = lines[-1].strip().strip("*").strip().rstrip(".").strip("*").strip()
        return answer or None
    return None


def _timeouts(timeout_seconds: int | None) -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread (TRL's async reward path and
    # some servers call rewards from worker threads); there, the answer-length cap is the only guard.
    if threading.current_thread() is not threading.main_thread():
        logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
        logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
        return None
    return timeout_seconds


def parse_answer(answer: str | None, timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS) -> list:
    """Parses an answer string with math-verify: as LaTeX first, then as a plain expression. `[]` if unreadable.

    `answer` is a bare answer (`"\\frac{1}{3}"`, `"1/3"`, `"34"`), an answer with its own `$...$`/`\\boxed{}`
    delimiters, or `None`. The result is what `math_verify.verify` compares.
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    if answer is None:
        return []
    answer = str(answer).strip()
    if not answer or len(answer) > MAX_ANSWER_CHARS:
        return []
    timeout = _timeouts(timeout_seconds)
    # Bare LaTeX needs delimiters for math-verify's LaTeX extractor: parse("3\\pi") reads just "3"
    latex = answer if ("$" in answer or "\\boxed" in answer) else f"\\boxed{{{answer}}}"
    try:
        parsed = parse(
            latex,
            extraction_config=[LatexExtractionConfig(boxed_match_priority=0)],
            parsing_timeout=timeout,
        )
        if not parsed:
            parsed = parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=timeout)
    except Exception:  # math-verify swallows most errors itself; anything left means "unreadable"
        return []
    return list(parsed)


def answers_equivalent(
    gold_parsed: list, answer_parsed: list, timeout_seconds: int | None = DEFAULT_TIMEOUT_SECONDS
) -> bool:
    """Whether two parsed answers are mathematically equivalent (math-verify; gold first, it is not symmetric)."""
    from math_verify import verify

    if not gold_parsed or not answer_parsed:
        return False
    try:
        return bool(verify(gold_parsed, answer_parsed, timeout_seconds=_timeouts(timeout_seconds)))
    except Exception:
        return False


class MathAccuracyReward:
    """Math accuracy reward with a configurable timeout; `math_accuracy_reward` is the default instance.

    Args:
        timeout_seconds: seconds (an integer >= 1) math-verify may spend per parse and per comparison.
        answer_column: the dataset column holding the gold answer (TRL passes it as a keyword argument).

    Calling it returns, per completion: 1.0 (equivalent to the gold answer), 0.0 (wrong, or no readable final
    answer), or `None` (the gold answer is unparsable, so the example cannot be scored).
    """

    def __init__(self, timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS, answer_column: str = "answer"):
        if isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, int) or timeout_seconds < 1:
            raise ValueError(
                f"timeout_seconds must be an integer >= 1 (math-verify's alarm), got {timeout_seconds!r}."
            )
        self.timeout_seconds = timeout_seconds
        self.answer_column = answer_column
        # TRL names the reward's metrics after __name__ (an instance, unlike a closure, also pickles)
        self.__name__ = "math_accuracy_reward"

    def score(self, completion, gold) -> float | None:
        """The reward of one completion against one gold answer."""
        gold_parsed = parse_answer(None if gold is None else str(gold), self.timeout_seconds)
        if not gold_parsed:
            return None
        answer = extract_final_answer(completion)
        if answer is None:
            return 0.0
        answer_parsed = parse_answer(answer, self.timeout_seconds)
        return 1.0 if answers_equivalent(gold_parsed, answer_parsed, self.timeout_seconds) else 0.0

    def __call__(self, completions, log_extra: Callable | None = None, **kwargs) -> list[float | None]:
        if self.answer_column not in kwargs:
            raise ValueError(
                f"math_accuracy_reward needs the gold answers in the dataset column {self.answer_column!r}; the "
                f"columns passed were {sorted(k for k in kwargs if k not in ('trainer_state', 'log_metric'))}."
            )
        golds = kwargs[self.answer_column]
        if len(golds) != len(completions):
            raise ValueError(f"got {len(completions)} completions but {len(golds)} gold answers.")
        rewards = [self.score(completion, gold) for completion, gold in zip(completions, golds)]
        if log_extra is not None:  # extra columns in TRL's completions table
            log_extra("extracted_answer", [extract_final_answer(c) or "" for c in completions])
        return rewards


math_accuracy_reward = MathAccuracyReward()


def format_reward(completions, **kwargs) -> list[float]:
    """1.0 when the completion states a final answer `math_accuracy_reward` can read (a closed `\\boxed{...}` or an
    `Answer: ...` line), else 0.0. Correctness is not checked."""
    return [0.0 if extract_final_answer(completion) is None else 1.0 for completion in completions]


def overlong_penalty(max_completion_length: int, buffer_length: int) -> Callable:
    """DAPO's soft overlong punishment (arXiv 2503.14476, Eq. 13), built with TRL's `get_soft_overlong_punishment`.

    0 for completions of at most `max_completion_length - buffer_length` tokens, then falling linearly to -1 at
    `max_completion_length`, and -1 beyond. DAPO used a 4,096-token buffer with a 20,480-token maximum.
    """
    from trl.rewards import get_soft_overlong_punishment

    for name, value in (("max_completion_length", max_completion_length), ("buffer_length", buffer_length)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if not 0 < buffer_length <= max_completion_length:
        raise ValueError(
            f"buffer_length must be in [1, max_completion_length={max_completion_length}], got {buffer_length}."
        )
    return get_soft_overlong_punishment(max_completion_len=max_completion_length, soft_punish_cache=buffer_length)


REWARD_FUNCTIONS: dict[str, Callable] = {
    "math_accuracy": math_accuracy_reward,
    "format": format_reward,
    "exact_match": exact_match_reward,
    "final_answer": final_answer_reward,
}
"""Rewards `examples/dgpo.py --reward_funcs` accepts by name (the overlong penalty is built from its own options)."""


def get_reward_function(name: str) -> Callable:
    """A reward function by registry name (see `REWARD_FUNCTIONS`) or dotted import path (`my_pkg.rewards.fn`)."""
    if name in REWARD_FUNCTIONS:
        return REWARD_FUNCTIONS[name]
    if "." in name:
        import importlib

        module_name, _, attribute = name.rpartition(".")
        try:
            return getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"reward function {name!r} could not be imported: {error}") from error
    raise ValueError(
        f"reward_funcs entries must be one of {sorted(REWARD_FUNCTIONS)} or a dotted import path, got {name!r}."
    )
