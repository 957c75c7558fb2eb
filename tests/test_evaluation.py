"""The evaluation protocol: metric functions against hand counts, resumable JSON results, generator backends."""

import importlib.machinery
import json
import math
import sys
import types

import pytest
from datasets import Dataset

from dgpo_trl.data import load_synthetic_dataset
from dgpo_trl.evaluation import (
    ExactMatchScorer,
    HFGenerator,
    MathScorer,
    evaluate,
    format_table,
    majority_vote,
    make_generator,
    pass_at_k,
    score_problem,
    summarize,
)

# ----------------------------------------------------------------------------------------------------------------
# Metrics on hand-made samples


@pytest.mark.parametrize(
    ("n", "c", "k", "expected"),
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (8, 0, 8, 0.0),
        (8, 1, 8, 1.0),  # n - c < k: every k-subset holds the correct sample
        (32, 4, 1, 0.125),
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_the_binomial_formula():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_rejects_bad_arguments():
    for args in [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5), (0, 0, 1), (4.0, 1, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)


def test_majority_vote():
    same = str.__eq__
    assert majority_vote(["3", "5", "3", None, "5", "5"], same) == 1  # "5": 3 votes, first at index 1
    assert majority_vote(["a", "b", "b", "a"], same) == 0  # tie: the group seen first
    assert majority_vote([None, None], same) is None
    assert majority_vote([], same) is None


def test_score_problem_with_math_equivalence():
    completions = [
        r"\boxed{0.5}",
        r"so \boxed{\frac{1}{2}}",
        r"\boxed{1/3}",
        "Answer: 1/3",
        r"\boxed{\frac{2}{6}}",
        "no final answer",
    ]
    result = score_problem(completions, "1/2", MathScorer(), ks=[1, 2, 6])
    assert result["correct"] == [True, True, False, False, False, False]
    assert result["num_correct"] == 2 and result["num_samples"] == 6
    assert result["answers"] == ["0.5", r"\frac{1}{2}", "1/3", "1/3", r"\frac{2}{6}", None]
    # {0.5, 1/2}: 2 votes; {1/3, 1/3, 2/6}: 3 votes (math-verify equivalence, not string equality)
    assert result["majority_answer"] == "1/3" and result["majority_correct"] is False
    assert result["pass_at_k"] == pytest.approx({"1": 2 / 6, "2": 1 - math.comb(4, 2) / math.comb(6, 2), "6": 1.0})


def test_unreadable_gold_makes_every_sample_wrong():
    result = score_problem([r"\boxed{1}", r"\boxed{1}"], "", MathScorer(), ks=[1])
    assert result["correct"] == [False, False] and result["majority_correct"] is False


def test_summarize_against_hand_counts():
    scorer = ExactMatchScorer()
    problems = {
        "p1": score_problem(["a", "a", "b", "c"], "a", scorer, [1, 4]),  # 2/4 right, majority "a" right
        "p2": score_problem(["x", "y", "y", "z"], "x", scorer, [1, 4]),  # 1/4 right, majority "y" wrong
        "p3": score_problem(["q", "q", "q", "q"], "r", scorer, [1, 4]),  # 0/4
    }
    summary = summarize(problems, [1, 2, 4])
    assert summary["num_problems"] == 3 and summary["num_samples"] == 4
    assert summary["avg@4"] == pytest.approx((2 / 4 + 1 / 4 + 0) / 3)
    assert summary["cons@4"] == pytest.approx(1 / 3)
    assert summary["pass@1"] == pytest.approx(summary["avg@4"])  # pass@1 is the mean accuracy
    assert summary["pass@2"] == pytest.approx(((1 - 1 / 6) + (1 - 3 / 6) + 0) / 3)
    assert summary["pass@4"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="k <= num_samples"):
        summarize(problems, [5])
    table = format_table(summary, title="toy")
    assert "| Avg@4 | Cons@4 | Pass@1 | Pass@2 | Pass@4 |" in table and "| 25.0 | 33.3 |" in table


# ----------------------------------------------------------------------------------------------------------------
# The protocol with a scripted generator


class ScriptedGenerator:
    """Returns fixed completions per prompt and records what it was asked for."""

    def __init__(self, completions_by_prompt, fail_after_calls=None):
        self.completions_by_prompt = completions_by_prompt
        self.calls = []
        self.fail_after_calls = fail_after_calls

    def generate(self, prompts, *, n, temperature, top_p, max_new_tokens, seed=None):
        if self.fail_after_calls is not None and len(self.calls) >= self.fail_after_calls:
            raise KeyboardInterrupt("simulated crash")
        self.calls.append({"prompts": list(prompts), "n": n, "temperature": temperature, "top_p": top_p})
        return [self.completions_by_prompt[prompt][:n] for prompt in prompts]


TOY = Dataset.from_list(
    [
        {"prompt": "r12>", "answer": "21", "id": "a"},
        {"prompt": "r34>", "answer": "43", "id": "b"},
        {"prompt": "r56>", "answer": "65", "id": "c"},
    ]
)
TOY_SAMPLES = {
    "r12>": ["21", "21", "12", "21"],  # 3/4, majority right
    "r34>": ["43", "34", "34", "33"],  # 1/4, majority wrong
    "r56>": ["", "5", "6", "56"],  # 0/4
}


def test_evaluate_uses_the_paper_defaults_and_writes_json(tmp_path):
    generator = ScriptedGenerator(TOY_SAMPLES)
    path = tmp_path / "results.json"
    results = evaluate(
        TOY, generator, ExactMatchScorer(), num_samples=4, output_path=path, problems_per_batch=2, progress=False
    )
    assert [call["temperature"] for call in generator.calls] == [1.0, 1.0]  # paper: T = 1.0
    assert [call["top_p"] for call in generator.calls] == [0.7, 0.7]  # paper: top-p 0.7
    assert [len(call["prompts"]) for call in generator.calls] == [2, 1]
    summary = results["summary"]
    assert summary["avg@4"] == pytest.approx((3 / 4 + 1 / 4 + 0) / 3)
    assert summary["cons@4"] == pytest.approx(1 / 3)
    assert summary["pass@4"] == pytest.approx(2 / 3)
    stored = json.loads(path.read_text())
    assert stored["summary"] == pytest.approx(summary)
    assert stored["problems"]["a"]["completions"] == TOY_SAMPLES["r12>"]
    assert stored["problems"]["b"]["majority_answer"] == "34"
    assert stored["config"]["num_samples"] == 4 and stored["config"]["top_p"] == 0.7


def test_evaluate_resumes_after_a_crash(tmp_path):
    path = tmp_path / "results.json"
    with pytest.raises(KeyboardInterrupt):
        evaluate(
            TOY,
            ScriptedGenerator(TOY_SAMPLES, fail_after_calls=1),
            ExactMatchScorer(),
            num_samples=4,
            output_path=path,
            problems_per_batch=2,
            progress=False,
        )
    assert sorted(json.loads(path.read_text())["problems"]) == ["a", "b"]  # the first batch was saved

    resumed_generator = ScriptedGenerator(TOY_SAMPLES)
    resumed = evaluate(
        TOY,
        resumed_generator,
        ExactMatchScorer(),
        num_samples=4,
        output_path=path,
        problems_per_batch=2,
        progress=False,
    )
    assert [call["prompts"] for call in resumed_generator.calls] == [["r56>"]]  # only the missing problem
    uninterrupted = evaluate(
        TOY, ScriptedGenerator(TOY_SAMPLES), ExactMatchScorer(), num_samples=4, problems_per_batch=2, progress=False
    )
    assert resumed["summary"] == pytest.approx(uninterrupted["summary"])

    finished_generator = ScriptedGenerator(TOY_SAMPLES)
    evaluate(TOY, finished_generator, ExactMatchScorer(), num_samples=4, output_path=path, progress=False)
    assert finished_generator.calls == []  # nothing left to do


def test_resuming_with_other_settings_is_refused(tmp_path):
    path = tmp_path / "results.json"
    evaluate(TOY, ScriptedGenerator(TOY_SAMPLES), ExactMatchScorer(), num_samples=4, output_path=path, progress=False)
    with pytest.raises(ValueError, match="num_samples=4"):
        evaluate(
            TOY, ScriptedGenerator(TOY_SAMPLES), ExactMatchScorer(), num_samples=2, output_path=path, progress=False
        )
    with pytest.raises(ValueError, match="top_p"):
        evaluate(
            TOY,
            ScriptedGenerator(TOY_SAMPLES),
            ExactMatchScorer(),
            num_samples=4,
            top_p=1.0,
            output_path=path,
            progress=False,
        )


def test_evaluate_validates_its_arguments():
    scorer, generator = ExactMatchScorer(), ScriptedGenerator(TOY_SAMPLES)
    with pytest.raises(ValueError, match="num_samples"):
        evaluate(TOY, generator, scorer, num_samples=0, progress=False)
    with pytest.raises(ValueError, match="pass@k"):
        evaluate(TOY, generator, scorer, num_samples=4, ks=[8], progress=False)
    with pytest.raises(ValueError, match="top_p"):
        evaluate(TOY, generator, scorer, num_samples=4, top_p=0.0, progress=False)
    with pytest.raises(ValueError, match="unique"):
        evaluate(
            Dataset.from_list([{"prompt": "p", "answer": "a", "id": "x"}] * 2),
            generator,
            scorer,
            num_samples=4,
            progress=False,
        )


# ----------------------------------------------------------------------------------------------------------------
# Real generation on a tiny model, and the backends


def test_hf_backend_on_a_tiny_model_matches_a_recount(warm_model_path, tmp_path):
    dataset = load_synthetic_dataset("reversal", "test", size=12)
    results = evaluate(
        dataset,
        HFGenerator(warm_model_path, batch_size=32),
        ExactMatchScorer(),
        num_samples=6,
        max_new_tokens=8,
        ks=[1, 6],
        output_path=tmp_path / "tiny.json",
        problems_per_batch=5,
        progress=False,
    )
    problems = results["problems"]
    assert len(problems) == 12
    correct_counts, majority_right = [], []
    for row in dataset:
        stored = problems[row["id"]]
        completions = stored["completions"]
        assert len(completions) == 6
        # Recount from the raw texts, independently of the scorer
        hits = [text.strip() == row["answer"] for text in completions]
        assert stored["num_correct"] == sum(hits)
        correct_counts.append(sum(hits))
        texts = [t.strip() for t in completions if t.strip()]
        if texts:
            top = max(texts.count(t) for t in texts)
            winner = next(t for t in texts if texts.count(t) == top)
            majority_right.append(winner == row["answer"])
        else:
            majority_right.append(False)
    summary = results["summary"]
    assert summary["avg@6"] == pytest.approx(sum(c / 6 for c in correct_counts) / 12)
    assert summary["cons@6"] == pytest.approx(sum(majority_right) / 12)
    assert summary["pass@6"] == pytest.approx(sum(c > 0 for c in correct_counts) / 12)
    # The warm-started model is sometimes right and sometimes wrong: the counts above were not vacuous
    assert 0 < sum(correct_counts) < 12 * 6


def test_backend_selection(monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        make_generator("model", backend="tgi")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *args: None if name == "vllm" else object())
    with pytest.raises(ValueError, match="vLLM"):
        make_generator("model", backend="vllm")


def test_vllm_backend_passes_the_protocol_settings(monkeypatch):
    """vLLM is not installable on this CPU machine: a stand-in module checks what the backend asks of it."""
    created = {}

    class SamplingParams:
        def __init__(self, **kwargs):
            created["sampling"] = kwargs

    class Tokenizer:
        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert tokenize is False and add_generation_prompt is True
            return "<chat>" + messages[-1]["content"]

    class LLM:
        def __init__(self, **kwargs):
            created["llm"] = kwargs

        def get_tokenizer(self):
            return Tokenizer()

        def generate(self, prompts, params, use_tqdm):
            created["prompts"] = prompts
            n = created["sampling"]["n"]
            output = types.SimpleNamespace
            return [output(outputs=[output(text=f"{p}-{i}") for i in range(n)]) for p in prompts]

    module = types.ModuleType("vllm")
    module.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    generator = make_generator("org/model", "auto", dtype="bfloat16", tensor_parallel_size=2, batch_size=7, seed=3)
    outputs = generator.generate(
        ["plain", [{"role": "user", "content": "chat"}]], n=3, temperature=1.0, top_p=0.7, max_new_tokens=16, seed=5
    )
    assert created["llm"]["model"] == "org/model" and created["llm"]["tensor_parallel_size"] == 2
    assert "batch_size" not in created["llm"]
    assert created["sampling"] == {"n": 3, "temperature": 1.0, "top_p": 0.7, "max_tokens": 16, "seed": 5}
    assert created["prompts"] == ["plain", "<chat>chat"]
    assert outputs == [["plain-0", "plain-1", "plain-2"], ["<chat>chat-0", "<chat>chat-1", "<chat>chat-2"]]
