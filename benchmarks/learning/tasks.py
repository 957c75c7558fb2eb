"""The study's tasks: the built-in string reversal, and a filler-then-answer task where credit assignment matters.

Each task gives three disjoint prompt sets (SFT warm-up, RL training, held-out evaluation), the SFT target of a
prompt, and a TRL reward function. Prompts are plain strings (standard, non-conversational format).

- ``reversal`` (built in, `dgpo_trl.tiny`): ``r12345>`` -> ``54321``: 3-6 completion tokens + EOS, every one of which
  decides the reward.
- ``filler``: ``f3825>`` -> ``<k random letters>=5283``: the model first writes k in [FILLER_MIN, FILLER_MAX] letters
  drawn uniformly from FILLER_LETTERS (free, high-entropy tokens the reward ignores), then ``=`` and the reversed
  digits. Only the 3-4 digits after the last ``=`` decide the reward, out of ~12-18 completion tokens: a sequence-level
  advantage spread uniformly (GRPO) lands mostly on tokens that do not matter, which is the situation DGPO's token
  reallocation is meant for. The filler is deliberately high-entropy, so the entropy gate cannot single out the
  answer tokens by entropy alone: the divergence from the reference has to do it.

Each also comes in vocabulary-scale variants, ``<task>_v<V>`` for V in `VOCAB_SIZES` (``reversal_v99``,
``reversal_v32000``, ``filler_v151936``, ...): the same prompts, rewards and tokenizer, with the model's vocabulary
(embedding and LM-head rows) padded with tokens the data never uses up to V rows: LLaMA-2's 32,000 and Qwen2.5's
151,936 (log V 4.6 -> 10.4 -> 11.9). ``_v99`` is the tokenizer's own vocabulary, not padded: the same short runs at
V = 99, for the comparison. How the padded rows are initialised, and what happens when one is sampled, is
`study.py`'s business (`pad_warmup`).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, replace
from typing import Callable


FILLER_LETTERS = "abcdefgh"
FILLER_MIN, FILLER_MAX = 8, 12


def _digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(lo, hi)))


def reversal_prompt(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng, 3, 6)
    return f"r{digits}>", digits[::-1]


def filler_prompt(rng: random.Random) -> tuple[str, str]:
    digits = _digits(rng, 3, 4)
    return f"f{digits}>", digits[::-1]


def reversal_target(answer: str, rng: random.Random) -> str:
    return answer


def filler_target(answer: str, rng: random.Random) -> str:
    filler = "".join(rng.choice(FILLER_LETTERS) for _ in range(rng.randint(FILLER_MIN, FILLER_MAX)))
    return f"{filler}={answer}"


def exact_match_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion (EOS removed, stripped) equals the answer."""
    return [1.0 if c.strip() == a else 0.0 for c, a in zip(completions, answer)]


def final_answer_reward(completions, answer, **kwargs) -> list[float]:
    """1.0 when the completion contains ``=`` and the text after its last ``=`` equals the answer; the filler before
    it is ignored."""
    return [1.0 if "=" in c and c.rsplit("=", 1)[1].strip() == a else 0.0 for c, a in zip(completions, answer)]


def answer_positions(tokens: list[str]) -> list[bool]:
    """For a filler completion's tokens (one character each, EOS included): True from the last ``=`` on (the tokens
    the reward reads), False on the filler before it; all False when there is no ``=``."""
    if "=" not in tokens:
        return [False] * len(tokens)
    start = len(tokens) - 1 - tokens[::-1].index("=")
    return [i >= start for i in range(len(tokens))]


@dataclass(frozen=True)
class Task:
    name: str
    make_prompt: Callable[[random.Random], tuple[str, str]]  # rng -> (prompt, answer)
    sft_target: Callable[[str, random.Random], str]  # (answer, rng) -> completion the warm-up trains on
    reward: Callable
    max_completion_length: int
    description: str
    # tokens -> which of them decide the reward; None when every token does
    decisive: Callable[[list[str]], list[bool]] | None = None
    # Vocabulary-scale variant: the model's vocabulary is padded to this many rows, starting from the warm-up of the
    # task `base` (None: the tokenizer's own vocabulary, no padding)
    vocab_size: int | None = None
    base: str | None = None

    def splits(self, seed: int, n_sft: int, n_train: int, n_eval: int, n_val: int = 128) -> dict[str, list[dict]]:
        """Disjoint prompt sets ``{"sft", "val", "train", "eval"}`` of ``{"prompt", "answer"}`` rows: the warm-up
        trains on ``sft`` and decides when to stop on ``val``, RL trains on ``train``, the held-out evaluation uses
        ``eval``.
        The SFT rows' answer is the full completion the warm-up trains on (for ``filler``: letters, ``=``, digits)."""
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
                prompt, answer = self.make_prompt(rng)
                if prompt in seen:
                    continue
                seen.add(prompt)
                rows.append({"prompt": prompt, "answer": answer})
            out[split] = rows
        out["sft"] = [{"prompt": r["prompt"], "answer": self.sft_target(r["answer"], rng)} for r in out["sft"]]
        return out


BASE_TASKS: dict[str, Task] = {
    "reversal": Task(
        "reversal",
        reversal_prompt,
        reversal_target,
        exact_match_reward,
        max_completion_length=8,
        description="r12345> -> 54321 (3-6 digits); every completion token decides the reward",
    ),
    "filler": Task(
        "filler",
        filler_prompt,
        filler_target,
        final_answer_reward,
        max_completion_length=20,
        description=(
            f"f3825> -> {FILLER_MIN}-{FILLER_MAX} random letters from '{FILLER_LETTERS}', '=', then the reversed 3-4 "
            "digits; only the digits after the last '=' decide the reward"
        ),
        decisive=answer_positions,
    ),
}


NATIVE_VOCAB_SIZE = 99  # the char tokenizer of `dgpo_trl.tiny` (4 specials + 95 characters); the tests check it
VOCAB_SIZES = (NATIVE_VOCAB_SIZE, 32000, 151936)  # ours, LLaMA-2 / Mistral, Qwen2.5


def padded(task: Task, vocab_size: int) -> Task:
    """`task` with the model's vocabulary padded to `vocab_size` rows (same prompts, rewards and tokenizer)."""
    what = "not padded" if vocab_size == NATIVE_VOCAB_SIZE else f"padded to {vocab_size:,} rows"
    return replace(
        task,
        name=f"{task.name}_v{vocab_size}",
        description=f"{task.description}; model vocabulary {what}",
        vocab_size=vocab_size,
        base=task.name,
    )


TASKS: dict[str, Task] = {
    **BASE_TASKS,
    **{f"{t.name}_v{v}": padded(t, v) for v in VOCAB_SIZES for t in BASE_TASKS.values()},
}
