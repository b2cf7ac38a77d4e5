"""A logged run read back from disk: curvature scalars, alerts and block kinds, from TensorBoard or CSV.

:func:`read_run` accepts a run directory (the newest folder below it holding TensorBoard event files or a
Lightning ``CSVLogger`` ``metrics.csv`` is read), an event file or a ``metrics.csv``. TensorBoard runs carry
everything :class:`~lightning_hessian.dashboard.CurvatureDashboard` wrote: scalars, the alerts' text and
the ``curvature/latest`` table (block kinds and layers). A CSV holds only scalars: alerts are known by their
count per pass, and kinds and layers are guessed from the block names.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lightning_hessian import tags

__all__ = ["LoggedAlert", "RunData", "read_run"]

_EVENTS = "events.out.tfevents.*"
_CSV = "metrics.csv"
_TEXT = "/text_summary"  # where SummaryWriter.add_text stores its string tensor
_ALERT_LINE = re.compile(r"^- \*\*(\w+)\*\* `([^`]+)`: (.*)$")
_TABLE_ROW = re.compile(r"^\| `([^`]+)` \| ([^|]+?) \| ([^|]+?) \|")
# Name-based guesses for CSV runs (no kinds logged): the last dotted component of a block's name.
_GUESSES = (
    ("query", r"(q|query|q_proj|to_q|wq)"),
    ("key", r"(k|key|k_proj|to_k|wk)"),
    ("value", r"(v|value|v_proj|to_v|wv)"),
    ("attn_out", r"(out_proj|o_proj|to_out|wo|dense)"),
    ("norm", r".*(norm|ln).*"),
    ("ffn_in", r"(linear1|fc1|c_fc|up_proj|gate_proj|w1|intermediate)"),
    ("ffn_out", r"(linear2|fc2|down_proj|w2)"),
    ("embedding", r".*(embed|wte|wpe|pos|cls).*"),
    ("head", r"(head|lm_head|classifier|fc)"),
)


@dataclass(frozen=True)
class LoggedAlert:
    """One alert as logged: ``severity`` is ``critical`` / ``warning`` / ``info``, or ``unknown`` (CSV)."""

    step: int
    severity: str
    rule: str
    message: str


@dataclass
class RunData:
    """A run's logged curvature: ``scalars[tag]`` is ``[(step, value), ...]`` by step; ``blocks[name]`` is
    ``(kind, layer)``, in the order the model lists them; ``kinds_guessed`` when they come from names."""

    source: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    alerts: list[LoggedAlert] = field(default_factory=list)
    blocks: dict[str, tuple[str, int | None]] = field(default_factory=dict)
    kinds_guessed: bool = False


def read_run(run_dir: str | Path) -> RunData:
    """Read a run logged by ``HessianMonitor`` (see the module docstring for what is accepted)."""
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"No such run: {path}")
    if path.is_file():
        found = path.parent if path.name != _CSV else path
    else:
        candidates = {p.parent for p in path.rglob(_EVENTS)} | set(path.rglob(_CSV))
        if not candidates:
            raise FileNotFoundError(f"No TensorBoard event files and no {_CSV} under {path}")
        found = max(candidates, key=lambda p: (_mtime(p), p.is_dir()))  # newest; TensorBoard on a tie
    data = _read_csv(found) if found.is_file() else _read_events(found)
    for name in sorted({parsed[0] for t in data.scalars if (parsed := tags.parse_block_tag(t))}):
        if name not in data.blocks:
            data.blocks[name] = _guess(name)
            data.kinds_guessed = True
    return data


def _mtime(path: Path) -> float:
    files = [path] if path.is_file() else list(path.glob(_EVENTS))
    return max(f.stat().st_mtime for f in files)


def _read_events(folder: Path) -> RunData:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    data = RunData(folder)
    for tag in acc.Tags()["scalars"]:
        data.scalars[tag] = sorted({e.step: float(e.value) for e in acc.Scalars(tag)}.items())
    texts = acc.Tags()["tensors"]

    def text(tag: str) -> dict[int, str]:
        events = acc.Tensors(tag + _TEXT) if tag + _TEXT in texts else []
        return {e.step: e.tensor_proto.string_val[0].decode() for e in events}

    for step, markdown in sorted(text("alerts").items()):
        for line in markdown.splitlines():
            if match := _ALERT_LINE.match(line):
                data.alerts.append(LoggedAlert(step, match[1].lower(), match[2], match[3]))
    latest = text("curvature/latest")
    for line in latest[max(latest)].splitlines() if latest else []:
        if match := _TABLE_ROW.match(line):
            layer = match[3].strip()
            data.blocks[match[1]] = (match[2].strip(), int(layer) if layer.isdigit() else None)
    if not data.alerts:
        data.alerts = _counted(data)
    return data


def _read_csv(path: Path) -> RunData:
    data = RunData(path)
    values: dict[str, dict[int, float]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.pop("step", "")
            if not step:
                continue
            for tag, value in row.items():
                if tag and value not in ("", None):
                    values.setdefault(tag, {})[int(float(step))] = float(value)
    data.scalars = {tag: sorted(by_step.items()) for tag, by_step in values.items()}
    data.alerts = _counted(data)
    return data


def _counted(data: RunData) -> list[LoggedAlert]:
    """Alerts known only by ``alerts/count``: one entry per pass with alerts."""
    return [
        LoggedAlert(step, "unknown", "alerts", f"{n:.0f} alert{'s' if n != 1 else ''} (details not logged)")
        for step, n in data.scalars.get(tags.ALERT_COUNT, [])
        if math.isfinite(n) and n > 0
    ]


def _guess(name: str) -> tuple[str, int | None]:
    """``(kind, layer)`` from a block name: the last dotted component, and the last integer component."""
    if name == "model":
        return "model", None
    parts = name.split(".")
    layer = next((int(p) for p in reversed(parts) if p.isdigit()), None)
    last = next((p for p in reversed(parts) if not p.isdigit() and p not in ("weight", "bias")), name)
    kind = next((k for k, pattern in _GUESSES if re.fullmatch(pattern, last.lower())), "other")
    return kind, layer
