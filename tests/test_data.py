"""Data loaders: Hub math sets in TRL's prompt format (tested offline with in-memory fakes); synthetic tasks."""

import pytest
from toolkit_fixtures import FakeHub
from trl.data_utils import is_conversational

from dgpo_trl.data import (
    MATH_DATASETS,
    REASONING_INSTRUCTION,
    gsm8k_final_answer,
    load_math_dataset,
    load_synthetic_dataset,
    load_task,
    resolve_dataset_name,
    strip_dapo_instruction,
)

DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
    "Let $x$ satisfy $x + 1 = 35$. Find $x$.\n\n"
    'Remember to put your answer on its own line after "Answer:".'
)

FAKE_TABLES = {
    "open-r1/DAPO-Math-17k-Processed": [
        {"prompt": DAPO_PROMPT, "solution": "34", "data_source": "math_dapo"},
        {"prompt": "Already bare: what is 2+2?", "solution": "4", "data_source": "math_dapo"},
        {"prompt": "Unscorable problem", "solution": "", "data_source": "math_dapo"},
    ],
    "HuggingFaceH4/aime_2024": [
        {"id": 60, "problem": "AIME problem one.", "solution": "...", "answer": "204", "url": "u", "year": "2024"},
        {"id": 61, "problem": "AIME problem two.", "solution": "...", "answer": "25", "url": "u", "year": "2024"},
    ],
    "math-ai/aime25": [{"id": "0", "problem": "AIME 2025 problem.", "answer": "70"}],
    "HuggingFaceH4/MATH-500": [
        {
            "problem": "Convert $(0,3)$ to polar coordinates.",
            "solution": "...",
            "answer": r"\left( 3, \frac{\pi}{2} \right)",
            "subject": "Precalculus",
            "level": 2,
            "unique_id": "test/precalculus/807.json",
        }
    ],
    "openai/gsm8k": [
        {"question": "Natalia sold clips ...", "answer": "She sold 48/2 = 24 clips.\n#### 72"},
        {"question": "A big number?", "answer": "Compute.\n#### 1,234"},
    ],
}


def test_strip_dapo_instruction():
    assert strip_dapo_instruction(DAPO_PROMPT) == "Let $x$ satisfy $x + 1 = 35$. Find $x$."
    assert strip_dapo_instruction("  A bare problem.  ") == "A bare problem."


def test_gsm8k_final_answer():
    assert gsm8k_final_answer("work\n#### 72") == "72"
    assert gsm8k_final_answer("work\n#### 1,234 ") == "1234"
    with pytest.raises(ValueError, match="####"):
        gsm8k_final_answer("no final answer")


@pytest.mark.parametrize("name", sorted(MATH_DATASETS))
def test_every_math_set_maps_to_trl_conversational_prompts(name):
    hub = FakeHub(FAKE_TABLES)
    dataset = load_math_dataset(name, load_fn=hub)
    spec = MATH_DATASETS[name]
    assert hub.calls == [(spec.hub_id, spec.config, spec.split)]
    assert {"prompt", "answer", "id", "source"} <= set(dataset.column_names)
    for row in dataset:
        assert is_conversational(row)  # TRL will apply the model's chat template
        assert row["prompt"][-1]["role"] == "user"
        assert row["prompt"][-1]["content"].endswith("\n\n" + REASONING_INSTRUCTION)
        assert row["answer"] and row["source"] == name
    assert len(set(dataset["id"])) == len(dataset)


def test_field_mapping_per_dataset():
    hub = FakeHub(FAKE_TABLES)
    dapo = load_math_dataset("dapo17k", load_fn=hub)
    # DAPO's own instruction is replaced by the shared one; the row without a gold answer is dropped
    assert dapo["answer"] == ["34", "4"]
    assert dapo[0]["prompt"][0]["content"] == f"Let $x$ satisfy $x + 1 = 35$. Find $x$.\n\n{REASONING_INSTRUCTION}"
    aime = load_math_dataset("aime2024", load_fn=hub)
    assert aime["answer"] == ["204", "25"] and aime["id"] == ["60", "61"]
    math500 = load_math_dataset("math500", load_fn=hub)
    assert math500["answer"] == [r"\left( 3, \frac{\pi}{2} \right)"]
    assert math500["id"] == ["test/precalculus/807.json"]
    gsm8k = load_math_dataset("gsm8k", load_fn=hub)
    assert gsm8k["answer"] == ["72", "1234"] and gsm8k["id"] == ["gsm8k-0", "gsm8k-1"]


def test_options_split_limit_instruction_system_prompt_and_hub_ids():
    hub = FakeHub(FAKE_TABLES)
    dataset = load_math_dataset(
        "HuggingFaceH4/aime_2024", "train", limit=1, system_prompt="You are a mathematician.", load_fn=hub
    )
    assert len(dataset) == 1
    assert dataset[0]["prompt"][0] == {"role": "system", "content": "You are a mathematician."}
    raw = load_math_dataset("dapo17k", instruction=None, load_fn=hub)
    assert raw[0]["prompt"][0]["content"] == DAPO_PROMPT  # kept as is, DAPO's wrapper included
    load_math_dataset("gsm8k", "train", load_fn=hub)
    assert hub.calls[-1] == ("openai/gsm8k", "main", "train")


def test_bad_names_and_changed_hub_schemas_raise():
    with pytest.raises(ValueError, match="aime2024"):
        resolve_dataset_name("aime-2024")
    with pytest.raises(ValueError, match="synthetic"):
        load_math_dataset("reversal", load_fn=FakeHub(FAKE_TABLES))
    with pytest.raises(ValueError, match="no column"):
        load_math_dataset("aime2025", load_fn=FakeHub({"math-ai/aime25": [{"question": "q", "answer": "1"}]}))
    with pytest.raises(ValueError, match="limit"):
        load_math_dataset("aime2025", limit=0, load_fn=FakeHub(FAKE_TABLES))


def test_synthetic_tasks():
    train = load_synthetic_dataset("reversal", "train", size=50)
    test = load_synthetic_dataset("reversal", "test", size=50)
    for row in train:
        assert row["prompt"] == f"r{row['answer'][::-1]}>"
    assert not is_conversational(train[0])  # string prompts: the tiny tokenizer has no chat template
    assert set(train["prompt"]) != set(test["prompt"])  # held-out problems come from another seed
    assert len(set(train["id"]) | set(test["id"])) == 100
    for row in load_task("addition", limit=30):
        a, b = row["prompt"][1:-1].split("+")
        assert row["answer"] == str(int(a) + int(b))
    assert len(load_task("reversal")) == 2000
    with pytest.raises(ValueError, match="split"):
        load_synthetic_dataset("reversal", "validation")
    with pytest.raises(ValueError, match="synthetic task"):
        load_synthetic_dataset("sorting")
