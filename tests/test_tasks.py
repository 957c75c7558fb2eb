"""The synthetic tasks (`dgpo_trl.tasks`): their prompts, answers, rewards and splits, and where they are imported."""

import ast
import random
import string
from pathlib import Path

import pytest

from dgpo_trl.tasks import TASKS, answer_positions, final_answer_reward, reversal_dataset

PACKAGE = Path(__file__).resolve().parents[1] / "dgpo_trl"


def _digits(rng, low, high):
    return "".join(rng.choice(string.digits) for _ in range(rng.randint(low, high)))


# The recipes the tasks were generated with before they had a module of their own: a task's rows for a seed must
# stay what they were (warm-ups, studies and held-out sets are reproduced from seeds)
RECIPES = {
    "reversal": lambda rng: (lambda d: {"prompt": f"r{d}>", "answer": d[::-1]})(_digits(rng, 3, 6)),
    "addition": lambda rng: (lambda a, b: {"prompt": f"a{a}+{b}=", "answer": str(a + b)})(
        rng.randrange(10), rng.randrange(10)
    ),
    "filler": lambda rng: (lambda d: {"prompt": f"f{d}>", "answer": d[::-1]})(_digits(rng, 3, 4)),
}


@pytest.mark.parametrize("name", list(TASKS))
def test_rows_for_a_seed_are_the_recipes_rows(name):
    for seed in (0, 1, 100):
        rng = random.Random(seed)
        assert TASKS[name].dataset(50, seed=seed).to_list() == [RECIPES[name](rng) for _ in range(50)]
    rng = random.Random(4)
    expected = [(lambda d: {"prompt": f"r{d}>", "answer": d[::-1]})(_digits(rng, 2, 3)) for _ in range(20)]
    assert reversal_dataset(20, seed=4, min_digits=2, max_digits=3).to_list() == expected


@pytest.mark.parametrize("name", list(TASKS))
def test_each_task_knows_the_answer_of_its_prompts_only(name):
    task = TASKS[name]
    rows = task.dataset(200, seed=5)
    assert all(task.expected_answer(row["prompt"]) == row["answer"] for row in rows)
    assert task.expected_answer(f"  {rows[0]['prompt']}\n") == rows[0]["answer"]  # surrounding whitespace
    for other in TASKS.values():
        if other is not task:
            assert all(task.expected_answer(row["prompt"]) is None for row in other.dataset(20, seed=5))
    for text in ("", "hello", rows[0]["prompt"] + "x", "x" + rows[0]["prompt"]):
        assert task.expected_answer(text) is None


@pytest.mark.parametrize("name", list(TASKS))
def test_reward_is_one_exactly_when_the_stated_answer_is_right(name):
    task = TASKS[name]
    rng = random.Random(0)
    rows = task.dataset(20, seed=6).to_list()
    targets = [task.sft_target(row["answer"], rng) if task.sft_target else row["answer"] for row in rows]
    wrong = [target + "7" for target in targets]
    answers = [row["answer"] for row in rows]
    assert task.reward(targets, answers) == [1.0] * len(rows)
    assert task.reward(wrong, answers) == [0.0] * len(rows)
    for completion, answer in zip(targets + wrong + ["", " "], answers * 2 + answers[:2]):
        assert task.reward([completion], [answer]) == [float(task.stated_answer(completion) == answer)]
    assert all(len(target) + 1 <= task.max_completion_length for target in targets)  # the answer and EOS fit


def test_filler_rewards_only_the_answer_after_the_last_equals_sign():
    task = TASKS["filler"]
    answer = task.dataset(1, seed=0)[0]["answer"]
    target = task.sft_target(answer, random.Random(1))
    assert target.endswith("=" + answer) and len(target) <= task.max_completion_length
    assert final_answer_reward([target, "abc=" + answer, "x=1=" + answer, answer, target + "0"], [answer] * 5) == [
        1.0,
        1.0,
        1.0,
        0.0,
        0.0,
    ]
    tokens = list("abca=321") + ["<eos>"]
    assert answer_positions(tokens) == [False] * 4 + [True] * 5
    assert answer_positions(list("abc")) == [False] * 3


@pytest.mark.parametrize(
    ("name", "sizes"),
    [("reversal", (300, 200, 100, 128)), ("filler", (300, 200, 100, 128)), ("addition", (30, 20, 20, 20))],
)  # addition has 100 prompts in all
def test_splits_are_disjoint_and_deterministic(name, sizes):
    task = TASKS[name]
    n_sft, n_train, n_eval, n_val = sizes
    splits = task.splits(seed=3, n_sft=n_sft, n_train=n_train, n_eval=n_eval, n_val=n_val)
    prompts = {split: {row["prompt"] for row in rows} for split, rows in splits.items()}
    assert [len(prompts[k]) for k in ("sft", "train", "eval", "val")] == [n_sft, n_train, n_eval, n_val]
    for a in prompts:
        for b in prompts:
            assert a == b or not (prompts[a] & prompts[b]), (a, b)
    assert task.splits(seed=3, n_sft=n_sft, n_train=n_train, n_eval=n_eval, n_val=n_val) == splits
    if name == "addition":  # more prompts asked for than the task has
        with pytest.raises(ValueError, match="distinct"):
            task.splits(seed=0, n_sft=100, n_train=10, n_eval=10, n_val=10)


def test_loaders_and_evaluation_use_each_tasks_reward_and_answer():
    from dgpo_trl.data import default_reward_funcs, load_task
    from dgpo_trl.evaluation import scorer_for
    from dgpo_trl.rewards import get_reward_function

    for name, task in TASKS.items():
        (reward_name,) = default_reward_funcs(name)
        assert get_reward_function(reward_name) is task.reward
        row = load_task(name, limit=3, seed=2)[0]
        assert task.expected_answer(row["prompt"]) == row["answer"]
    scorer = scorer_for("filler")
    assert scorer.extract("abcdefgh=5283") == "5283" and scorer.extract("abc") is None
    assert scorer_for("reversal").extract(" 54321 ") == "54321"


def _imported_modules(path: Path) -> set[str]:
    """The package modules a file of dgpo_trl imports (relative imports, or absolute ones of dgpo_trl)."""
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # from .x import ... / from . import x
                modules |= {node.module} if node.module else {alias.name for alias in node.names}
            elif node.module and node.module.startswith("dgpo_trl"):
                modules.add(node.module.removeprefix("dgpo_trl").lstrip(".") or "")
        elif isinstance(node, ast.Import):
            modules |= {a.name.removeprefix("dgpo_trl.") for a in node.names if a.name.startswith("dgpo_trl.")}
    return modules


def test_the_toolkit_does_not_lean_on_the_tiny_model_builders():
    for name in ("data.py", "rewards.py", "evaluation.py", "tasks.py"):
        assert "tiny" not in _imported_modules(PACKAGE / name), name
    assert "tasks" in _imported_modules(PACKAGE / "data.py") and "tasks" in _imported_modules(PACKAGE / "rewards.py")
    # tiny.py builds models and tokenizers (and warms a model up on a given dataset): no task of its own
    tree = ast.parse((PACKAGE / "tiny.py").read_text())
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.ClassDef)}
    assert not {"reversal_dataset", "reversal_example", "exact_match_reward"} & defined
    assert "tasks" not in _imported_modules(PACKAGE / "tiny.py")
