"""The model card DGPOTrainer writes: it credits and cites the DGPO paper (not GRPO's), and keeps TRL's citation."""

import re

import pytest
from conftest import cpu_args
from trl import GRPOConfig

from dgpo_trl import DGPOConfig, DGPOTrainer
from dgpo_trl.tasks import exact_match_reward

DGPO_TITLE = "DGPO: Distribution-Guided Policy Optimization for Fine-Grained Credit Assignment"
DGPO_AUTHORS = (
    "Hongbo Jin and Rongpeng Zhu and Zhongjing Du and Xu Jiang and Jingqi Tian and Qiaoman Zhang and Jiayu Ding"
)


def bibtex_entries(card: str) -> list[str]:
    return re.findall(r"```bibtex\n(.*?)```", card, flags=re.DOTALL)


def assert_credits_dgpo(card: str) -> None:
    # The sentence a reader of the card sees, with its link
    assert f"This model was trained with DGPO, a method introduced in [{DGPO_TITLE}](" in card
    links = re.findall(r"\[[^\]]*\]\((https?://[^)]*)\)", card)
    assert any(link.endswith("/2605.03327") for link in links), links
    # No trace of GRPO's paper being given as DGPO's
    assert "2402.03300" not in card and "DeepSeekMath" not in card
    entries = bibtex_entries(card)
    assert len(entries) == 2, entries  # DGPO's, then TRL's
    dgpo, trl = entries
    assert card.index("Cite DGPO as:") < card.index(dgpo)
    assert "arXiv:2605.03327" in dgpo and f"{{{{{DGPO_TITLE}}}}}" in dgpo
    assert DGPO_AUTHORS in dgpo and re.search(r"year\s*=\s*2026", dgpo)
    assert "vonwerra2020trl" in trl and "TRL: Transformers Reinforcement Learning" in trl


@pytest.mark.parametrize("config_cls", [DGPOConfig, GRPOConfig])
def test_model_card_credits_and_cites_the_dgpo_paper(tiny_model_path, reversal_train_dataset, tmp_path, config_cls):
    trainer = DGPOTrainer(
        tiny_model_path,
        exact_match_reward,
        args=config_cls(**cpu_args(tmp_path)),
        train_dataset=reversal_train_dataset,
    )
    trainer.create_model_card(model_name="tiny-dgpo")
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\n") and "# Model Card for tiny-dgpo" in card
    assert_credits_dgpo(card)
    assert re.search(r"^\s*-\s*dgpo\s*$", card, flags=re.MULTILINE)  # the tag


def test_the_card_written_with_a_checkpoint_credits_dgpo(tiny_model_path, reversal_train_dataset, tmp_path):
    trainer = DGPOTrainer(
        tiny_model_path,
        exact_match_reward,
        train_dataset=reversal_train_dataset,
        args=DGPOConfig(
            **cpu_args(tmp_path, max_steps=1, save_strategy="steps", save_steps=1, dgpo_uniform_weights=True)
        ),
    )
    trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir()
    assert_credits_dgpo((tmp_path / "README.md").read_text())
