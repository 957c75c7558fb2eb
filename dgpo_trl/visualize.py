"""Token-weight heatmaps, like the paper's Fig. 4: each completion token's background colour shows its weight w_t.

DGPO gives token t of completion i the advantage A_i * w_t with mean_t w_t = 1; a heatmap shows where the
sequence's credit went. `DGPOTrainer.last_token_weights` holds a few completions of the latest scored training batch
(`last_eval_token_weights`: of the latest evaluation batch): `{"completion_ids", "weights", "mask"}` of shape (n, T),
`"advantages"` of shape (n,), and their prompts, `{"prompt_ids", "prompt_mask"}` of shape (n, P) (left-padded).

Each completion is drawn under its prompt (shortened in the middle when long: `PROMPT_CHARS`) and, when the caller
passes `expected_answer` (a callable from the prompt's text to its answer, e.g. a synthetic task's
`dgpo_trl.tasks.REVERSAL.expected_answer`), the answer the prompt expects: a reader can then tell whether a
highlighted token is where the completion went wrong.

The colour scale diverges at the mean, w = 1 (white): blue below, red above, symmetric in log w (w = 2 and w = 0.5
are equally strong). By default its ends are 1/vmax and vmax with vmax = max(w, 1/w) over the weights shown, so
near-uniform weights (0.99-1.02 at the paper's tau = 0.5) use the whole scale and concentrated ones (0.1-8) stay
ordered; pass `vmax` to share one scale between several heatmaps (e.g. training steps). Weights that are all 1 (to
within 1e-6, float32 noise: e.g. step 1, where pi_theta = pi_ref) are drawn white, and the legend says they are
uniform. Every heatmap has a legend: the colour bar with its end values, and the smallest and largest weight shown.

- `heatmap_html(...)`: a self-contained HTML page (every token HTML-escaped: completions are untrusted text).
- `heatmap_png(...)`: the same picture as a PNG, with matplotlib.
- `completions_from_token_weights(...)`: `last_token_weights` -> `HeatmapCompletion`s, decoded with the tokenizer.
- `TokenWeightHeatmapCallback`: writes heatmaps at every logging step into `output_dir/token_weights/`, and when
  trackio or wandb is active adds each heatmap as an image to TRL's completions table.
"""

from __future__ import annotations

import html
import importlib
import math
import numbers
import sys
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback

__all__ = [
    "PROMPT_CHARS",
    "HeatmapCompletion",
    "TokenWeightHeatmapCallback",
    "completions_from_token_weights",
    "heatmap_html",
    "heatmap_png",
    "token_strings",
]

# Diverging colour ramps (ColorBrewer RdBu), from white at w = 1 out to each end of the scale, evenly spaced in
# |log w| / log vmax; colours in between are interpolated linearly. The ends are not the darkest RdBu shades, and
# tokens on the darker half get white text (`_text_rgb`), so every token stays readable.
_WHITE = (255, 255, 255)
_RED_RAMP = (_WHITE, (253, 219, 199), (244, 165, 130), (214, 96, 77), (178, 24, 43))
_BLUE_RAMP = (_WHITE, (209, 229, 240), (146, 197, 222), (67, 147, 195), (33, 102, 172))
_NAN_RGB = (221, 221, 221)  # a non-finite weight: no place on the scale
# Weights within this distance of 1 count as uniform: drawn white, and the legend says so. It is float32 noise (a few
# ulps of 1, ~1e-7), not signal: DGPO's weights at the paper's settings really do spread by 1e-5 to 1e-4, and a
# heatmap must show where that went
_UNIFORM_TOLERANCE = 1e-6
# The automatic scale never ends closer to 1 than this, so weights just past the tolerance are only tinted
_MIN_VMAX = 1 + 1e-5

PROMPT_CHARS = 160
"""The most characters of a prompt a heatmap shows (its start and end, around an ellipsis); the PNG shows at most its
`width`. The HTML page shows the whole prompt on hover."""
_ANSWER_CHARS = 40


@dataclass
class HeatmapCompletion:
    """One completion to draw: its tokens (as text), their weights, a caption (e.g. its advantage), and the text of
    its prompt and the answer that prompt expects (either drawn above the tokens when given)."""

    tokens: list[str]
    weights: list[float]
    caption: str = ""
    prompt: str | None = None
    expected_answer: str | None = None

    def __post_init__(self):
        if len(self.tokens) != len(self.weights):
            raise ValueError(
                f"tokens and weights must have the same length, got {len(self.tokens)} and {len(self.weights)}."
            )


def token_strings(token_ids: Sequence[int], tokenizer) -> list[str]:
    """Each token id decoded on its own (special tokens kept: DGPO weights the EOS token too)."""
    return [tokenizer.decode([int(token_id)], skip_special_tokens=False) for token_id in token_ids]


def completions_from_token_weights(
    token_weights: dict, tokenizer, max_completions: int | None = None, expected_answer: Callable | None = None
) -> list[HeatmapCompletion]:
    """The completions of `DGPOTrainer.last_token_weights` as `HeatmapCompletion`s (valid tokens only), with the text
    of their prompts when `token_weights` holds them (`prompt_ids`, `prompt_mask`).

    `expected_answer(prompt_text)` returns the answer a prompt expects (`None` where it does not know it), e.g. a
    synthetic task's `dgpo_trl.tasks.Task.expected_answer`; it gets the prompt as decoded without special tokens.
    """
    for key in ("completion_ids", "weights", "mask"):
        if key not in token_weights:
            raise ValueError(f"token_weights needs the key {key!r} (as in DGPOTrainer.last_token_weights).")
    _check_expected_answer(expected_answer)
    has_prompts = "prompt_ids" in token_weights and "prompt_mask" in token_weights
    if expected_answer is not None and not has_prompts:
        raise ValueError(
            "expected_answer needs the prompts: token_weights has no 'prompt_ids' and 'prompt_mask' (keys: "
            f"{sorted(token_weights)})."
        )
    ids, weights, mask = token_weights["completion_ids"], token_weights["weights"], token_weights["mask"]
    advantages = token_weights.get("advantages")
    count = len(ids) if max_completions is None else min(len(ids), max_completions)
    completions = []
    for i in range(count):
        valid = mask[i].bool()
        row_weights = [float(w) for w in weights[i][valid]]
        caption = f"completion {i}"
        if advantages is not None:
            caption += f" · advantage {float(advantages[i]):+.3f}"
        if row_weights:
            # Enough decimals for the spread to show: 1.109 / 0.966, or 1.00007 / 0.99995 at the paper's tau
            spread = max((abs(w - 1.0) for w in row_weights if math.isfinite(w)), default=1.0)
            digits = 3 if spread == 0 else max(3, min(7, math.ceil(-math.log10(spread)) + 1))
            caption += f" · max w {max(row_weights):.{digits}f} · min w {min(row_weights):.{digits}f}"
        prompt = answer = None
        if has_prompts:
            prompt_ids = token_weights["prompt_ids"][i][token_weights["prompt_mask"][i].bool()].tolist()
            prompt = tokenizer.decode(prompt_ids, skip_special_tokens=True)
            if expected_answer is not None:
                answer = expected_answer(prompt)
                answer = None if answer is None else str(answer)
        completions.append(
            HeatmapCompletion(token_strings(ids[i][valid].tolist(), tokenizer), row_weights, caption, prompt, answer)
        )
    return completions


def _check_expected_answer(expected_answer) -> None:
    if expected_answer is not None and not callable(expected_answer):
        raise ValueError(
            "expected_answer must be None or a callable from a prompt's text to its answer (e.g. "
            f"dgpo_trl.tasks.REVERSAL.expected_answer), got {expected_answer!r}."
        )


def _one_line(text: str) -> str:
    """`text` on one line: line breaks and tabs shown as the markers the token views use."""
    return text.replace("\r\n", "\n").replace("\n", "↵").replace("\t", "→")


def _shorten(text: str, limit: int) -> str:
    """`text` on one line, at most `limit` characters: its start and end around " … " when longer."""
    text = _one_line(text)
    if len(text) <= limit:
        return text
    keep = max(limit - 3, 2)
    head = (keep + 1) // 2
    return f"{text[:head]} … {text[len(text) - (keep - head) :]}"


# ----------------------------------------------------------------------------------------------------------------
# The colour scale


def _check_vmax(vmax) -> float | None:
    if vmax is None:
        return None
    if isinstance(vmax, bool) or not isinstance(vmax, numbers.Real) or not math.isfinite(vmax) or not vmax > 1:
        raise ValueError(
            f"vmax must be a finite number > 1 (the weight at the red end of the scale; 1/vmax is the blue end), "
            f"got {vmax!r}."
        )
    return float(vmax)


@dataclass(frozen=True)
class _Scale:
    """The diverging colour scale of one heatmap: white at w = 1, full blue at 1/vmax, full red at vmax."""

    vmax: float
    observed: tuple[float, float] | None  # the smallest and largest finite weight shown
    uniform: bool  # every finite weight is 1 within _UNIFORM_TOLERANCE
    fixed: bool  # vmax came from the caller

    @classmethod
    def of(cls, completions: Sequence[HeatmapCompletion], vmax: float | None) -> _Scale:
        fixed = _check_vmax(vmax)
        finite = [float(w) for c in completions for w in c.weights if math.isfinite(w)]
        observed = (min(finite), max(finite)) if finite else None
        uniform = bool(finite) and all(abs(w - 1.0) <= _UNIFORM_TOLERANCE for w in finite)
        if fixed is None:
            # Symmetric in log w: the end is the weight farthest from 1 by ratio (w <= 0 sits at the blue end)
            ratios = [max(w, 1.0 / w) for w in finite if w > 0 and math.isfinite(1.0 / w)]
            return cls(max([_MIN_VMAX, *ratios]), observed, uniform, False)
        return cls(fixed, observed, uniform, True)

    def position(self, weight: float) -> float | None:
        """Where `weight` sits on the scale: -1 (blue end) ... 0 (w = 1, white) ... 1 (red end); None if not finite."""
        weight = float(weight)
        if math.isnan(weight):
            return None
        if self.uniform and not self.fixed:
            return 0.0
        if weight <= 0:
            return -1.0
        if math.isinf(weight):
            return 1.0
        return max(-1.0, min(1.0, math.log(weight) / math.log(self.vmax)))

    def rgb(self, weight: float) -> tuple[int, int, int]:
        position = self.position(weight)
        return _NAN_RGB if position is None else _ramp_rgb(position)

    def decimals(self) -> int:
        """Decimals that tell the scale's ends (and weights near them) apart from 1: 3 for 0.98-1.02, 2 for 0.1-8."""
        if self.uniform and not self.fixed:
            return 4  # the tolerance's digits: "1.0000"
        return max(2, min(6, math.ceil(-math.log10(self.vmax - 1.0) - 1e-9) + 1))

    def number(self, weight: float) -> str:
        if not math.isfinite(weight):
            return str(weight)
        decimals = self.decimals()
        if 0 < abs(weight) < 10**-decimals:  # e.g. the blue end of a very wide scale
            return f"{weight:.2g}"
        return f"{weight:.{decimals}f}"

    def ticks(self) -> tuple[str, str, str]:
        """The labels of the colour bar's left end, middle and right end (uniform weights use no scale: no ends)."""
        if self.uniform and not self.fixed:
            return "", "1", ""
        return self.number(1.0 / self.vmax), "1", self.number(self.vmax)

    def legend_lines(self) -> tuple[str, str]:
        """The legend's text beside the colour bar: what the colours mean, and the weights observed."""
        if self.observed is None:
            return "no weights to show", ""
        low, high = (self.number(w) for w in self.observed)
        observed = f"observed: min {low}, max {high}"
        if self.uniform:
            meaning = f"uniform weights: every w = 1 within ±{_UNIFORM_TOLERANCE:g}"
            return meaning + ("" if self.fixed else ", drawn white"), observed
        return "blue: w < 1 · white: w = 1 (the mean) · red: w > 1 · log scale, w and 1/w equally strong", observed


def _ramp_rgb(position: float) -> tuple[int, int, int]:
    ramp = _RED_RAMP if position >= 0 else _BLUE_RAMP
    x = min(abs(position), 1.0) * (len(ramp) - 1)
    i = min(int(x), len(ramp) - 2)
    f = x - i
    return tuple(round(a + (b - a) * f) for a, b in zip(ramp[i], ramp[i + 1]))


def _text_rgb(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black or white text, whichever contrasts more with `background` (WCAG relative luminance)."""

    def linear(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in background)
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return (0, 0, 0) if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else (255, 255, 255)


def _css_gradient() -> str:
    """The colour bar as a CSS gradient: the same stops as `_ramp_rgb`, blue end at the left."""
    stops = list(reversed(_BLUE_RAMP)) + list(_RED_RAMP[1:])
    return ", ".join(f"rgb{rgb} {100 * i / (len(stops) - 1):g}%" for i, rgb in enumerate(stops))


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.dgpo-completion { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.9;
  border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.3em 0 1.2em 0; }
.dgpo-token { border-radius: 3px; padding: 0.1em 0; }
.dgpo-caption { font-size: 0.9em; color: #555; }
.dgpo-prompt { font-size: 0.9em; color: #555; margin-top: 0.2em; }
.dgpo-text { font-family: ui-monospace, Menlo, Consolas, monospace; color: #222; background: #f2f2f2;
  border-radius: 3px; padding: 0.1em 0.3em; }
.dgpo-legend { display: flex; align-items: flex-start; gap: 1em; flex-wrap: wrap; margin: 0.3em 0 1.2em 0; }
.dgpo-scale { width: 16em; flex: none; }
.dgpo-bar { height: 0.9em; border: 1px solid #bbb; border-radius: 2px; }
.dgpo-ticks { position: relative; height: 1.3em; font-size: 0.8em; color: #444; }
.dgpo-ticks span { position: absolute; top: 0.1em; }
.dgpo-ticks .dgpo-mid { left: 50%; transform: translateX(-50%); }
.dgpo-ticks .dgpo-high { right: 0; }
"""


def _token_html(token: str, weight: float, scale: _Scale) -> str:
    shown = html.escape(token, quote=True)
    # Whitespace-only tokens would be invisible: show a marker, and keep the line break itself
    if token == "\n":
        shown = "↵\n"
    elif token and not token.strip():
        shown = shown.replace(" ", "·").replace("\t", "→")
    background = scale.rgb(weight)
    style = "background-color: rgb({},{},{})".format(*background)
    if _text_rgb(background) != (0, 0, 0):
        style += "; color: #fff"
    number = f"{weight:.{max(3, scale.decimals())}f}" if math.isfinite(weight) else str(weight)
    return f'<span class="dgpo-token" style="{style}" title="w = {number}">{shown}</span>'


def _prompt_html(completion: HeatmapCompletion) -> str:
    """The prompt (shortened; whole on hover) and expected answer above a completion; empty when neither is known."""
    parts = []
    if completion.prompt is not None:
        full = html.escape(completion.prompt, quote=True)
        shown = html.escape(_shorten(completion.prompt, PROMPT_CHARS))
        parts.append(f'prompt <span class="dgpo-text" title="{full}">{shown}</span>')
    if completion.expected_answer is not None:
        shown = html.escape(_shorten(completion.expected_answer, _ANSWER_CHARS))
        parts.append(f'expected <span class="dgpo-text">{shown}</span>')
    return f'<div class="dgpo-prompt">{" · ".join(parts)}</div>' if parts else ""


def _legend_html(scale: _Scale) -> str:
    low, mid, high = (html.escape(t) for t in scale.ticks())
    return (
        '<div class="dgpo-legend"><div class="dgpo-scale">'
        f'<div class="dgpo-bar" style="background: linear-gradient(to right, {_css_gradient()})"></div>'
        f'<div class="dgpo-ticks"><span class="dgpo-low">{low}</span><span class="dgpo-mid">{mid}</span>'
        f'<span class="dgpo-high">{high}</span></div></div>'
        f'<div class="dgpo-caption">{"<br>".join(html.escape(line) for line in scale.legend_lines() if line)}<br>'
        "w is the token's share of its sequence's advantage (mean 1 over the completion); hover over a token to see "
        "its w.</div></div>"
    )


def heatmap_html(
    completions: Sequence[HeatmapCompletion] | HeatmapCompletion,
    *,
    title: str = "DGPO token weights",
    vmax: float | None = None,
) -> str:
    """A standalone HTML page drawing each completion's tokens on a background coloured by their weight w_t.

    The colours diverge at w = 1 (white): blue below, red above, symmetric in log w, with full blue at 1/vmax and
    full red at vmax (weights beyond are clipped to the ends). `vmax` (> 1) defaults to max(w, 1/w) over all the
    weights shown (all completions share one scale); pass it to compare several heatmaps on one scale. Weights
    all equal to 1 (within 1e-6) are drawn white unless `vmax` is given. A legend gives the scale's end values and
    the smallest and largest weight; hovering a token shows its weight. Above each completion: its prompt (at most
    `PROMPT_CHARS` characters on one line, the whole prompt on hover) and expected answer, when known. Tokens,
    captions, prompts, answers and the title are HTML-escaped.
    """
    if isinstance(completions, HeatmapCompletion):
        completions = [completions]
    scale = _Scale.of(completions, vmax)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        _legend_html(scale),
    ]
    for completion in completions:
        parts.append(f'<div class="dgpo-caption">{html.escape(completion.caption)}</div>')
        parts.append(_prompt_html(completion))
        tokens = "".join(_token_html(t, w, scale) for t, w in zip(completion.tokens, completion.weights))
        parts.append(f'<div class="dgpo-completion">{tokens}</div>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _png_lines(tokens: Sequence[str], width: int) -> list[list[tuple[str, int]]]:
    """Lays tokens out in lines of at most `width` characters: [[(shown_text, token_index), ...], ...]."""
    lines: list[list[tuple[str, int]]] = [[]]
    used = 0
    for index, token in enumerate(tokens):
        breaks = token.count("\n")
        shown = token.replace("\n", "¶").replace("\t", "→") or "∅"
        if used + len(shown) > width and lines[-1]:
            lines.append([])
            used = 0
        lines[-1].append((shown, index))
        used += len(shown)
        for _ in range(breaks):
            lines.append([])
            used = 0
    return lines


def _png_prompt_segments(completion: HeatmapCompletion, width: int) -> list[tuple[str, bool]]:
    """The PNG's prompt row: [(text, boxed), ...], labels unboxed, the prompt and answer boxed; at most `width`
    characters in all (the prompt gives way first), or [] when neither prompt nor answer is known."""
    segments = []
    answer = None if completion.expected_answer is None else _shorten(completion.expected_answer, _ANSWER_CHARS)
    answer_segments = [("  expected ", False), (answer, True)] if answer is not None else []
    if completion.prompt is not None:
        room = width - len("prompt ") - sum(len(text) for text, _ in answer_segments)
        segments = [("prompt ", False), (_shorten(completion.prompt, max(min(room, PROMPT_CHARS), 12)), True)]
    elif answer_segments:
        answer_segments[0] = ("expected ", False)
    return segments + answer_segments


_BAR_COLUMNS = 24  # the PNG legend's colour bar, in character widths
_LEGEND_ROWS = 2


def _unit_rgb(rgb: tuple[int, int, int]) -> tuple[float, float, float]:
    return tuple(c / 255 for c in rgb)


def _draw_png_legend(ax, scale: _Scale, row: float) -> None:
    """The colour bar (row `row`), its end and middle values below it, and the legend's text to its right."""
    from matplotlib.patches import Rectangle

    segments = 96
    for k in range(segments):
        position = -1 + (2 * k + 1) / segments
        x = _BAR_COLUMNS * k / segments
        ax.add_patch(
            Rectangle(
                (x, row - 0.3),
                _BAR_COLUMNS / segments + 0.02,
                0.6,
                facecolor=_unit_rgb(_ramp_rgb(position)),
                linewidth=0,
            )
        )
    ax.add_patch(Rectangle((0, row - 0.3), _BAR_COLUMNS, 0.6, fill=False, edgecolor="#999999", linewidth=0.6))
    for x, label, align in zip((0, _BAR_COLUMNS / 2, _BAR_COLUMNS), scale.ticks(), ("left", "center", "right")):
        ax.text(x, row + 0.72, label, fontsize=7.5, color="#333333", ha=align, va="center", parse_math=False)
    for offset, line in zip((0, 0.72), scale.legend_lines()):
        ax.text(_BAR_COLUMNS + 2, row + offset, line, fontsize=8, color="#333333", va="center", parse_math=False)


def heatmap_png(
    completions: Sequence[HeatmapCompletion] | HeatmapCompletion,
    path=None,
    *,
    title: str = "DGPO token weights",
    vmax: float | None = None,
    width: int = 80,
    dpi: int = 120,
):
    """Draws the completions like `heatmap_html` (same colours, scale, `vmax` and legend) with matplotlib and
    saves a PNG to `path` (if given). Token lines wrap at `width` characters; a completion's prompt and expected
    answer share one row above its tokens, the prompt shortened in the middle to fit `width`.

    Returns the matplotlib `Figure` (closed after saving when `path` is given). Text is drawn literally (no
    mathtext), so `$` in a completion is just a character.
    """
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # files only; a notebook that already chose a backend keeps it
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if isinstance(completions, HeatmapCompletion):
        completions = [completions]
    scale = _Scale.of(completions, vmax)
    layouts = [_png_lines(c.tokens, width) for c in completions]
    prompt_rows = [_png_prompt_segments(c, width) for c in completions]
    # One x unit per character; the page is as wide as the longest token line, prompt row, title, caption or legend
    # line (at least 48). Proportional 8-point text takes about 0.6 of a unit per character.
    legend_columns = _BAR_COLUMNS + 2 + 0.62 * max(len(line) for line in scale.legend_lines())
    columns = max([48, len(title) + 24, math.ceil(legend_columns)] + [len(c.caption) for c in completions])
    columns = max([columns] + [sum(len(shown) for shown, _ in line) for lines in layouts for line in lines])
    columns = max([columns] + [sum(len(text) for text, _ in segments) for segments in prompt_rows])
    # Rows: a title row, the legend, then per completion a caption row, its prompt row (when known), its token lines
    # and a blank spacer
    total_rows = 1 + _LEGEND_ROWS + sum(len(lines) + 2 + bool(p) for lines, p in zip(layouts, prompt_rows))
    char_inches, row_inches = 0.1, 0.26
    # DejaVu Sans Mono advances 0.602 em per character: this size makes one character exactly one x unit wide
    font_size = char_inches * 72 / 0.602
    fig = plt.figure(figsize=((columns + 4) * char_inches, total_rows * row_inches + 0.3), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-2, columns + 2)
    ax.set_ylim(total_rows + 0.5, -0.5)
    ax.axis("off")
    ax.text(0, 0, title, fontsize=10, weight="bold", va="center", parse_math=False)
    _draw_png_legend(ax, scale, 1)
    row = 1 + _LEGEND_ROWS
    for completion, lines, segments in zip(completions, layouts, prompt_rows):
        ax.text(0, row, completion.caption, fontsize=8, color="#555555", va="center", parse_math=False)
        row += 1
        if segments:
            column = 0
            for text, boxed in segments:
                if boxed:
                    ax.add_patch(Rectangle((column, row - 0.42), len(text), 0.84, facecolor="#f2f2f2", linewidth=0))
                ax.text(
                    column,
                    row,
                    text,
                    family="DejaVu Sans Mono",
                    fontsize=font_size,
                    va="center",
                    color="#222222" if boxed else "#777777",
                    parse_math=False,
                )
                column += len(text)
            row += 1
        for line in lines:
            column = 0
            for shown, index in line:
                background = scale.rgb(completion.weights[index])
                box = Rectangle((column, row - 0.42), len(shown), 0.84, facecolor=_unit_rgb(background), linewidth=0)
                ax.add_patch(box)
                ax.text(
                    column,
                    row,
                    shown,
                    family="DejaVu Sans Mono",
                    fontsize=font_size,
                    va="center",
                    color=_unit_rgb(_text_rgb(background)),
                    parse_math=False,
                )
                column += len(shown)
            row += 1
        row += 1
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
        plt.close(fig)
    return fig


# ----------------------------------------------------------------------------------------------------------------
# Training-time heatmaps


class TokenWeightHeatmapCallback(TrainerCallback):
    """Writes token-weight heatmaps of a few completions at every logging step of a `DGPOTrainer`.

    Files: `<output_dir>/token_weights/step_<global_step>.html` (and `.png` when `"png"` is in `formats`), from the
    trainer's `last_token_weights` (a trainer without them, e.g. `dgpo_uniform_weights=True`, gets none). After each
    evaluation, the evaluation batch's weights (`last_eval_token_weights`) go to their own files,
    `eval_step_<global_step>.html` (`eval_<name>_step_...` for each of several named eval datasets), titled as an
    evaluation: they never replace the training heatmap of the same step.

    When trackio or wandb is active (`report_to`, and for wandb a live run) and the trainer logs completions
    (`log_completions=True`), each drawn completion's heatmap is added as an image to TRL's completions table, in its
    `image` column (TRL builds that table right after this callback runs; this goes through the trainer's private
    `_logs` buffer, checked for the expected layout first). With a backend active but `log_completions=False`, the
    heatmap of the drawn completions is logged as one image under `dgpo/token_weights` instead.

    `vmax` (> 1) fixes the colour scale (1/vmax ... 1 ... vmax) so that all steps share it; by default each step's
    heatmap spans its own weights (see `heatmap_html`).

    Every completion is drawn under its prompt, in the files and the trackers' images alike; `expected_answer`, a
    callable from a prompt's text to the answer it expects (`None` where unknown), adds that answer beside it.

    Usage: `trainer.add_callback(TokenWeightHeatmapCallback(trainer))`, or for a synthetic task
    `TokenWeightHeatmapCallback(trainer, expected_answer=dgpo_trl.tasks.REVERSAL.expected_answer)`.
    """

    def __init__(
        self,
        trainer,
        num_completions: int = 4,
        formats: Sequence[str] = ("html", "png"),
        subdir: str = "token_weights",
        vmax: float | None = None,
        expected_answer: Callable | None = None,
    ):
        unknown = set(formats) - {"html", "png"}
        if unknown or not formats:
            raise ValueError(f"formats must be a non-empty subset of ['html', 'png'], got {list(formats)!r}.")
        if isinstance(num_completions, bool) or not isinstance(num_completions, int) or num_completions < 1:
            raise ValueError(f"num_completions must be an integer >= 1, got {num_completions!r}.")
        self.trainer = trainer
        self.num_completions = num_completions
        self.formats = tuple(formats)
        self.subdir = subdir
        self.vmax = _check_vmax(vmax)
        _check_expected_answer(expected_answer)
        self.expected_answer = expected_answer
        self.written: list[Path] = []
        # The weights dict drawn last, per trainer attribute (a new batch brings a new dict)
        self._last_drawn = {"last_token_weights": None, "last_eval_token_weights": None}
        self._images_buffer = None  # the `image` column this callback put into TRL's table, if any
        self._replaced_maxlen = None  # the maxlen of TRL's own (empty) buffer it replaced

    def on_log(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        backends = _active_backends(args)
        if backends:
            # A heatmap put in the table at an earlier step must never sit beside another batch's rows
            self._release_images_column()
        # An evaluation logs its own metrics after its batches: draw its weights, under its own names
        evaluation = _evaluation_prefix(kwargs.get("logs") or {})
        source = "last_token_weights" if evaluation is None else "last_eval_token_weights"
        token_weights = getattr(self.trainer, source, None)
        if token_weights is None or token_weights is self._last_drawn[source]:
            return
        self._last_drawn[source] = token_weights
        tokenizer = self.trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps its tokenizer
        completions = completions_from_token_weights(
            token_weights, tokenizer, self.num_completions, expected_answer=self.expected_answer
        )
        if not completions:
            return
        directory = Path(args.output_dir) / self.subdir
        directory.mkdir(parents=True, exist_ok=True)
        if evaluation is None:
            title = f"DGPO token weights, step {state.global_step}"
            stem = directory / f"step_{state.global_step:06d}"
        else:
            dataset = evaluation[len("eval_") :]
            title = f"DGPO token weights, evaluation{f' on {dataset}' if dataset else ''} at step {state.global_step}"
            stem = directory / f"{evaluation}_step_{state.global_step:06d}"
        if "html" in self.formats:
            page = heatmap_html(completions, title=title, vmax=self.vmax)
            stem.with_suffix(".html").write_text(page, encoding="utf-8")
            self.written.append(stem.with_suffix(".html"))
        if "png" in self.formats:
            heatmap_png(completions, stem.with_suffix(".png"), title=title, vmax=self.vmax)
            self.written.append(stem.with_suffix(".png"))
        if backends:
            if getattr(self.trainer, "log_completions", False):
                # One image per row, all on the scale of the drawn completions (so rows compare), unless uniform
                scale = _Scale.of(completions, self.vmax)
                vmax = None if scale.uniform and self.vmax is None else scale.vmax
                images = [_figure_image(heatmap_png([c], title=title, vmax=vmax)) for c in completions]
                if self._fill_images_column(token_weights, tokenizer, images):
                    return
            combined = _figure_image(heatmap_png(completions, title=title, vmax=self.vmax))
            key = "dgpo/token_weights" if evaluation is None else f"{evaluation}_dgpo/token_weights"
            for backend in backends:
                backend.log({key: backend.Image(combined)})

    def _trl_logs(self) -> dict | None:
        """TRL's completions-table buffer, if it has the layout this callback was written against (TRL 1.16)."""
        logs = getattr(self.trainer, "_logs", None)
        if isinstance(logs, dict) and "completion" in logs and "images" in logs:
            return logs
        return None

    def _release_images_column(self) -> None:
        logs = self._trl_logs()
        if logs is not None and self._images_buffer is not None and logs["images"] is self._images_buffer:
            logs["images"] = deque(maxlen=self._replaced_maxlen)
        self._images_buffer = None

    def _fill_images_column(self, token_weights, tokenizer, images) -> bool:
        """Puts each heatmap in the `image` column of the completions-table row showing the same completion text.

        Leaves the column alone (returns False) when it holds a multimodal model's prompt images, or when no drawn
        completion is found among the table's rows.
        """
        logs = self._trl_logs()
        if logs is None or len(logs["images"]) > 0:
            return False
        rows = [_row_text(completion) for completion in logs["completion"]]
        ids, mask = token_weights["completion_ids"], token_weights["mask"]
        cells: list[list] = [[] for _ in rows]
        placed = 0
        for i, image in enumerate(images):
            text = tokenizer.decode(ids[i][mask[i].bool()].tolist(), skip_special_tokens=True)
            for row, row_text in enumerate(rows):
                if not cells[row] and row_text == text:
                    cells[row] = [image]
                    placed += 1
                    break
        if not placed:
            return False
        maxlen = self._replaced_maxlen = logs["images"].maxlen
        self._images_buffer = deque(cells, maxlen=None if maxlen is None else max(maxlen, len(cells)))
        logs["images"] = self._images_buffer
        return True


def _evaluation_prefix(logs: dict) -> str | None:
    """The metric prefix of an evaluation's log: "eval", or "eval_<name>" for one of several named eval datasets
    (`Trainer.evaluate` logs `<prefix>_runtime`); None for a training log."""
    for key in logs:
        if key.startswith("eval") and key.endswith("_runtime"):
            return key[: -len("_runtime")]
    return "eval" if any(key.startswith("eval_") for key in logs) else None


def _row_text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content") or "")
    return str(completion)


def _figure_image(fig):
    """A matplotlib figure as a PIL image (what trackio/wandb `Image` take), the figure closed."""
    import io

    import matplotlib.pyplot as plt
    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def _active_backends(args) -> list:
    """The trackio/wandb modules the run reports to, imported only when asked for (and, for wandb, with a run)."""
    report_to = args.report_to or []
    if isinstance(report_to, str):
        report_to = [report_to]
    backends = []
    for name in ("wandb", "trackio"):
        if name not in report_to and "all" not in report_to:
            continue
        try:
            module = sys.modules.get(name) or importlib.import_module(name)
        except ImportError:
            continue
        if name == "wandb" and getattr(module, "run", None) is None:
            continue
        backends.append(module)
    return backends
