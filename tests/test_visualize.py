"""Token-weight heatmaps: HTML (escaped), PNG, decoding trainer weights, and the training callback."""

import html
import importlib.machinery
import math
import re
import sys
import types

import pytest
import torch
from conftest import cpu_args
from toolkit_fixtures import length_reward

from dgpo_trl.tasks import REVERSAL, reversal_dataset
from dgpo_trl.tiny import build_tokenizer
from dgpo_trl.visualize import (
    PROMPT_CHARS,
    HeatmapCompletion,
    TokenWeightHeatmapCallback,
    completions_from_token_weights,
    heatmap_html,
    heatmap_png,
)


@pytest.fixture
def fake_trackio(monkeypatch):
    """A stand-in `trackio` module, installed where TRL looks for it; records what gets logged.

    TRL 1.16 reads module-level `trackio` globals in grpo_trainer and extras.profiling (imported only when trackio is
    installed, which it is not here).
    """
    module = types.ModuleType("trackio")
    module.__spec__ = importlib.machinery.ModuleSpec("trackio", None)
    module.logged = []
    module.Image = lambda image: ("image", image.size)
    module.Table = lambda dataframe: dataframe
    module.log = lambda data, **kwargs: module.logged.append(data)
    monkeypatch.setitem(sys.modules, "trackio", module)
    import trl.extras.profiling
    import trl.trainer.grpo_trainer

    monkeypatch.setattr(trl.trainer.grpo_trainer, "trackio", module, raising=False)
    monkeypatch.setattr(trl.extras.profiling, "trackio", module, raising=False)
    return module


def css_colours(page: str) -> dict[str, tuple[float, float, float]]:
    """Each token's background colour in the page, by its text, as RGB over white (rgba is composited)."""
    colours = {}
    pattern = r'background-color: rgba?\(([0-9., ]+)\)[^"]*" title="[^"]*">([^<]*)</span>'
    for channels, token in re.findall(pattern, page):
        values = [float(v) for v in channels.split(",")]
        alpha = values[3] if len(values) == 4 else 1.0
        colours[token] = tuple(alpha * c + (1 - alpha) * 255 for c in values[:3])
    return colours


def png_colours(completions, **kwargs) -> dict[str, tuple[float, float, float]]:
    """Renders the PNG and samples the background of each token's box from its pixels (the commonest colour inside
    the token's text box; tokens must be distinct)."""
    import io

    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    fig = heatmap_png(completions, **kwargs)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=fig.dpi)  # what heatmap_png(path=...) writes
    pixels = np.asarray(Image.open(buffer).convert("RGB"))
    tokens = {token for completion in completions for token in completion.tokens}
    colours = {}
    for text in fig.axes[0].texts:
        if text.get_text() not in tokens:
            continue
        box = text.get_window_extent()
        top, bottom = pixels.shape[0] - int(box.y1) + 2, pixels.shape[0] - int(box.y0) - 2
        region = pixels[top:bottom, int(box.x0) + 2 : int(box.x1) - 2].reshape(-1, 3)
        values, counts = np.unique(region, axis=0, return_counts=True)
        colours[text.get_text()] = tuple(float(c) for c in values[counts.argmax()])
    plt.close(fig)
    assert set(colours) == tokens
    return colours


def distance(a, b) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


def is_blue(rgb) -> bool:
    return rgb[2] - rgb[0] > 10


def is_red(rgb) -> bool:
    return rgb[0] - rgb[2] > 10


def is_white(rgb) -> bool:
    return min(rgb) >= 250


def signed_strength(rgb) -> float:
    """How far a colour is from white in perceived lightness (100 - CIE L*), positive for red and negative for blue:
    it grows with w on a diverging scale."""

    def linear(c):
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    luminance = 0.2126 * linear(rgb[0]) + 0.7152 * linear(rgb[1]) + 0.0722 * linear(rgb[2])
    lightness = 116 * luminance ** (1 / 3) - 16 if luminance > 0.008856 else 903.3 * luminance
    return (100 - lightness) * (1 if rgb[0] >= rgb[2] else -1)


# The paper's settings (tau = 0.5): a near-uniform completion, mean 1, weights 0.99 ... 1.02
NEAR_UNIFORM = HeatmapCompletion(["low_", "mean", "high", "pad1", "pad2"], [0.99, 1.0, 1.02, 0.995, 0.995])
# A concentrated one: most tokens below 1, a few carry the credit
CONCENTRATED = HeatmapCompletion(
    ["t01", "t03", "t07", "t10", "t15", "t30", "t80"], [0.1, 0.3, 0.7, 1.0, 1.5, 3.0, 8.0]
)


def test_html_escapes_untrusted_completion_text():
    tokens = ["<script>", "alert('x')", "</script>", '"><img src=x onerror=alert(1)>', "&amp;"]
    page = heatmap_html(
        HeatmapCompletion(tokens, [1.0] * 5, caption="<b>caption</b>"), title="<title>injected</title>"
    )
    assert "<script" not in page and "<img" not in page and "<b>" not in page and "<title>injected" not in page
    assert "&lt;script&gt;" in page and "&lt;/script&gt;" in page
    assert "&quot;&gt;&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&amp;amp;" in page  # already-escaped-looking text is escaped again, shown literally


def test_near_uniform_weights_get_visibly_different_colours_in_html():
    page = heatmap_html(NEAR_UNIFORM)
    colours = css_colours(page)
    low, mean, high = colours["low_"], colours["mean"], colours["high"]
    assert is_blue(low) and is_red(high)  # below the mean one hue, above it another
    assert distance(low, high) > 150 and distance(low, mean) > 60 and distance(high, mean) > 60
    assert is_white(mean)


def test_near_uniform_weights_get_visibly_different_colours_in_png():
    colours = png_colours([NEAR_UNIFORM])
    low, mean, high = colours["low_"], colours["mean"], colours["high"]
    assert is_blue(low) and is_red(high)
    assert distance(low, high) > 150 and distance(low, mean) > 60 and distance(high, mean) > 60
    assert is_white(mean)


@pytest.mark.parametrize("render", ["html", "png"])
def test_concentrated_weights_keep_their_order(render):
    colours = css_colours(heatmap_html(CONCENTRATED)) if render == "html" else png_colours([CONCENTRATED])
    strengths = [signed_strength(colours[token]) for token in CONCENTRATED.tokens]
    assert strengths == sorted(strengths) and len(set(strengths)) == len(strengths)  # strictly monotone in w
    assert all(is_blue(colours[t]) for t in ("t01", "t03", "t07")) and is_white(colours["t10"])
    assert all(is_red(colours[t]) for t in ("t15", "t30", "t80"))


def test_text_on_strong_colours_turns_white():
    page = heatmap_html(CONCENTRATED)
    strong = re.search(r'style="([^"]*)" title="[^"]*">t01<', page).group(1)
    faint = re.search(r'style="([^"]*)" title="[^"]*">t10<', page).group(1)
    assert "color: #fff" in strong and "color:" not in faint.replace("background-color", "")


def test_uniform_weights_render_white_and_the_legend_says_so():
    tokens = ["a", "b", "c", "d"]
    for weights in ([1.0] * 4, [1.0, 1.0 + 1e-7, 1.0 - 2e-7, 1.0]):  # exactly uniform, and float noise
        page = heatmap_html(HeatmapCompletion(tokens, weights))
        assert all(rgb == (255, 255, 255) for rgb in css_colours(page).values())
        assert "uniform weights" in legend(page)
        colours = png_colours([HeatmapCompletion(tokens, weights)])
        assert all(rgb == (255, 255, 255) for rgb in colours.values())
    # Not uniform: no such claim
    assert "uniform" not in legend(heatmap_html(NEAR_UNIFORM))


def test_tiny_real_spreads_are_shown_not_called_uniform():
    # At the paper's tau and an LLM vocabulary DGPO's weights spread by ~1e-5 to 1e-4 (a real Cohere-config run: 7e-5):
    # that is signal, not float noise, and must be drawn
    completion = HeatmapCompletion(["a", "b", "c", "d"], [0.99995, 1.0, 1.00007, 1.00002])
    page = heatmap_html(completion)
    colours = css_colours(page)
    assert "uniform" not in legend(page)
    below, white, above = colours["a"], colours["b"], colours["c"]
    assert below[2] > below[0] and above[0] > above[2]  # blue below the mean, red above
    assert math.dist(below, above) > 100 and white == (255, 255, 255)
    assert re.search(r">0\.99993\d*<.*>1<.*>1\.00007\d*<", legend(page))
    png = png_colours([completion])
    assert math.dist(png["a"], png["c"]) > 100 and png["a"][2] > png["a"][0] and png["c"][0] > png["c"][2]


def legend(page: str) -> str:
    return re.search(r'<div class="dgpo-legend">([^\n]*)', page).group(1)


def test_legend_gives_the_scale_and_the_observed_weights():
    text = legend(heatmap_html(NEAR_UNIFORM))
    # The colour bar's ends (symmetric in log w: 1/1.02 = 0.980), its middle, and the observed extremes
    assert re.search(r">0\.980<.*>1<.*>1\.020<", text)
    assert "min 0.990" in text and "max 1.020" in text
    text = legend(heatmap_html(CONCENTRATED))
    assert re.search(r">0\.10<.*>1<.*>10\.00<", text) and "min 0.10" in text and "max 8.00" in text
    fig = heatmap_png([NEAR_UNIFORM])
    shown = [t.get_text() for t in fig.axes[0].texts]
    assert {"0.980", "1", "1.020"} <= set(shown) and any("min 0.990, max 1.020" in t for t in shown)


def test_a_fixed_vmax_shares_one_scale():
    a = HeatmapCompletion(["a1", "a2", "a3"], [0.5, 1.0, 2.0])
    b = HeatmapCompletion(["b1", "b2", "b3"], [0.9, 1.1, 4.0])
    shared = css_colours(heatmap_html(a, vmax=2.0)) | css_colours(heatmap_html(b, vmax=2.0))
    assert shared["a3"] == shared["b3"]  # 4 is clipped to the scale's red end, like 2
    assert shared["b2"] == css_colours(heatmap_html([a, b], vmax=2.0))["b2"]  # the same as one page holding both
    assert signed_strength(shared["a1"]) == pytest.approx(-signed_strength(shared["a3"]), abs=5)  # 0.5 and 2
    assert ">0.50<" in legend(heatmap_html(b, vmax=2.0))
    # Several completions on one page share one scale: a's colours change when b (up to 4) joins
    assert css_colours(heatmap_html([a, b]))["a3"] != css_colours(heatmap_html(a))["a3"]
    for bad in (0, 1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(ValueError, match="vmax"):
            heatmap_html(a, vmax=bad)
    with pytest.raises(ValueError, match="vmax"):
        TokenWeightHeatmapCallback(trainer=None, vmax=0.5)


def test_hover_text_and_odd_weights():
    page = heatmap_html(HeatmapCompletion(["a", "b", "c", "d"], [0.0, 0.4, 2.5, float("nan")]))
    assert 'title="w = 2.500"' in page and 'title="w = 0.000"' in page and 'title="w = nan"' in page
    colours = css_colours(page)
    assert is_blue(colours["a"]) and distance(colours["a"], colours["b"]) < 1  # w <= 0 sits at the blue end (1/2.5)
    heatmap_png(HeatmapCompletion(["a", "b"], [0.0, float("nan")]))  # draws without error
    with pytest.raises(ValueError, match="same length"):
        HeatmapCompletion(["a"], [1.0, 2.0])


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
    # A spread at the paper's tau (~1e-4) shows in the caption's digits, not as "max w 1.000 · min w 1.000"
    tiny = dict(token_weights, weights=torch.tensor([[1.0, 1.00007, 0.99995, 1.0, 0.99998, 1.0], [1.0] * 6]))
    caption = completions_from_token_weights(tiny, tokenizer)[0].caption
    assert "max w 1.00007" in caption and "min w 0.99995" in caption
    with pytest.raises(ValueError, match="mask"):
        completions_from_token_weights({"completion_ids": ids, "weights": ids}, tokenizer)


def prompt_rows(page: str) -> list[tuple[str | None, str | None, str | None]]:
    """(prompt shown, prompt on hover, expected answer) above each completion of an HTML page, unescaped."""
    rows = []
    for block in page.split('<div class="dgpo-caption">completion')[1:]:
        row = re.search(r'<div class="dgpo-prompt">(.*?)</div>', block.split('class="dgpo-completion"')[0], re.S)
        text = row.group(1) if row else ""
        prompt = re.search(r'prompt <span class="dgpo-text" title="([^"]*)">([^<]*)</span>', text)
        answer = re.search(r'expected <span class="dgpo-text">([^<]*)</span>', text)
        rows.append(
            (
                prompt and html.unescape(prompt.group(2)),
                prompt and html.unescape(prompt.group(1)),
                answer and html.unescape(answer.group(1)),
            )
        )
    return rows


LONG_PROMPT = (
    "system\nYou are a careful mathematician.\nuser\n" + "Let x be a real number. " * 200 + "Find x.\nassistant\n"
)


def test_prompts_and_expected_answers_are_drawn_above_their_completions(tmp_path):
    completions = [
        HeatmapCompletion(
            list("39956") + ["<eos>"], [1.0, 1.0, 1.0, 1.0, 3.0, 1.0], "completion 0", "r65993>", "39956"
        ),
        HeatmapCompletion(list("12") + ["<eos>"], [1.0, 0.5, 1.5], "completion 1", '<b>"x"</b>\tr12>'),
        HeatmapCompletion(list("42") + ["<eos>"], [1.0, 1.0, 1.0], "completion 2", LONG_PROMPT, "42"),
        HeatmapCompletion(list("7") + ["<eos>"], [1.0, 1.0], "completion 3"),
    ]
    page = heatmap_html(completions)
    rows = prompt_rows(page)
    assert rows[0] == ("r65993>", "r65993>", "39956")
    assert rows[1] == ('<b>"x"</b>→r12>', '<b>"x"</b>\tr12>', None)  # escaped; a tab shown as in token views
    assert "<b>" not in page
    shown, hover, answer = rows[2]
    assert hover == LONG_PROMPT and answer == "42"  # the whole prompt on hover
    assert len(shown) == PROMPT_CHARS and " … " in shown and "\n" not in shown  # one line, start and end
    assert shown.startswith("system↵You are") and shown.endswith("Find x.↵assistant↵")
    assert rows[3] == (None, None, None) and page.count('class="dgpo-prompt"') == 3

    fig = heatmap_png(completions)
    texts = [t.get_text() for t in fig.axes[0].texts]
    for row in ("r65993>", "39956", '<b>"x"</b>→r12>', "42"):
        assert row in texts
    long_row = next(t for t in texts if t.startswith("system↵"))
    assert " … " in long_row and long_row.endswith("assistant↵")
    import matplotlib.pyplot as plt

    plt.close(fig)


@pytest.mark.parametrize("width", [40, 80, 120])
def test_a_long_prompt_keeps_the_png_layout(tmp_path, width):
    """A prompt of thousands of characters is shortened to the page: the PNG is as wide as without the prompt (or as
    the `width` the token lines wrap at), and every text stays inside the figure."""
    tokens = list("The answer is 42.") + ["<eos>"]
    weights = [1.0] * (len(tokens) - 1) + [2.0]
    plain = heatmap_png(HeatmapCompletion(tokens, weights, "completion 0"), width=width)
    fig = heatmap_png(HeatmapCompletion(tokens, weights, "completion 0", LONG_PROMPT, "42" * 100), width=width)
    plain_width, fig_width = plain.get_size_inches()[0], fig.get_size_inches()[0]
    assert fig_width <= max(plain_width, (width + 4) * 0.1) + 1e-9
    assert fig.get_size_inches()[1] > plain.get_size_inches()[1]  # one more row, not more
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    figure_box = fig.bbox
    for text in fig.axes[0].texts:
        box = text.get_window_extent(renderer)
        assert figure_box.x0 - 1 <= box.x0 and box.x1 <= figure_box.x1 + 1, text.get_text()
    import matplotlib.pyplot as plt

    plt.close(plain)
    plt.close(fig)


def test_completions_carry_their_prompts_and_expected_answers():
    tokenizer = build_tokenizer()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    def left_padded(texts, width):
        rows = [tokenizer.convert_tokens_to_ids(list(text)) for text in texts]
        ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
        return ids, torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])

    prompt_ids, prompt_mask = left_padded(["r12345>", "r98>", "hello"], 8)
    completion_ids = torch.tensor([tokenizer.convert_tokens_to_ids(list("54321")) + [eos]] * 3)
    token_weights = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "weights": torch.ones(3, 6),
        "mask": torch.ones(3, 6, dtype=torch.bool),
    }
    completions = completions_from_token_weights(token_weights, tokenizer, expected_answer=REVERSAL.expected_answer)
    assert [(c.prompt, c.expected_answer) for c in completions] == [
        ("r12345>", "54321"),
        ("r98>", "89"),
        ("hello", None),
    ]
    # Without expected_answer: the prompts only; without prompts: neither, and no expected answer can be asked for
    assert [(c.prompt, c.expected_answer) for c in completions_from_token_weights(token_weights, tokenizer)] == [
        ("r12345>", None),
        ("r98>", None),
        ("hello", None),
    ]
    no_prompts = {k: v for k, v in token_weights.items() if not k.startswith("prompt")}
    assert all(c.prompt is None for c in completions_from_token_weights(no_prompts, tokenizer))
    with pytest.raises(ValueError, match="expected_answer needs the prompts"):
        completions_from_token_weights(no_prompts, tokenizer, expected_answer=REVERSAL.expected_answer)
    with pytest.raises(ValueError, match="expected_answer must be None or a callable"):
        completions_from_token_weights(token_weights, tokenizer, expected_answer="54321")
    with pytest.raises(ValueError, match="expected_answer"):
        TokenWeightHeatmapCallback(trainer=None, expected_answer=42)


def test_callback_rejects_bad_options():
    with pytest.raises(ValueError, match="formats"):
        TokenWeightHeatmapCallback(trainer=None, formats=("svg",))
    with pytest.raises(ValueError, match="num_completions"):
        TokenWeightHeatmapCallback(trainer=None, num_completions=0)


@pytest.mark.slow
def test_callback_writes_heatmaps_and_fills_the_completions_table(
    tiny_model_path,
    tmp_path,
    fake_trackio,
    monkeypatch,
):
    import dgpo_trl.visualize
    from dgpo_trl import DGPOConfig, DGPOTrainer

    args = DGPOConfig(**cpu_args(tmp_path / "run", max_steps=2, log_completions=True))
    dataset = reversal_dataset(64)
    trainer = DGPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=dataset)
    # After construction: the trainer must not start a real trackio run; TRL's log() reads report_to when it logs
    trainer.args.report_to = ["trackio"]
    callback = TokenWeightHeatmapCallback(trainer, num_completions=3, expected_answer=REVERSAL.expected_answer)
    trainer.add_callback(callback)
    drawn = []  # the completions of every PNG drawn: the files' and the trackers' images
    draw = dgpo_trl.visualize.heatmap_png
    monkeypatch.setattr(
        dgpo_trl.visualize,
        "heatmap_png",
        lambda completions, *a, **k: (drawn.append(completions), draw(completions, *a, **k))[1],
    )
    trainer.train()

    names = sorted(path.name for path in (tmp_path / "run" / "token_weights").iterdir())
    assert names == ["step_000001.html", "step_000001.png", "step_000002.html", "step_000002.png"]
    page = (tmp_path / "run" / "token_weights" / "step_000002.html").read_text()
    assert page.count('class="dgpo-completion"') == 3
    # Step 1 scores the batch before the first update (pi_theta = pi_ref): every w = 1, drawn white and said so
    first = (tmp_path / "run" / "token_weights" / "step_000001.html").read_text()
    assert "uniform weights" in legend(first) and set(css_colours(first).values()) == {(255, 255, 255)}
    tables = [entry["completions"] for entry in fake_trackio.logged if "completions" in entry]
    assert len(tables) >= 2
    prompts = set(dataset["prompt"])
    for table in tables[:2]:  # the two training steps
        with_image = table[table["image"].map(len) > 0]
        assert len(with_image) == 3  # one heatmap per drawn completion, on the row showing that completion
        assert all(cell[0][0] == "image" for cell in with_image["image"])
    # Every row of every heatmap shows its own prompt (the one TRL's table pairs with that completion) and its answer
    rows = prompt_rows(page)
    assert len(rows) == 3
    for prompt, hover, answer in rows:
        assert prompt == hover and prompt in prompts and answer == prompt[1:-1][::-1]
    # Per step: the file's PNG (3 completions), then the trackers' images (one per completion); each completion under
    # the prompt TRL's completions table pairs it with, and that prompt's answer
    assert [len(completions) for completions in drawn] == [3, 1, 1, 1] * 2
    special = set(trainer.processing_class.all_special_tokens)  # the table's text is decoded without them
    for step, table in enumerate(tables[:2]):
        pairs = set(zip(table["completion"], table["prompt"]))
        for completions in drawn[4 * step : 4 * step + 4]:
            for completion in completions:
                assert ("".join(t for t in completion.tokens if t not in special), completion.prompt) in pairs
                assert completion.expected_answer == completion.prompt[1:-1][::-1]
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

    args = DGPOConfig(**cpu_args(tmp_path / "run", max_steps=1, dgpo_uniform_weights=True))
    trainer = DGPOTrainer(tiny_model_path, reward_funcs=length_reward, args=args, train_dataset=reversal_dataset(32))
    callback = TokenWeightHeatmapCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.written == [] and not (tmp_path / "run" / "token_weights").exists()


def test_evaluation_heatmaps_get_their_own_files_and_titles(tiny_model_path, tmp_path):
    from dgpo_trl import DGPOConfig, DGPOTrainer

    args = DGPOConfig(
        **cpu_args(tmp_path / "run", max_steps=2, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=16)
    )
    trainer = DGPOTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=args,
        train_dataset=reversal_dataset(64),
        eval_dataset=reversal_dataset(4, seed=5),
    )
    kept = []  # (training?, the weights the trainer kept for that mode) after each scored batch
    apply = trainer._apply_token_weights

    def spy(inputs, stats, rows):
        apply(inputs, stats, rows)
        training = trainer.model.training
        kept.append(
            (training, getattr(trainer, "last_token_weights" if training else "last_eval_token_weights", None))
        )

    trainer._apply_token_weights = spy
    trainer.add_callback(TokenWeightHeatmapCallback(trainer, num_completions=3))
    trainer.train()

    train_weights = [w for training, w in kept if training]
    eval_weights = [w for training, w in kept if not training]
    assert len(train_weights) == 2 and len(eval_weights) == 2  # 2 steps; 32 eval completions in batches of 16
    assert trainer.last_token_weights is train_weights[-1]  # evaluation did not replace the training batch's
    assert trainer.last_eval_token_weights is eval_weights[-1] is not None
    directory = tmp_path / "run" / "token_weights"
    assert sorted(path.name for path in directory.iterdir()) == [
        "eval_step_000002.html",
        "eval_step_000002.png",
        "step_000001.html",
        "step_000001.png",
        "step_000002.html",
        "step_000002.png",
    ]
    tokenizer = trainer.processing_class

    def page(weights, title):
        return heatmap_html(completions_from_token_weights(weights, tokenizer, 3), title=title)

    # Each file draws its own batch under its own title: step 2's training heatmap is the training batch's
    assert (directory / "step_000002.html").read_text() == page(train_weights[1], "DGPO token weights, step 2")
    assert (directory / "eval_step_000002.html").read_text() == page(
        eval_weights[1], "DGPO token weights, evaluation at step 2"
    )
    assert not torch.equal(train_weights[1]["completion_ids"], eval_weights[1]["completion_ids"])


def test_evaluation_of_several_named_datasets_keeps_one_file_each(tiny_model_path, tmp_path):
    from dgpo_trl import DGPOConfig, DGPOTrainer

    args = DGPOConfig(
        **cpu_args(tmp_path / "run", max_steps=1, eval_strategy="steps", eval_steps=1, per_device_eval_batch_size=16)
    )
    trainer = DGPOTrainer(
        tiny_model_path,
        reward_funcs=length_reward,
        args=args,
        train_dataset=reversal_dataset(32),
        eval_dataset={
            "short": reversal_dataset(2, seed=5, max_digits=3),
            "long": reversal_dataset(2, seed=6, min_digits=6),
        },
    )
    trainer.add_callback(TokenWeightHeatmapCallback(trainer, num_completions=2, formats=("html",)))
    trainer.train()
    directory = tmp_path / "run" / "token_weights"
    assert sorted(path.name for path in directory.iterdir()) == [
        "eval_long_step_000001.html",
        "eval_short_step_000001.html",
        "step_000001.html",
    ]
    assert (
        "<h2>DGPO token weights, evaluation on long at step 1</h2>"
        in (directory / "eval_long_step_000001.html").read_text()
    )
