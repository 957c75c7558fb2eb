"""Rewards: final-answer extraction, math-verify accuracy (with its timeout), format, overlong penalty, registry."""

import threading
import time

import pytest

from dgpo_trl.rewards import (
    MAX_ANSWER_CHARS,
    MathAccuracyReward,
    extract_final_answer,
    format_reward,
    get_reward_function,
    math_accuracy_reward,
    overlong_penalty,
)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        (r"so x = 2 and \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),  # nested braces
        (r"first \boxed{3}, then corrected: \boxed{4}", "4"),  # the last box wins
        (r"\fbox{7}", "7"),
        ("Step 1 ...\nAnswer: 34", "34"),  # DAPO's format
        ("**Final Answer:** **12**.", "12"),  # markdown around the answer
        ("Answer: $\\frac{1}{3}$", "$\\frac{1}{3}$"),  # delimiters kept for the LaTeX parser
        (r"\boxed{5} ... Answer: 6", "5"),  # a box beats an Answer: line
        (r"unclosed \boxed{5", None),
        (r"\boxed{}", None),
        ("no answer here", None),
        ("", None),
        (None, None),
        ([{"role": "assistant", "content": r"\boxed{72}"}], "72"),  # conversational completion
    ],
)
def test_extract_final_answer(completion, expected):
    assert extract_final_answer(completion) == expected


def test_math_accuracy_on_equivalent_wrong_and_unreadable_answers():
    completions = [
        r"... \boxed{\frac{2}{6}}",  # equivalent fraction
        r"\boxed{0.5}",  # decimal vs fraction gold
        "Answer: 34",
        r"\boxed{3\pi}",  # bare LaTeX gold must keep the pi
        r"\boxed{3}",
        r"\boxed{7}",  # wrong
        "I think it is 1/3",  # no final answer
        "",
        [{"role": "assistant", "content": r"\boxed{1,000}"}],
    ]
    golds = ["1/3", r"\frac{1}{2}", "34", r"3\pi", r"3\pi", "8", "1/3", "1", "1000"]
    assert math_accuracy_reward(completions, answer=golds) == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_unparsable_gold_gives_none_so_trl_skips_the_example():
    rewards = math_accuracy_reward([r"\boxed{1}", r"\boxed{1}", r"\boxed{1}"], answer=["", None, "   "])
    assert rewards == [None, None, None]


def test_pathological_answer_times_out_to_zero():
    reward = MathAccuracyReward(timeout_seconds=1)
    start = time.perf_counter()
    # sympy would try to evaluate 10^(10^10) when comparing; math-verify's alarm stops it
    assert reward([r"\boxed{10^{10^{10}}}"], answer=["1"]) == [0.0]
    assert time.perf_counter() - start < 5


def test_overlong_answers_are_not_parsed():
    start = time.perf_counter()
    assert math_accuracy_reward([r"\boxed{" + "1+" * MAX_ANSWER_CHARS + "1}"], answer=["2"]) == [0.0]
    assert time.perf_counter() - start < 2


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{" * 30_000,
        "Answer:" + " " * 200_000 + "x ",
        "\n" + " " * 200_000,
        "{" * 100_000 + "no box",
        "x" * 1_000_000,
    ],
    ids=["unclosed boxes", "long answer line", "whitespace line", "open braces", "one long word"],
)
def test_pathological_completions_are_handled_in_linear_time(completion):
    math_accuracy_reward([r"\boxed{1}"], answer=["1"])  # imports math-verify outside the timed part
    start = time.perf_counter()
    rewards = math_accuracy_reward([completion], answer=["1"])
    assert time.perf_counter() - start < 2
    assert rewards == [0.0]


def test_works_from_a_worker_thread():
    # math-verify's signal-based timeout only works in the main thread; the reward must not raise elsewhere
    results = []
    worker = threading.Thread(target=lambda: results.append(math_accuracy_reward([r"\boxed{2/4}"], answer=["1/2"])))
    worker.start()
    worker.join(timeout=30)
    assert results == [[1.0]]


def test_logs_the_extracted_answer_to_the_completions_table():
    logged = {}
    math_accuracy_reward([r"\boxed{4}", "none"], answer=["4", "4"], log_extra=logged.__setitem__)
    assert logged == {"extracted_answer": ["4", ""]}


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="'answer'"):
        math_accuracy_reward([r"\boxed{1}"], solution=["1"])
    with pytest.raises(ValueError, match="2 completions but 1 gold"):
        math_accuracy_reward(["a", "b"], answer=["1"])
    with pytest.raises(ValueError, match="timeout_seconds"):
        MathAccuracyReward(timeout_seconds=0)
    assert MathAccuracyReward(answer_column="solution")([r"\boxed{1}"], solution=["1"]) == [1.0]


def test_format_reward():
    completions = [r"\boxed{1}", "Answer: 2", "no answer", r"\boxed{", ""]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_overlong_penalty_follows_dapo_eq_13():
    penalty = overlong_penalty(max_completion_length=100, buffer_length=20)
    lengths = [10, 80, 90, 100, 101]
    assert penalty([[0] * n for n in lengths]) == [0.0, 0.0, -0.5, -1.0, -1.0]
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(100, 0)
    with pytest.raises(ValueError, match="buffer_length"):
        overlong_penalty(100, 101)
    with pytest.raises(ValueError, match="max_completion_length"):
        overlong_penalty(100.0, 10)


def test_reward_registry_and_dotted_paths():
    assert get_reward_function("math_accuracy") is math_accuracy_reward
    assert get_reward_function("format") is format_reward
    assert get_reward_function("exact_match")(["54321"], answer=["54321"]) == [1.0]
    assert get_reward_function("dgpo_trl.rewards.format_reward") is format_reward
    with pytest.raises(ValueError, match="math_accuracy"):
        get_reward_function("accuracy")
    with pytest.raises(ValueError, match="could not be imported"):
        get_reward_function("dgpo_trl.rewards.no_such_reward")
    # TRL names the reward's metrics after __name__
    assert math_accuracy_reward.__name__ == "math_accuracy_reward"
