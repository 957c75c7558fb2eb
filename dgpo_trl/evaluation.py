"""The paper's evaluation protocol: n samples per problem, Avg@n, Cons@n and Pass@k.

Section 4.1 of the paper: 32 samples per problem at temperature 1.0 and top-p 0.7; it reports Avg@32 (the mean
accuracy of the samples, i.e. average pass@1), Cons@32 (the accuracy of the majority-voted answer) and Pass@32 (the
probability that at least one of 32 samples is right).

- Metric functions on plain lists: `pass_at_k` (the unbiased estimator of Chen et al. 2021), `majority_vote`,
  `score_problem`, `summarize`.
- Scorers that read answers and judge them: `MathScorer` (math-verify, as `dgpo_trl.rewards`) and `ExactMatchScorer`
  (the synthetic tasks).
- Generators: `VLLMGenerator` when vLLM is installed, `HFGenerator` (transformers `generate`) otherwise.
- `evaluate`: runs a dataset through a generator, writes every finished problem to a JSON file as it goes, and skips
  the problems that file already holds (a killed run resumes where it stopped).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .rewards import (
    DEFAULT_TIMEOUT_SECONDS,
    answers_equivalent,
    completion_text,
    extract_final_answer,
    parse_answer,
)

__all__ = [
    "ExactMatchScorer",
    "HFGenerator",
    "MathScorer",
    "VLLMGenerator",
    "evaluate",
    "format_table",
    "make_generator",
    "majority_vote",
    "pass_at_k",
    "score_problem",
    "scorer_for",
    "summarize",
]

# Settings a results file is tied to: resuming with different values would mix incomparable samples
_RESUME_KEYS = ("model", "dataset", "split", "num_samples", "temperature", "top_p", "max_new_tokens")


# ----------------------------------------------------------------------------------------------------------------
# Metrics


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from `n` samples of which `c` are correct: 1 - C(n - c, k) / C(n, k).

    (Chen et al. 2021, "Evaluating Large Language Models Trained on Code".) Computed as a product so that it stays
    exact for large n. `k` must be in [1, n].
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}.")
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}.")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i = n-c+1}^{n} (1 - k / i)
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_vote(answers: Sequence, same_answer: Callable[[object, object], bool]) -> int | None:
    """Index of the majority answer: the first member of the largest group of equivalent answers.

    `None` answers (no readable answer) do not vote. Each answer joins the first group whose first member it is
    equivalent to. Ties go to the group whose first member appears first. Returns `None` when no answer votes.
    """
    groups: list[list[int]] = []
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if same_answer(answers[group[0]], answer):
                group.append(index)
                break
        else:
            groups.append([index])
    if not groups:
        return None
    largest = max(len(group) for group in groups)
    return next(group[0] for group in groups if len(group) == largest)


class ExactMatchScorer:
    """Scores the synthetic tasks: an answer is right when it equals the gold string.

    A scorer has four methods, used by `score_problem`: `prepare_gold(gold)` (once per problem), `extract(completion)`
    (the answer a sample states, `None` if none), `answer_is_correct(answer, prepared_gold)` and `same_answer(a, b)`
    (the equivalence the majority vote groups by).

    Args:
        stated_answer: reads the answer from a completion's text (a task's `stated_answer`, e.g. the digits after the
            last `=` for `filler`); by default the stripped completion, `None` when empty.
    """

    def __init__(self, stated_answer: Callable[[str], str | None] | None = None):
        self.stated_answer = stated_answer

    def extract(self, completion):
        """The answer the completion states, `None` when none."""
        text = completion_text(completion)
        if self.stated_answer is not None:
            return self.stated_answer(text)
        return text.strip() or None

    def prepare_gold(self, gold):
        """The gold answer as a stripped string."""
        return str(gold).strip()

    def answer_is_correct(self, answer, gold) -> bool:
        """Whether the answer equals the prepared gold string."""
        return answer is not None and answer == gold

    def same_answer(self, a, b) -> bool:
        """String equality."""
        return a == b


class MathScorer:
    """Scores math answers with math-verify, like `dgpo_trl.rewards.math_accuracy_reward`.

    `extract` returns `(text, parsed)` for a completion's final answer (`None` when it states none or it cannot be
    parsed); two answers are the same when math-verify finds them equivalent.
    """

    def __init__(self, timeout_seconds: int = DEFAULT_TIMEOUT_SECONDS):
        self.timeout_seconds = timeout_seconds

    def extract(self, completion):
        """`(text, parsed)` of the final answer; `None` when there is none or math-verify cannot read it."""
        text = extract_final_answer(completion)
        if text is None:
            return None
        parsed = parse_answer(text, self.timeout_seconds)
        return (text, parsed) if parsed else None

    def prepare_gold(self, gold):
        """The gold answer parsed by math-verify (`[]` if unreadable: every sample then counts as wrong)."""
        return parse_answer(None if gold is None else str(gold), self.timeout_seconds)

    def answer_is_correct(self, answer, gold_parsed) -> bool:
        """Whether math-verify finds the extracted answer equivalent to the parsed gold answer."""
        return answer is not None and answers_equivalent(gold_parsed, answer[1], self.timeout_seconds)

    def same_answer(self, a, b) -> bool:
        """Same text, or math-verify-equivalent parses."""
        # Identical text is the common case for a vote over 32 samples; math-verify only for the rest
        return a[0] == b[0] or answers_equivalent(a[1], b[1], self.timeout_seconds)


def scorer_for(dataset_name: str):
    """The scorer of a dataset: for a synthetic task, exact match of the answer a completion states (the task's
    `stated_answer`); math-verify otherwise."""
    from .data import resolve_dataset_name
    from .tasks import TASKS

    short = resolve_dataset_name(dataset_name)
    return ExactMatchScorer(TASKS[short].stated_answer) if short in TASKS else MathScorer()


def score_problem(completions: Sequence, gold, scorer, ks: Sequence[int] = ()) -> dict:
    """Scores the samples of one problem: which are correct, the majority answer, and pass@k for each k in `ks`.

    Returns a JSON-ready dict: `num_samples`, `num_correct`, `correct` (list of bools), `answers` (the extracted
    answer text per sample, `None` where unreadable), `majority_answer`, `majority_correct` and `pass_at_k`
    (`{str(k): value}`). A gold answer the scorer cannot read makes every sample wrong.
    """
    gold_prepared = scorer.prepare_gold(gold)
    answers = [scorer.extract(completion) for completion in completions]
    if gold_prepared in (None, [], ""):
        correct = [False] * len(answers)
    else:
        correct = [scorer.answer_is_correct(answer, gold_prepared) for answer in answers]
    majority = majority_vote(answers, scorer.same_answer)
    n, c = len(completions), sum(correct)
    return {
        "num_samples": n,
        "num_correct": c,
        "correct": correct,
        "answers": [_answer_text(answer) for answer in answers],
        "majority_answer": None if majority is None else _answer_text(answers[majority]),
        "majority_correct": majority is not None and correct[majority],
        "pass_at_k": {str(k): pass_at_k(n, c, k) for k in ks if k <= n},
    }


def _answer_text(answer):
    return answer[0] if isinstance(answer, tuple) else answer


def summarize(problems: dict, ks: Sequence[int]) -> dict:
    """Dataset-level metrics over `{problem_id: score_problem(...) result}`, in [0, 1].

    `avg@n`: mean over problems of the fraction of correct samples; `cons@n`: fraction of problems whose majority
    answer is correct; `pass@k`: mean over problems of the unbiased pass@k (recomputed from the stored counts, so
    any k <= n can be asked for after the fact).
    """
    results = list(problems.values())
    if not results:
        return {"num_problems": 0}
    n = min(result["num_samples"] for result in results)
    summary = {
        "num_problems": len(results),
        "num_samples": n,
        f"avg@{n}": sum(r["num_correct"] / r["num_samples"] for r in results) / len(results),
        f"cons@{n}": sum(bool(r["majority_correct"]) for r in results) / len(results),
    }
    for k in ks:
        if k > n:
            raise ValueError(f"pass@k needs k <= num_samples={n}, got k={k}.")
        summary[f"pass@{k}"] = sum(pass_at_k(r["num_samples"], r["num_correct"], k) for r in results) / len(results)
    return summary


def format_table(summary: dict, title: str | None = None) -> str:
    """A Markdown table of a summary's metrics, as percentages."""
    metrics = [key for key in summary if "@" in key]
    header = "| problems | " + " | ".join(key.capitalize() for key in metrics) + " |"
    rule = "|---:|" + "---:|" * len(metrics)
    row = f"| {summary.get('num_problems', 0)} | " + " | ".join(f"{100 * summary[key]:.1f}" for key in metrics) + " |"
    return "\n".join(([f"**{title}**", ""] if title else []) + [header, rule, row])


# ----------------------------------------------------------------------------------------------------------------
# Generation


def _render_prompt(tokenizer, prompt) -> str:
    """A prompt as text: conversations go through the chat template, strings are used as they are."""
    if isinstance(prompt, str):
        return prompt
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


class HFGenerator:
    """Samples completions with transformers' `generate` (any device; the fallback when vLLM is not installed).

    Args:
        model_name_or_path: a Hub id or local path (loaded with `AutoModelForCausalLM`).
        batch_size: completions generated per `generate` call (prompts per call = max(1, batch_size // n)).
        dtype: `"auto"`, `"bfloat16"`, `"float32"`, ...
        device: defaults to CUDA when available, else CPU.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        batch_size: int = 64,
        dtype: str = "auto",
        device: str | None = None,
        trust_remote_code: bool = False,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"  # decoder-only batched generation continues from the right edge
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(
            model_name_or_path, dtype=dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        self.batch_size = batch_size

    def generate(
        self,
        prompts: Sequence,
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[str]]:
        """`n` sampled completions (text, special tokens removed) for each prompt."""
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        texts = [_render_prompt(self.tokenizer, prompt) for prompt in prompts]
        per_call = max(1, self.batch_size // n)
        outputs: list[list[str]] = []
        # temperature 0 means greedy decoding (transformers rejects do_sample with temperature 0)
        sampling = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p}
        for start in range(0, len(texts), per_call):
            chunk = texts[start : start + per_call]
            batch = self.tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
            with torch.no_grad():
                generated = self.model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    num_return_sequences=n,
                    pad_token_id=self.tokenizer.pad_token_id,
                    **sampling,
                )
            new_tokens = generated[:, batch["input_ids"].shape[1] :]
            decoded = self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
            outputs.extend(decoded[i : i + n] for i in range(0, len(decoded), n))
        return outputs


class VLLMGenerator:
    """Samples completions with vLLM's offline `LLM` engine (`pip install vllm`; a GPU)."""

    def __init__(
        self,
        model_name_or_path: str,
        *,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.9,
        max_model_len: int | None = None,
        seed: int = 0,
        trust_remote_code: bool = False,
    ):
        from vllm import LLM

        self.llm = LLM(
            model=model_name_or_path,
            dtype=dtype,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            max_model_len=max_model_len,
            seed=seed,
            trust_remote_code=trust_remote_code,
        )
        self.tokenizer = self.llm.get_tokenizer()

    def generate(
        self,
        prompts: Sequence,
        *,
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> list[list[str]]:
        """`n` sampled completions for each prompt (vLLM batches and schedules them itself)."""
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens, seed=seed)
        texts = [_render_prompt(self.tokenizer, prompt) for prompt in prompts]
        results = self.llm.generate(texts, params, use_tqdm=False)
        return [[output.text for output in result.outputs] for result in results]


def make_generator(model_name_or_path: str, backend: str = "auto", **kwargs):
    """`VLLMGenerator` (backend `"vllm"`, or `"auto"` with vLLM installed) or `HFGenerator` (`"hf"`, or `"auto"`).

    Keyword arguments a backend does not take are dropped (e.g. `batch_size` for vLLM).
    """
    if backend not in ("auto", "vllm", "hf"):
        raise ValueError(f"backend must be one of ['auto', 'vllm', 'hf'], got {backend!r}.")
    use_vllm = backend == "vllm" or (backend == "auto" and importlib.util.find_spec("vllm") is not None)
    if use_vllm:
        if importlib.util.find_spec("vllm") is None:
            raise ValueError("backend='vllm' needs vLLM installed (pip install vllm); use backend='hf' or 'auto'.")
        keys = ("dtype", "tensor_parallel_size", "gpu_memory_utilization", "max_model_len", "seed")
        keys += ("trust_remote_code",)
        return VLLMGenerator(model_name_or_path, **{k: v for k, v in kwargs.items() if k in keys})
    keys = ("batch_size", "dtype", "device", "trust_remote_code")
    return HFGenerator(model_name_or_path, **{k: v for k, v in kwargs.items() if k in keys})


# ----------------------------------------------------------------------------------------------------------------
# The protocol


def _load_results(path: Path, config: dict) -> dict:
    if not path.exists():
        return {"config": config, "problems": {}}
    with open(path) as f:
        results = json.load(f)
    for key in _RESUME_KEYS:
        stored = results.get("config", {}).get(key)
        if stored != config.get(key):
            raise ValueError(
                f"{path} holds results for {key}={stored!r}, but this run has {key}={config.get(key)!r}: resuming "
                "would mix incomparable samples. Use another output file, or the same settings."
            )
    results.setdefault("problems", {})
    return results


def _write_json(path: Path, payload: dict) -> None:
    # Write-then-rename: a run killed mid-write leaves the previous complete file, never a truncated one
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def evaluate(
    dataset,
    generator,
    scorer,
    *,
    num_samples: int = 32,
    temperature: float = 1.0,
    top_p: float = 0.7,
    max_new_tokens: int = 3072,
    ks: Sequence[int] | None = None,
    output_path: str | os.PathLike | None = None,
    problems_per_batch: int = 8,
    save_completions: bool = True,
    seed: int = 0,
    model_name: str | None = None,
    dataset_name: str | None = None,
    split: str | None = None,
    progress: bool = True,
) -> dict:
    """Runs the paper's protocol over `dataset` (rows with `prompt`, `answer`, `id`) and returns the results.

    Args:
        num_samples: n, samples per problem (paper: 32).
        temperature, top_p: sampling settings (paper: 1.0 and 0.7).
        ks: the k of each Pass@k to report (each <= n); defaults to `[num_samples]`.
        output_path: JSON file written after every batch of problems. If it exists, the problems it holds are skipped
            (their stored scores count in the summary); it must have been made with the same model, dataset, split, n,
            temperature, top-p and max_new_tokens, else `ValueError`.
        problems_per_batch: problems sent to the generator at once (and saved together).
        save_completions: store every sample's text in the JSON (large for long reasoning traces).

    Returns `{"config", "problems": {id: score_problem(...) + prompt/gold}, "summary": summarize(...)}`.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}.")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}.")
    ks = list(ks) if ks else [num_samples]
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_samples:
            raise ValueError(f"each k of pass@k must be an integer in [1, num_samples={num_samples}], got {k!r}.")
    missing = {"prompt", "answer"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the dataset needs columns 'prompt' and 'answer'; missing {sorted(missing)}.")
    config = {
        "model": model_name,
        "dataset": dataset_name,
        "split": split,
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "seed": seed,
    }
    path = Path(output_path) if output_path is not None else None
    results = _load_results(path, config) if path is not None else {"config": config, "problems": {}}
    has_ids = "id" in dataset.column_names
    ids = [str(row_id) for row_id in dataset["id"]] if has_ids else [str(i) for i in range(len(dataset))]
    if len(set(ids)) != len(ids):
        raise ValueError("problem ids must be unique (the results file is keyed by them).")
    todo = [i for i, problem_id in enumerate(ids) if problem_id not in results["problems"]]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(ids), initial=len(ids) - len(todo), desc="evaluating", unit="problem")
    for start in range(0, len(todo), problems_per_batch):
        rows = [dataset[i] for i in todo[start : start + problems_per_batch]]
        samples = generator.generate(
            [row["prompt"] for row in rows],
            n=num_samples,
            temperature=temperature,
            top_p=top_p,
            max_new_tokens=max_new_tokens,
            seed=seed + todo[start],  # deterministic per batch, whatever was done before a resume
        )
        for index, row, completions in zip(todo[start : start + problems_per_batch], rows, samples):
            result = score_problem(completions, row["answer"], scorer, ks)
            result["gold"] = str(row["answer"])
            result["prompt"] = row["prompt"]
            if save_completions:
                result["completions"] = list(completions)
            results["problems"][ids[index]] = result
        results["summary"] = summarize(_in_dataset(results["problems"], ids), ks)
        if path is not None:
            _write_json(path, results)
        if bar is not None:
            bar.update(len(rows))
    if bar is not None:
        bar.close()
    results["summary"] = summarize(_in_dataset(results["problems"], ids), ks)
    if path is not None:
        _write_json(path, results)
    return results


def _in_dataset(problems: dict, ids: Sequence[str]) -> dict:
    """The stored problems that belong to this dataset (a results file may hold more, e.g. after `--limit`)."""
    wanted = set(ids)
    return {problem_id: result for problem_id, result in problems.items() if problem_id in wanted}
