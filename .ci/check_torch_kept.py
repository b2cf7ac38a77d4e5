"""CI: no extra of ours may replace the user's torch (issue #14, item 6).

Creates a fresh virtual environment, installs ``torch==2.13.0`` (as the README tells a user), then asks pip
what installing the project's dependencies, and those of each extra, would install, with
``pip install --dry-run --report`` (nothing is installed; the requirement lists are read from
``pyproject.toml``, so the project itself is not built). Fails, naming the culprits, if any would install or
change torch, torchvision, torchaudio, triton or an NVIDIA / CUDA wheel. ``python3 .ci/check_torch_kept.py``
(needs Python >= 3.11 and the package index); ``--python PATH`` uses an existing fresh environment that holds
only torch (``.ci/run`` passes its own, right after installing torch, to save a second torch install).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import venv
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"
FORBIDDEN = ("torch", "torchvision", "torchaudio", "triton")


def forbidden(name: str) -> bool:
    """Whether installing ``name`` replaces or extends the user's torch build."""
    name = name.lower().replace("_", "-")
    return name in FORBIDDEN or name.startswith(("nvidia-", "cuda-"))


def dry_run(python: str, name: str, requirements: list[str], folder: Path) -> tuple[list[str], str]:
    """What ``pip install requirements`` would install of the torch family, and a line for the log."""
    start, report = time.perf_counter(), folder / f"{name}.json"
    pip = [python, "-m", "pip", "--disable-pip-version-check", "install", "--quiet", "--dry-run"]
    subprocess.run([*pip, "--report", str(report), *requirements], check=True)
    installs = [i["metadata"] for i in json.loads(report.read_text())["install"]]
    bad = [f"{m['name']}=={m['version']}" for m in installs if forbidden(m["name"])]
    seconds = time.perf_counter() - start
    return bad, f"[{name}] {len(installs)} to install, torch family: {bad or 'none'} ({seconds:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    """Check the base dependencies and every extra; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--python", help="interpreter of a fresh environment with only torch installed")
    args = parser.parse_args(argv)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = project["dependencies"]
    groups = {"base": base, **{k: [*base, *v] for k, v in project["optional-dependencies"].items()}}
    with tempfile.TemporaryDirectory() as tmp:
        python = args.python
        if python is None:
            venv.create(Path(tmp) / "venv", with_pip=True)
            python = str(Path(tmp) / "venv" / "bin" / "python")
            subprocess.run([python, "-m", "pip", "install", "--quiet", TORCH], check=True)
        # One resolution of everything together is the fast path; only when it fails is each group
        # resolved on its own, to name the extra at fault.
        everything = sorted({r for reqs in groups.values() for r in reqs})
        combined, line = dry_run(python, "all extras", everything, Path(tmp))
        print(line)
        failures = []
        for name, reqs in groups.items() if combined else ():
            bad, line = dry_run(python, name, reqs, Path(tmp))
            print(line)
            if bad:
                failures.append(f".[{name}] would install {', '.join(bad)} over {TORCH}")
    if combined and not failures:
        failures.append(f"the extras together would install {', '.join(combined)} over {TORCH}")
    for failure in failures:
        print(f"FAIL: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
