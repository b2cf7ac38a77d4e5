"""Tasks 5 to 7 in Markdown: one product in gradients, peak memory, the callback's training overhead."""

from __future__ import annotations

from ..callback import CallbackResult
from ..hvp import OURS_HVP, PYHESSIAN_HVP, HvpResult
from ..memory import MemoryResult
from .markdown import Target, table


def render_hvp(result: HvpResult) -> tuple[list[str], list[Target]]:
    """The section of task 5 and its target: one product of ours ≤ 2.5 gradients."""
    g = result.gradient
    rows = [["gradient (the unit)", f"{g * 1e3:.2f}", "1.00"]]
    rows += [
        [name, f"{result.median(name) * 1e3:.2f}", f"{result.median(name) / g:.2f}"] for name in result.times
    ]
    agreement = [
        [k, f"{e:.1e}", result.worst[k][1], f"{result.worst[k][0]:.1e}"] for k, e in result.errors.items()
    ]
    lines = [
        f"### Task 5 — one Hessian-vector product / one gradient: {result.description}",
        "",
        f"Median of {result.rounds} interleaved rounds.",
        "",
        *table(["operation", "ms", "/ gradient"], rows),
        "",
        "Agreement of one product (float32 tools) with the float64 product, relative error of the whole "
        "vector and of the worst parameter tensor:",
        "",
        *table(["tool", "rel. error", "worst tensor", "its rel. error"], agreement),
    ]
    ratio, pyh_ratio = result.median(OURS_HVP) / g, result.median(PYHESSIAN_HVP) / g
    target = (
        f"task 5 ({result.spec_name}): one HVP ≤ 2.5 gradients",
        ratio <= 2.5,
        f"ours {ratio:.2f} gradients (PyHessian's product on its retained graph: {pyh_ratio:.2f})",
    )
    return lines, [target]


def render_memory(result: MemoryResult) -> list[str]:
    """The section of task 6 (no target): each measurement's peak, also in units of one training step."""
    base = result.row("train step (AdamW)").peak_delta_mb
    rows = [
        [r.measurement, f"{r.peak_delta_mb:.1f}", f"{r.peak_delta_mb / base:.2f}", f"{r.slack_mb:.1f}"]
        for r in result.rows
    ]
    return [
        f"### Task 6 — peak memory ({result.spec_name} model, one fresh process per row)",
        "",
        "Peak resident set size during the measurement minus the resident size just before it (after "
        "imports, model, batch and a warm-up running the same code on a one-sequence batch); `slack`: how "
        "far the recorded peak already exceeded the starting size (0: the peak was reset). Whole-process RSS "
        "includes the allocator's caching: read differences of a few MB as noise.",
        "",
        *table(["measurement", "peak Δ MB", "/ train step", "slack MB"], rows),
    ]


def render_callback(result: CallbackResult | None) -> tuple[list[str], list[Target]]:
    """The section of task 7 and its target: the overhead ≤ 5% of the training time."""
    if result is None:
        return [
            "### Task 7 — callback overhead",
            "",
            "Skipped: `lightning_hessian.HessianMonitor` does not exist yet.",
        ], []
    steps, plain, passes = result.steps, result.plain, result.passes
    defaults = ", ".join(f"{k}={v}" for k, v in result.defaults.items())
    extra = result.monitored - plain
    per_pass = extra / max(passes, 1)
    in_analyze = result.pass_seconds / max(passes, 1)
    overhead = extra / plain
    step_ms = plain / steps * 1e3
    target = (
        "task 7: callback overhead ≤ 5% of the training time with a pass every 100 steps (reference model)",
        overhead <= 0.05,
        f"{overhead * 100:.0f}%: {passes} pass(es) in {steps} steps, {per_pass:.2f} s per pass = "
        f"{per_pass / (plain / steps):.0f} training steps ({step_ms:.1f} ms each) at the "
        f"defaults ({defaults})",
    )
    lines = [
        "### Task 7 — overhead of `HessianMonitor(every_n_steps=100)` at its defaults (reference model)",
        "",
        *table(
            ["run", "seconds"],
            [
                [f"{steps} training steps (AdamW), no callback", f"{plain:.2f}"],
                [
                    f"the same with HessianMonitor(every_n_steps=100): {passes} passes",
                    f"{result.monitored:.2f}",
                ],
            ],
        ),
        "",
        f"Overhead {overhead * 100:.0f}% of the training time: {per_pass:.2f} s per pass (the "
        f"callback's own timer: {in_analyze:.2f} s in its curvature pass), i.e. "
        f"{per_pass / (plain / steps):.0f} training steps per pass, against the 100 steps between passes. At "
        f"its defaults ({defaults}) a pass measures every block and the whole model, the preconditioned "
        "sharpness, and draws the TensorBoard views.",
    ]
    if result.profile is not None:
        p = result.profile
        lines += [
            "",
            f"Profile of a pass's analysis: every block and the whole model {p.all_blocks_seconds:.2f} s, "
            f"{p.all_blocks_products} products; the whole model alone {p.whole_seconds:.2f} s, "
            f"{p.whole_products} products. The blocks' products are pruned backward passes, but early "
            "layers' blocks still traverse the later layers, so all blocks together cost several "
            "whole-model passes (DESIGN.md engine notes).",
        ]
    return lines, [target]
