"""What each Lightning logger gets of a curvature pass beyond its scalars: figures and texts.

:class:`~lightning_hessian.dashboard.CurvatureDashboard` sends a pass's scalars to every logger through
``log_metrics``. Its figures (matplotlib ``Figure`` objects, drawn once per pass) and Markdown texts (the
latest per-block table, the theory-versus-measured table, the alerts) go to the loggers that accept them,
through one adapter ("sink") per logger kind:

* TensorBoard (``TensorBoardLogger``, or any logger whose ``experiment`` is a ``SummaryWriter``): figures
  as images, texts as text cards, and the custom-scalars layout (built by the dashboard, once per writer);
* Weights & Biases (``WandbLogger``): figures as ``wandb.Image``, texts as ``wandb.Html`` (the Markdown
  rendered to HTML, tables as tables), through the logger's own ``log_metrics``, so that they sit on the
  scalars' ``trainer/global_step`` axis under the logger's prefix;
* MLflow (``MLFlowLogger``): figures as PNG artifacts ``<tag>/step_<step>.png`` and texts as Markdown
  artifacts ``<tag>/step_<step>.md`` of the logger's run (MLflow artifacts have no step axis: the step
  is in the name, zero-padded so that the artifact browser lists them in order).

Any other logger gets no sink: scalars only.
"""

from __future__ import annotations

import html
import io
import re
from collections.abc import Mapping
from typing import Any, Protocol

from lightning.fabric.loggers import TensorBoardLogger
from lightning.pytorch.loggers import Logger, MLFlowLogger, WandbLogger
from torch.utils.tensorboard import SummaryWriter

__all__ = ["LoggerSink", "MLflowSink", "TensorBoardSink", "WandbSink", "sink_for"]


class LoggerSink(Protocol):
    """Writes one pass's figures and texts to one logger."""

    def write(self, step: int, figures: Mapping[str, Any], texts: Mapping[str, str]) -> None:
        """Write the pass's figures (matplotlib ``Figure`` by tag) and Markdown texts (by tag)."""


class TensorBoardSink:
    """Figures as images, texts as text cards, and (:meth:`write_layout`) the custom-scalars layout.

    Args:
        writer: the logger's ``SummaryWriter``.
        prefix: put before every figure and text tag (the dashboard's prefix).
        layout_prefix: what the logger puts before the scalar tags (``TensorBoardLogger(prefix=...)``) and
            the dashboard's prefix, for the layout's regexes.
    """

    def __init__(self, writer: SummaryWriter, prefix: str, layout_prefix: str) -> None:
        self.writer, self.prefix, self.layout_prefix = writer, prefix, layout_prefix

    @property
    def key(self) -> int:
        """Identifies the writer: two loggers sharing one writer get one layout."""
        return id(self.writer)

    def write_layout(self, layout: Mapping[str, Any], step: int, texts: Mapping[str, str]) -> None:
        """Write the custom-scalars layout and the texts that go with it (tags as given, no prefix)."""
        self.writer.add_custom_scalars(dict(layout))
        for tag, text in texts.items():
            self.writer.add_text(tag, text, step)

    def write(self, step: int, figures: Mapping[str, Any], texts: Mapping[str, str]) -> None:
        """Figures as images and texts as text cards at ``step``, then flush."""
        for tag, figure in figures.items():
            self.writer.add_figure(self.prefix + tag, figure, step, close=False)  # other loggers share it
        for tag, text in texts.items():
            self.writer.add_text(self.prefix + tag, text, step)
        self.writer.flush()


class WandbSink:
    """Figures as ``wandb.Image``, Markdown texts as ``wandb.Html``, on the scalars' step axis.

    HTML rather than a ``wandb.Table``: it keeps each text whole (title line, table, legend, notes).
    """

    def __init__(self, logger: WandbLogger, prefix: str) -> None:
        self.logger, self.prefix = logger, prefix

    def write(self, step: int, figures: Mapping[str, Any], texts: Mapping[str, str]) -> None:
        """All of the pass's media in one ``log`` call, at ``trainer/global_step`` = ``step``."""
        import wandb  # WandbLogger already needs it

        media: dict[str, Any] = {self.prefix + tag: wandb.Image(_png(fig)) for tag, fig in figures.items()}
        media |= {self.prefix + tag: wandb.Html(_markdown_html(text)) for tag, text in texts.items()}
        if media:
            # log_metrics adds the logger's prefix and ``trainer/global_step``, as for the scalars.
            self.logger.log_metrics(media, step)


class MLflowSink:
    """Figures as PNG artifacts, Markdown texts as ``.md`` artifacts of the logger's run."""

    def __init__(self, logger: MLFlowLogger, prefix: str) -> None:
        self.logger, self.prefix = logger, prefix

    def write(self, step: int, figures: Mapping[str, Any], texts: Mapping[str, str]) -> None:
        """One artifact per figure and text; a repeated step (a resumed run) overwrites its own."""
        client, run_id = self.logger.experiment, self.logger.run_id
        for tag, figure in figures.items():
            client.log_figure(run_id, figure, _artifact(self.prefix + tag, step, "png"))
        for tag, text in texts.items():
            client.log_text(run_id, text, _artifact(self.prefix + tag, step, "md"))


def sink_for(logger: Logger, prefix: str = "") -> TensorBoardSink | WandbSink | MLflowSink | None:
    """The sink of a Lightning logger, or ``None`` for a logger that gets scalars only.

    Args:
        logger: a Lightning logger.
        prefix: put before every figure and text tag (the dashboard's prefix).
    """
    if isinstance(logger, WandbLogger):
        return WandbSink(logger, prefix)
    if isinstance(logger, MLFlowLogger):
        return MLflowSink(logger, prefix)
    writer = _summary_writer(logger)  # last: it reads `experiment`, which starts some loggers' runs
    if writer is not None:
        return TensorBoardSink(writer, prefix, _tensorboard_prefix(logger) + prefix)
    return None


def _summary_writer(logger: Logger) -> Any | None:
    """The logger's TensorBoard writer, or ``None`` for other loggers."""
    if isinstance(logger, TensorBoardLogger):
        return logger.experiment
    experiment = getattr(logger, "experiment", None)
    return experiment if isinstance(experiment, SummaryWriter) else None


def _tensorboard_prefix(logger: Logger) -> str:
    """What ``TensorBoardLogger(prefix=...)`` puts before every scalar tag, so layout regexes match."""
    prefix = getattr(logger, "_prefix", "") if isinstance(logger, TensorBoardLogger) else ""
    return f"{prefix}{logger.LOGGER_JOIN_CHAR}" if prefix else ""


def _artifact(tag: str, step: int, extension: str) -> str:
    """The artifact path of a tag at a step: one folder per tag, steps zero-padded to sort in order."""
    return f"{tag}/step_{int(step):07d}.{extension}"


def _png(figure: Any) -> Any:
    """The figure rendered to a PIL image (PNG), without pyplot (the user's backend is left alone)."""
    from PIL import Image  # a matplotlib dependency; figures exist only with matplotlib

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer)


# --- Markdown (the subset the dashboard writes) to HTML, for wandb.Html ---------------------------------

_ROW = re.compile(r"^\s*\|(.*)\|\s*$")
_RULE = re.compile(r"^\s*\|(\s*:?-+:?\s*\|)+\s*$")  # a table's header separator, e.g. |:---|---:|
_CELL_SPLIT = re.compile(r"(?<!\\)\|")  # cells split on unescaped pipes


def _inline(text: str) -> str:
    """Escape, then **bold**, *italic* and `code`."""
    text = html.escape(text.replace("\\|", "|"), quote=False)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
    return re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"<i>\1</i>", text)


def _cells(line: str) -> list[str]:
    return [c.strip() for c in _CELL_SPLIT.split(_ROW.match(line).group(1))]


def _table(lines: list[str]) -> str:
    """A Markdown table (header, separator, rows) as an HTML table, right-aligned where ``---:``."""
    aligns = ["right" if c.endswith(":") else "left" for c in _cells(lines[1])]

    def row(cells: list[str], tag: str) -> str:
        return (
            "<tr>"
            + "".join(f"<{tag} style='text-align:{a}'>{_inline(c)}</{tag}>" for c, a in zip(cells, aligns))
            + "</tr>"
        )

    body = "".join(row(_cells(line), "td") for line in lines[2:])
    return f"<table><thead>{row(_cells(lines[0]), 'th')}</thead><tbody>{body}</tbody></table>"


def _markdown_html(markdown: str) -> str:
    """The dashboard's Markdown (paragraphs, ``-`` lists, tables, bold, italic, code) as HTML."""
    blocks: list[str] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif _ROW.match(line) and i + 1 < len(lines) and _RULE.match(lines[i + 1]):
            end = i + 2
            while end < len(lines) and _ROW.match(lines[end]):
                end += 1
            blocks.append(_table(lines[i:end]))
            i = end
        elif line.lstrip().startswith("- "):
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                text = lines[i].strip()
                if lines[i].lstrip().startswith("- "):
                    items.append(text[2:])
                elif items and lines[i][:1].isspace():
                    items[-1] += " " + text  # an indented continuation of the item above
                else:
                    break
                i += 1
            blocks.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in items) + "</ul>")
        else:
            end = i + 1
            while end < len(lines) and lines[end].strip() and not _ROW.match(lines[end]):
                if lines[end].lstrip().startswith("- "):
                    break
                end += 1
            blocks.append("<p>" + _inline(" ".join(x.strip() for x in lines[i:end])) + "</p>")
            i = end
    style = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px;font:13px sans-serif}"
    return f"<style>{style}</style>" + "\n".join(blocks)
