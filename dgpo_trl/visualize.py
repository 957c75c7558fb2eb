"""Token-weight heatmaps, like the paper's Fig. 4: each completion token's background intensity shows its weight w_t.

DGPO gives token t of completion i the advantage A_i * w_t with mean_t w_t = 1; a heatmap shows where the
sequence's credit went. `DGPOTrainer.last_token_weights` holds a few completions of the latest scored batch:
`{"completion_ids", "weights", "mask"}` of shape (n, T) and `"advantages"` of shape (n,).

- `heatmap_html(...)`: a self-contained HTML page (every token HTML-escaped: completions are untrusted text).
- `heatmap_png(...)`: the same picture as a PNG, with matplotlib.
- `completions_from_token_weights(...)`: `last_token_weights` -> `HeatmapCompletion`s, decoded with the tokenizer.
- `TokenWeightHeatmapCallback`: writes heatmaps at every logging step into `output_dir/token_weights/`, and when
  trackio or wandb is active adds each heatmap as an image to TRL's completions table.
"""

from __future__ import annotations

import html
import importlib
import sys
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback


__all__ = [
    "HeatmapCompletion",
    "TokenWeightHeatmapCallback",
    "completions_from_token_weights",
    "heatmap_html",
    "heatmap_png",
    "token_strings",
]

# Background colour of a token at full intensity (w = vmax); lower weights fade towards white. Capped below
# opaque so that the text on the most-weighted tokens stays readable.
_RGB = (214, 39, 40)
_MAX_ALPHA = 0.8


@dataclass
class HeatmapCompletion:
    """One completion to draw: its tokens (as text), their weights, and a caption (e.g. its advantage)."""

    tokens: list[str]
    weights: list[float]
    caption: str = ""

    def __post_init__(self):
        if len(self.tokens) != len(self.weights):
            raise ValueError(
                f"tokens and weights must have the same length, got {len(self.tokens)} and {len(self.weights)}."
            )


def token_strings(token_ids: Sequence[int], tokenizer) -> list[str]:
    """Each token id decoded on its own (special tokens kept: DGPO weights the EOS token too)."""
    return [tokenizer.decode([int(token_id)], skip_special_tokens=False) for token_id in token_ids]


def completions_from_token_weights(
    token_weights: dict, tokenizer, max_completions: int | None = None
) -> list[HeatmapCompletion]:
    """The completions of `DGPOTrainer.last_token_weights` as `HeatmapCompletion`s (valid tokens only)."""
    for key in ("completion_ids", "weights", "mask"):
        if key not in token_weights:
            raise ValueError(f"token_weights needs the key {key!r} (as in DGPOTrainer.last_token_weights).")
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
            caption += f" · max w {max(row_weights):.2f} · min w {min(row_weights):.2f}"
        completions.append(HeatmapCompletion(token_strings(ids[i][valid].tolist(), tokenizer), row_weights, caption))
    return completions


def _common_vmax(completions: Sequence[HeatmapCompletion], vmax: float | None) -> float:
    if vmax is not None:
        if not vmax > 0:
            raise ValueError(f"vmax must be > 0, got {vmax!r}.")
        return float(vmax)
    largest = max((max(c.weights) for c in completions if c.weights), default=1.0)
    return largest if largest > 0 else 1.0


def _intensity(weight: float, vmax: float) -> float:
    return _MAX_ALPHA * min(max(weight / vmax, 0.0), 1.0)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
.dgpo-completion { font-family: ui-monospace, Menlo, Consolas, monospace; white-space: pre-wrap; line-height: 1.9;
  border: 1px solid #ddd; border-radius: 6px; padding: 0.6em 0.8em; margin: 0.3em 0 1.2em 0; }
.dgpo-token { border-radius: 3px; padding: 0.1em 0; }
.dgpo-caption { font-size: 0.9em; color: #555; }
.dgpo-legend { display: inline-block; width: 12em; height: 0.9em; vertical-align: middle;
  background: linear-gradient(to right, rgba(214,39,40,0), rgba(214,39,40,0.8)); border: 1px solid #ccc; }
"""


def _token_html(token: str, weight: float, vmax: float) -> str:
    shown = html.escape(token, quote=True)
    # Whitespace-only tokens would be invisible: show a marker, and keep the line break itself
    if token == "\n":
        shown = "↵\n"
    elif token and not token.strip():
        shown = shown.replace(" ", "·").replace("\t", "→")
    alpha = _intensity(weight, vmax)
    r, g, b = _RGB
    return (
        f'<span class="dgpo-token" style="background-color: rgba({r},{g},{b},{alpha:.3f})" '
        f'title="w = {weight:.3f}">{shown}</span>'
    )


def heatmap_html(
    completions: Sequence[HeatmapCompletion] | HeatmapCompletion,
    *,
    title: str = "DGPO token weights",
    vmax: float | None = None,
) -> str:
    """A standalone HTML page drawing each completion's tokens on a background whose intensity is w_t / vmax.

    `vmax` defaults to the largest weight shown (all completions share one scale). Hovering a token shows its
    weight. Tokens, captions and the title are HTML-escaped.
    """
    if isinstance(completions, HeatmapCompletion):
        completions = [completions]
    scale = _common_vmax(completions, vmax)
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        f'<p class="dgpo-caption">Background intensity = w / {scale:.2f} (w is the token\'s share of its sequence '
        'advantage, mean 1 over the sequence): <span class="dgpo-legend"></span> 0 &rarr; '
        f"{scale:.2f}</p>",
    ]
    for completion in completions:
        parts.append(f'<div class="dgpo-caption">{html.escape(completion.caption)}</div>')
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


def heatmap_png(
    completions: Sequence[HeatmapCompletion] | HeatmapCompletion,
    path=None,
    *,
    title: str = "DGPO token weights",
    vmax: float | None = None,
    width: int = 80,
    dpi: int = 120,
):
    """Draws the completions like `heatmap_html` with matplotlib and saves a PNG to `path` (if given).

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
    scale = _common_vmax(completions, vmax)
    layouts = [_png_lines(c.tokens, width) for c in completions]
    # One x unit per character; the page is as wide as the longest token line, title or caption (at least 48)
    columns = max([48, len(title) + 24] + [len(c.caption) for c in completions])
    columns = max([columns] + [sum(len(shown) for shown, _ in line) for lines in layouts for line in lines])
    # Rows: a title row, then per completion a caption row, its token lines and a blank spacer
    total_rows = 1 + sum(len(lines) + 2 for lines in layouts)
    char_inches, row_inches = 0.1, 0.26
    # DejaVu Sans Mono advances 0.602 em per character: this size makes one character exactly one x unit wide
    font_size = char_inches * 72 / 0.602
    fig = plt.figure(figsize=((columns + 4) * char_inches, total_rows * row_inches + 0.3), dpi=dpi)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(-2, columns + 2)
    ax.set_ylim(total_rows + 0.5, -0.5)
    ax.axis("off")
    r, g, b = (c / 255 for c in _RGB)
    ax.text(0, 0, f"{title}  (intensity = w / {scale:.2f})", fontsize=10, weight="bold", va="center", parse_math=False)
    row = 1
    for completion, lines in zip(completions, layouts):
        ax.text(0, row, completion.caption, fontsize=8, color="#555555", va="center", parse_math=False)
        row += 1
        for line in lines:
            column = 0
            for shown, index in line:
                alpha = _intensity(completion.weights[index], scale)
                box = Rectangle((column, row - 0.42), len(shown), 0.84, facecolor=(r, g, b, alpha), linewidth=0)
                ax.add_patch(box)
                ax.text(column, row, shown, family="DejaVu Sans Mono", fontsize=font_size, va="center", parse_math=False)
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
    trainer's `last_token_weights` (a trainer without them, e.g. `dgpo_score="uniform"`, gets none).

    When trackio or wandb is active (`report_to`, and for wandb a live run) and the trainer logs completions
    (`log_completions=True`), each drawn completion's heatmap is added as an image to TRL's completions table, in its
    `image` column (TRL builds that table right after this callback runs; this goes through the trainer's private
    `_logs` buffer, checked for the expected layout first). With a backend active but `log_completions=False`, the
    heatmap of the drawn completions is logged as one image under `dgpo/token_weights` instead.

    Usage: `trainer.add_callback(TokenWeightHeatmapCallback(trainer))`.
    """

    def __init__(
        self,
        trainer,
        num_completions: int = 4,
        formats: Sequence[str] = ("html", "png"),
        subdir: str = "token_weights",
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
        self.written: list[Path] = []
        self._last_drawn = None  # the last_token_weights dict drawn last (a new batch brings a new dict)
        self._images_buffer = None  # the `image` column this callback put into TRL's table, if any
        self._replaced_maxlen = None  # the maxlen of TRL's own (empty) buffer it replaced

    def on_log(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        backends = _active_backends(args)
        if backends:
            # A heatmap put in the table at an earlier step must never sit beside another batch's rows
            self._release_images_column()
        token_weights = getattr(self.trainer, "last_token_weights", None)
        if token_weights is None or token_weights is self._last_drawn:
            return
        self._last_drawn = token_weights
        tokenizer = self.trainer.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a multimodal processor wraps its tokenizer
        completions = completions_from_token_weights(token_weights, tokenizer, self.num_completions)
        if not completions:
            return
        directory = Path(args.output_dir) / self.subdir
        directory.mkdir(parents=True, exist_ok=True)
        title = f"DGPO token weights, step {state.global_step}"
        stem = directory / f"step_{state.global_step:06d}"
        if "html" in self.formats:
            stem.with_suffix(".html").write_text(heatmap_html(completions, title=title), encoding="utf-8")
            self.written.append(stem.with_suffix(".html"))
        if "png" in self.formats:
            heatmap_png(completions, stem.with_suffix(".png"), title=title)
            self.written.append(stem.with_suffix(".png"))
        if backends:
            if getattr(self.trainer, "log_completions", False):
                images = [_figure_image(heatmap_png([c], title=title)) for c in completions]
                if self._fill_images_column(token_weights, tokenizer, images):
                    return
            combined = _figure_image(heatmap_png(completions, title=title))
            for backend in backends:
                backend.log({"dgpo/token_weights": backend.Image(combined)})

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
