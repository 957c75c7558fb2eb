"""Token-weight heatmaps: HTML (escaped), PNG, decoding trainer weights, and the training callback."""

import re

import pytest
import torch
from conftest import cpu_args
from toolkit_fixtures import fake_trackio, length_reward  # noqa: F401 (fake_trackio is a fixture)

from dgpo_trl.tiny import build_tokenizer, reversal_dataset
from dgpo_trl.visualize import (
    HeatmapCompletion,
    TokenWeightHeatmapCallback,
    completions_from_token_weights,
    heatmap_html,
    heatmap_png,
)


def alphas(page: str) -> list[float]:
    return [float(a) for a in re.findall(r"rgba\(214,39,40,([0-9.]+)\)\" title", page)]


def test_html_escapes_untrusted_completion_text():
    tokens = ["<script>", "alert('x')", "</script>", '"><img src=x onerror=alert(1)>', "&amp;"]
    page = heatmap_html(
        HeatmapCompletion(tokens, [1.0] * 5, caption="<b>caption</b>"), title="<title>injected</title>"
    )
    assert "<script" not in page and "<img" not in page and "<b>" not in page and "<title>injected" not in page
    assert "&lt;script&gt;" in page and "&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&amp;amp;" in page  # already-escaped-looking text is escaped again, shown literally


def test_background_intensity_follows_the_weights():
    completion = HeatmapCompletion(["a", "b", "c", "d"], [0.0, 0.5, 1.0, 2.5])
    assert alphas(heatmap_html(completion)) == pytest.approx([0.0, 0.16, 0.32, 0.8])  # w / max(w), 0.8 at the top
    assert alphas(heatmap_html(completion, vmax=1.0)) == pytest.approx([0.0, 0.4, 0.8, 0.8])  # clipped at vmax
    # Several completions share one scale
    page = heatmap_html([completion, HeatmapCompletion(["e"], [5.0])])
    assert alphas(page) == pytest.approx([0.0, 0.08, 0.16, 0.4, 0.8])
    assert 'title="w = 2.500"' in page
    with pytest.raises(ValueError, match="same length"):
        HeatmapCompletion(["a"], [1.0, 2.0])
    with pytest.raises(ValueError, match="vmax"):
        heatmap_html(completion, vmax=0)


def test_png_is_written_and_dollar_signs_are_literal(tmp_path):
    # "$" would start matplotlib mathtext; an unbalanced one would raise if the text were parsed
    tokens = list("cost: $5 and \\frac{1}{2} $") + ["\n"] + list("next line") + ["<eos>"]
    path = tmp_path / "sub" / "heatmap.png"
    heatmap_png([HeatmapCompletion(tokens, [1.0] * len(tokens), "caption $")], path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    short = tmp_path / "short.png"
    heatmap_png(HeatmapCompletion(["x"], [1.0]), short)
    assert Image.open(path).height > Image.open(short).height  # the line break made a second token line


def test_completions_from_trainer_token_weights():
    tokenizer = build_tokenizer()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [
        tokenizer.convert_tokens_to_ids(list("54321")) + [eos],
        tokenizer.convert_tokens_to_ids(list("12")) + [eos, pad, pad, pad],
    ]
    token_weights = {
        "completion_ids": torch.tensor(ids),
        "weights": torch.tensor([[1.0, 2.0, 0.5, 1.0, 1.0, 0.5], [1.5, 0.5, 1.0, 1.0, 1.0, 1.0]]),
        "mask": torch.tensor([[True] * 6, [True] * 3 + [False] * 3]),
        "advantages": torch.tensor([0.75, -1.25]),
    }
    first, second = completions_from_token_weights(token_weights, tokenizer)
    assert first.tokens == ["5", "4", "3", "2", "1", "<eos>"] and first.weights == [1.0, 2.0, 0.5, 1.0, 1.0, 0.5]
    assert second.tokens == ["1", "2", "<eos>"] and second.weights == [1.5, 0.5, 1.0]  # padding dropped
    assert "advantage +0.750" in first.caption and "max w 2.00" in first.caption
    assert len(completions_from_token_weights(token_weights, tokenizer, max_completions=1)) == 1
    with pytest.raises(ValueError, match="mask"):
        completions_from_token_weights({"completion_ids": ids, "weights": ids}, tokenizer)


def test_callback_rejects_bad_options():
    with pytest.raises(ValueError, match="formats"):
        TokenWeightHeatmapCallback(trainer=None, formats=("svg",))
    with pytest.raises(ValueError, match="num_completions"):
        TokenWeightHeatmapCallback(trainer=None, num_completions=0)


@pytest.mark.slow
def test_callback_writes_heatmaps_and_fills_the_completions_table(tiny_model_path, tmp_path, fake_trackio):
    from dgpo_trl import DGPOConfig, DGPOTrainer

    args = DGPOConfig(**cpu_args(tmp_path / "run", max_steps=2, log_completions=True))
    trainer = DGPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=reversal_dataset(64))
    # After construction: the trainer must not start a real trackio run; TRL's log() reads report_to when it logs
    trainer.args.report_to = ["trackio"]
    callback = TokenWeightHeatmapCallback(trainer, num_completions=3)
    trainer.add_callback(callback)
    trainer.train()

    names = sorted(path.name for path in (tmp_path / "run" / "token_weights").iterdir())
    assert names == ["step_000001.html", "step_000001.png", "step_000002.html", "step_000002.png"]
    page = (tmp_path / "run" / "token_weights" / "step_000002.html").read_text()
    assert page.count('class="dgpo-completion"') == 3
    tables = [entry["completions"] for entry in fake_trackio.logged if "completions" in entry]
    assert len(tables) >= 2
    for table in tables[:2]:  # the two training steps
        with_image = table[table["image"].map(len) > 0]
        assert len(with_image) == 3  # one heatmap per drawn completion, on the row showing that completion
        assert all(cell[0][0] == "image" for cell in with_image["image"])
    # The final log (train end) draws nothing new: no stale heatmap is left in the table
    assert "image" not in tables[-1] or not tables[-1]["image"].map(len).any()


@pytest.mark.slow
def test_callback_logs_one_image_when_completions_are_not_logged(tiny_model_path, tmp_path, fake_trackio):
    from dgpo_trl import DGPOConfig, DGPOTrainer

    args = DGPOConfig(**cpu_args(tmp_path / "run", max_steps=1, log_completions=False))
    trainer = DGPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=reversal_dataset(32))
    trainer.args.report_to = ["trackio"]
    trainer.add_callback(TokenWeightHeatmapCallback(trainer, num_completions=2, formats=("html",)))
    trainer.train()
    images = [entry["dgpo/token_weights"] for entry in fake_trackio.logged if "dgpo/token_weights" in entry]
    assert len(images) == 1 and images[0][0] == "image"
    assert not any("completions" in entry for entry in fake_trackio.logged)
    assert sorted(p.name for p in (tmp_path / "run" / "token_weights").iterdir()) == ["step_000001.html"]


@pytest.mark.slow
def test_callback_draws_nothing_without_token_weights(tiny_model_path, tmp_path):
    from dgpo_trl import DGPOConfig, DGPOTrainer

    args = DGPOConfig(**cpu_args(tmp_path / "run", max_steps=1, dgpo_score="uniform"))
    trainer = DGPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=reversal_dataset(32))
    callback = TokenWeightHeatmapCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.written == [] and not (tmp_path / "run" / "token_weights").exists()
