"""Check, or rewrite, the numbers docs/dashboards.md quotes from a run of the demo.

Every quoted number is followed by an invisible marker saying where it comes from::

    λ_max = 118<!--q stability/sharpness@75--> against 2/lr = 67<!--q stability/threshold@75-->

A marker is ``TAG@STEP`` (the scalar at that step), ``TAG@A-B:max`` or ``TAG@A-B:min`` (over the passes in
steps A to B), either with ``*100`` appended for a percentage, ``passes`` (the number of curvature passes)
or ``alerts:SEVERITY`` / ``alerts:SEVERITY@STEP`` (how many alerts of that severity the run raised, in all
or at one pass, read from its ``alerts`` text). A number matches when it equals the logged value
rounded to the significant digits it is written with (``1,860`` has 3, ``2.0`` 2, ``0.39`` 2).

    python examples/train_vit_digits.py --logdir runs/vit_digits     # the demo, ~3 min
    python docs/quoted_numbers.py --logdir runs/vit_digits           # check: exit 1 on a mismatch
    python docs/quoted_numbers.py --logdir runs/vit_digits --write   # rewrite the numbers from the run

``.ci/run`` runs the check after the demo, so a change that moves a quoted number fails CI.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path

from lightning_hessian.run_data import RunData, read_run

DOC = Path(__file__).resolve().parent / "dashboards.md"
QUOTED = re.compile(r"(-?\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?)<!--q ([^>]+?)-->")
SOURCE = re.compile(r"^(?P<tag>[^@]+)@(?P<a>\d+)(?:-(?P<b>\d+):(?P<op>max|min))?(?P<percent>\*100)?$")


def value(data: RunData, source: str) -> float:
    """The number a marker names (see the module docstring); ``KeyError`` when the run does not have it."""
    if source == "passes":
        return float(len(data.scalars["curvature/model/top_eigenvalue"]))
    if source.startswith("alerts:"):
        severity, _, step = source.removeprefix("alerts:").partition("@")
        return float(sum(a.severity == severity and (not step or a.step == int(step)) for a in data.alerts))
    match = SOURCE.match(source)
    if match is None:
        raise KeyError(f"bad marker {source!r}")
    points = dict(data.scalars[match["tag"]])
    scale = 100.0 if match["percent"] else 1.0
    if match["op"] is None:
        return scale * points[int(match["a"])]
    chosen = [v for s, v in points.items() if int(match["a"]) <= s <= int(match["b"])]
    if not chosen:
        raise KeyError(source)
    return scale * (max(chosen) if match["op"] == "max" else min(chosen))


def significant(text: str) -> int:
    """Significant digits of a written number (``0.039`` -> 2, ``1,860`` -> 3, ``2.0`` -> 2)."""
    mantissa = text.lstrip("-").replace(",", "").split("e")[0]
    digits = mantissa.replace(".", "").lstrip("0")
    if "." not in mantissa:  # trailing zeros of an integer are not significant: 12,700 has 3 digits
        digits = digits.rstrip("0")
    return max(len(digits), 1)


def render(number: float, like: str) -> str:
    """``number`` written like ``like``: same significant digits, thousands commas if it has them."""
    digits = significant(like)
    if number == 0 or not math.isfinite(number):
        return str(number)
    exponent = math.floor(math.log10(abs(number)))
    decimals = digits - 1 - exponent  # negative: round to tens, hundreds, ...
    rounded = round(number, decimals)
    if rounded and math.floor(math.log10(abs(rounded))) > exponent:  # 0.0000988 -> 0.0001, not 0.00010
        decimals -= 1
    shown = max(decimals, 0)
    return f"{rounded:,.{shown}f}" if "," in like else f"{rounded:.{shown}f}"


def check(text: str, data: RunData) -> list[str]:
    """The mismatches, one line each (empty when every quoted number matches the run)."""
    problems = []
    for match in QUOTED.finditer(text):
        written, source = match[1], match[2]
        try:
            expected = render(value(data, source), written)
        except KeyError as error:
            problems.append(f"{source}: not in the run ({error})")
            continue
        if expected != written:
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"line {line}: {written} quoted, the run has {expected} ({source})")
    return problems


def rewrite(text: str, data: RunData) -> str:
    """``text`` with every quoted number replaced by the run's value (unknown sources are left alone)."""

    def replace(match: re.Match[str]) -> str:
        try:
            return f"{render(value(data, match[2]), match[1])}<!--q {match[2]}-->"
        except KeyError:
            return match[0]

    return QUOTED.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    """Check (exit status 1 on a mismatch) or ``--write`` the quoted numbers."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--logdir", default="runs/vit_digits", help="logs of examples/train_vit_digits.py")
    parser.add_argument(
        "--doc", type=Path, default=DOC, help="the Markdown file (default docs/dashboards.md)"
    )
    parser.add_argument("--write", action="store_true", help="rewrite the numbers from the run")
    args = parser.parse_args(argv)
    data, text = read_run(args.logdir), args.doc.read_text()
    if args.write:
        args.doc.write_text(rewrite(text, data))
    problems = check(args.doc.read_text(), data)
    count = len(QUOTED.findall(text))
    for problem in problems:
        print(problem)
    print(f"{args.doc.name}: {count} quoted numbers, {len(problems)} do not match {data.source}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
