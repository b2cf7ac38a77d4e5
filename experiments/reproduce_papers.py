"""Reproduce the papers' claims with one command: figures and a "paper claims vs ours" report.

    python experiments/reproduce_papers.py            # full run, about 10 minutes of CPU time on 1 thread
    python experiments/reproduce_papers.py --quick    # smaller grids and models, ~1 minute, into a temp dir
    python experiments/reproduce_papers.py --out DIR  # write DIR/reproduction.md and DIR/images/repro_*.png

The full run rewrites the committed ``docs/reproduction.md`` and ``docs/images/repro_*.png``; ``--quick``
writes into a new temporary folder (printed at the end) unless ``--out`` is given, so that a smoke run
never replaces the committed report with a smaller, noisier one.

Eight experiments, each in its own module next to this file:

1. ``repro_attention``: [O] Hessian-block norms of one self-attention layer against the input scale: log-log
   slopes, the value/query ratio at small scale, the scale where the query block overtakes the value block.
2. ``repro_vit``: which blocks dominate the Hessian of a small ViT on scikit-learn's digits, at
   initialisation and after training, with the Gauss-Newton / functional split.
3. ``repro_theorem7``: [P] Thm 7, ``|L_{k+1}(w) - L_k(w)|`` against the data set size ``k``, evaluated away
   from ``w*``, with both terms of the bound.
4. ``repro_live_bounds``: [P] Thm 1 during training, in the papers' exact setting: the measured Hessian
   blocks of one attention layer against the corrected and the printed bounds, pass by pass, with the
   library's own ``analyze`` and ``compare_attention``.
5. ``repro_layernorm``: [O] LayerNorm placement (none / pre-LN / post-LN) and the softmax temperature: how
   they change the growth of the query and value blocks with the input scale.
6. ``repro_stabilization``: [KG] curvature-aligned stabilisation on a small Transformer: the closed form
   against direct Monte Carlo, the ``k^-2`` slope, small-``D`` against full-space probes, and the library's
   live criterion against samples seen (also runnable alone: it then rewrites only its own section).
7. ``repro_block_bound``: [P] Thm 5-6 during training: one post-norm layer at ``L = 128, d = 64``, the
   full-block bound evaluated matrix-free next to the measured Hessian of the layer.
8. ``repro_scaling``: per-block λ_max and trace against width, depth and data-set size on the digits ViT
   and the character GPT, at initialisation and trained, with log-log slopes and intervals over seeds
   (``scaling_figures`` and ``scaling_report`` write its figures and section; also runnable alone: it then
   rewrites only its own section).

Every number of ours in the report is measured in the run that writes it (the papers' numbers are quoted and
marked), and the commentary is generated from those numbers (its verdicts change if the numbers do). No
downloads: the digits ship with scikit-learn.

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, "What Does It Mean to Be a Transformer? Insights from a
        Theoretical Hessian Analysis", ICLR 2025, arXiv:2410.10986.
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians
        and Their Implications for Scaling Laws", arXiv:2510.16927.
    [KG] N. Kiselev, A. Grabovoy, "Curvature-Aligned Probing for Local Loss-Landscape Stabilization",
        arXiv:2604.14870.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling experiment modules

import repro_attention
import repro_block_bound
import repro_layernorm
import repro_live_bounds
import repro_scaling
import repro_stabilization
import repro_theorem7
import repro_vit
import scaling_figures
import scaling_report

DOCS = Path(__file__).resolve().parents[1] / "docs"  # where the full run's committed report lives
FIGURES = {
    "attention": "repro_attention_scaling.png",
    "vit": "repro_vit_blocks.png",
    "theorem7": "repro_theorem7.png",
    "live_bounds": "repro_live_bounds.png",
    "layernorm": "repro_layernorm.png",
    "stabilization": repro_stabilization.FIGURE,
    "block_bound": "repro_block_bound.png",
    "scaling_vit": scaling_figures.figure_name("vit"),
    "scaling_gpt": scaling_figures.figure_name("gpt"),
}


def fmt(value: float | None, digits: int = 3) -> str:
    """Compact number for tables: ``1.23e-05``, ``0.0123``, ``12.3``."""
    if value is None or not np.isfinite(value):
        return "n/a"
    return f"{value:.{digits}g}"


def paragraph(*parts: str) -> str:
    """One Markdown paragraph from source-wrapped pieces, re-wrapped at 100 columns."""
    text = " ".join(part for part in parts if part)
    return textwrap.fill(text, width=100, break_long_words=False, break_on_hyphens=False)


# ------------------------------------------------------------------------------------------------------------
# 1. [O] self-attention Hessian blocks against the input scale
# ------------------------------------------------------------------------------------------------------------


def attention_section(res: repro_attention.AttentionScaling, summ: dict, seconds: float) -> str:
    sizes = res.sizes
    slopes = summ["slopes"]
    worst_small = max(
        abs(row[norm]["small_mean"] - row["expected"]) for row in slopes.values() for norm in ("fro", "spec")
    )
    ratio = summ["ratio_at_0.01"]
    cross = summ["crossover"]
    finite = cross[np.isfinite(cross)]
    q1, med, q3 = np.percentile(finite, [25, 50, 75])
    share_08 = float(np.mean((finite >= 0.6) & (finite <= 1.0)))
    q_total = slopes[("Q", "Q", "total")]["fro"]
    v_total = slopes[("V", "V", "total")]["fro"]
    qq_lo, qq_med, qq_hi = q_total["large_quartiles"]
    v_large = v_total["large_quartiles"][1]
    lines = [
        "## 1. [O] Self-attention Hessian blocks against the input scale",
        "",
        paragraph(
            "Single head, no output projection, no biases, MSE loss",
            "l = ‖softmax(X W_Q W_Kᵀ Xᵀ/√d_K) X W_V − Target‖²_F / (L d_V);",
            f"L = {sizes['L']} tokens, d_V = {sizes['d_V']}, d_K = {sizes['d_K']}.",
            f"Each of {res.draws} random draws has X and Target standard normal and weights N(0, 1/d_V),",
            "so the attention logits are O(1) at s = 1; the input is scaled X → s X on",
            f"{len(res.scales)} log-spaced scales from 0.01 to 10. Each block is materialised from the",
            "library's matrix-free products (`lightning_hessian.formulas.attention.hessian_matvec` on the",
            "basis vectors), and both its Frobenius and its spectral norm (largest singular value) are",
            "taken. Slopes are",
            "least-squares fits of log-norm against log s on",
            f"s ∈ [{res.small_window[0]:g}, {res.small_window[1]:g}] (small scale) and",
            f"[{res.large_window[0]:g}, {res.large_window[1]:g}] (large scale), one fit per draw.",
            "Theory column: the leading powers of s in [O] Thm 3.1-3.2 (H_o = outer-product or",
            f"Gauss-Newton part, H_f = functional part, H = total). ({seconds:.1f} s)",
        ),
        "",
        "| block | slope, theory | slope, [O] measured | ours, Frobenius (mean ± sd) "
        "| ours, spectral (mean ± sd) | ours at large s, Frobenius (median [quartiles]) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, row in slopes.items():
        f, s = row["fro"], row["spec"]
        paper = fmt(row["paper"]) if row["paper"] is not None else "—"
        lq, lm, lh = f["large_quartiles"]
        lines.append(
            f"| {repro_attention.label(key)} | {row['expected']:g} | {paper} "
            f"| {f['small_mean']:.3f} ± {f['small_std']:.3f} | {s['small_mean']:.3f} ± {s['small_std']:.3f} "
            f"| {lm:.2f} [{lq:.2f}, {lh:.2f}] |"
        )
    lines += [
        "",
        "| quantity | [O] | ours |",
        "|---|---:|---:|",
        f"| ‖H(V,V)‖_F / ‖H(Q,Q)‖_F at s = 0.01 | ~5e5 | median {fmt(float(np.median(ratio)), 2)} "
        f"(range {fmt(float(ratio.min()), 2)} – {fmt(float(ratio.max()), 2)}) |",
        "| scale s where ‖H(Q,Q)‖_F overtakes ‖H(V,V)‖_F | ~0.8 (released data, 20 repeats: median 0.83, "
        f"range 0.72 – 1.03†) | median {med:.2f}, quartiles {q1:.2f} – "
        f"{q3:.2f}, range {finite.min():.2f} – {finite.max():.2f} ({len(finite)}/{len(cross)} draws cross) |",
        "",
        "† from the audit of [O]'s released data in issue 15, not regenerated by this script.",
        "",
        paragraph(
            f"Cross-check at s = {res.check['scale']:g} (first draw, float64, all nine blocks; largest",
            "entrywise difference relative to the largest entry): matrix-free products against",
            f"`torch.func.hessian` {res.check['matvec_vs_autograd']:.1e}; the dense Kronecker formulas",
            f"(`formulas.attention.hessian_blocks`) against autograd {res.check['dense_vs_autograd']:.1e};",
            "the outer part against c JᵀJ from `torch.func.jacrev`",
            f"{res.check['outer_vs_gauss_newton']:.1e}.",
        ),
        "",
        f"![Hessian-block norms against the input scale](images/{FIGURES['attention']})",
        "",
        paragraph(
            "**Where we agree.** Every small-scale slope matches the exponent the formulas predict, in",
            "both norms (largest deviation of a mean slope from its exponent:",
            f"{worst_small:.3f}). [O]'s measured 4.98 (query total) and 1.98 (value) compare with our",
            f"{q_total['small_mean']:.3f} ± {q_total['small_std']:.3f} and",
            f"{v_total['small_mean']:.3f} ± {v_total['small_std']:.3f}; the two norms give the same",
            "slopes, so which norm [O] used does not matter for this claim. The value block dominates the",
            f"query block at s = 0.01 by a median factor of {fmt(float(np.median(ratio)), 2)}, the order",
            f"[O] quote, and the query block overtakes it near s ~ {med:.1f}.",
        ),
        "",
        paragraph(
            "**Where we differ, and why.** (i) The crossover scale depends on the draw: the ratio of the",
            "two blocks grows like s³ times a constant that depends on the weights, the token geometry",
            f"and the target (here median {med:.2f}, {share_08:.0%} of the draws between 0.6 and 1.0,",
            f"range {finite.min():.2f} – {finite.max():.2f}). That does not make [O]'s ~0.8 a lucky",
            "draw: by the audit in",
            "issue 15 (not regenerated here: [O]'s released data is not in this repository) their own",
            "20 repeats give a median of 0.83, range 0.72 – 1.03."
            + (" Our wider spread" if finite.min() < 0.72 or finite.max() > 1.03 else " Our spread")
            + " is a property of our setup, which we have not taken apart further: every draw has its",
            "own random standard-normal target, independent of X, and our dimensions and initialisation",
            "are ours. (ii) The ratio at s = 0.01",
            f"varies by a factor {ratio.max() / ratio.min():.0f} between draws. (iii) At large scale the",
            "softmax saturates, at a scale that depends on the draw: the growth of the query block",
            f"slows from slope 5 to a median of {qq_med:.2f} on [3, 10],",
            f"with quartiles {qq_lo:.2f} to {qq_hi:.2f}"
            + (" (negative: the block already shrinks in those draws);" if qq_lo < 0 else ";"),
            f"the mean curve in the figure peaks at s ~ {summ['qq_peak_scale']:.1f}, while the value",
            f"block keeps its slope (median {v_large:.2f}). This matches [O]'s statement that the growth",
            "is lower at large scale; the exponents describe small scales only.",
        ),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# 2. ViT on digits: which blocks dominate
# ------------------------------------------------------------------------------------------------------------


def _ratio_text(ratios: dict[int, tuple[float, float]], which: int) -> str:
    return ", ".join(f"L{layer} {fmt(r[which], 2)}" for layer, r in ratios.items())


def _func_over_gn(report, kinds: tuple[str, ...]) -> float:
    """Median over the blocks of the given kinds of max|λ(functional)| / λ_max(Gauss-Newton)."""
    vals = [
        repro_vit.functional_magnitude(b) / b.gauss_newton_top
        for b in report
        if b.kind in kinds and b.gauss_newton_top
    ]
    return float(np.median(vals))


def vit_section(res: repro_vit.VitResult, seconds: float) -> str:
    st = res.settings
    arch = st["arch"]
    init_table, trained_table = repro_vit.kind_table(res.init), repro_vit.kind_table(res.trained)
    init_rank, trained_rank = repro_vit.ranking(res.init), repro_vit.ranking(res.trained)
    ratios_init = repro_vit.value_query_ratios(res.init)
    ratios_trained = repro_vit.value_query_ratios(res.trained)
    layers = list(ratios_init)
    v_over_qk_init = all(ratios_init[i][0] > 1 and ratios_init[i][1] > 1 for i in layers)
    v_over_q_trained = all(ratios_trained[i][0] > 1 for i in layers)
    exceptions = [f"L{i}" for i in layers if ratios_trained[i][1] <= 1]
    q_catches_up = all(ratios_trained[i][0] < ratios_init[i][0] for i in layers)
    k_catches_up = all(ratios_trained[i][1] < ratios_init[i][1] for i in layers)
    qk_init = _func_over_gn(res.init, ("query", "key"))
    qk_trained = _func_over_gn(res.trained, ("query", "key"))
    v_init, v_trained = _func_over_gn(res.init, ("value",)), _func_over_gn(res.trained, ("value",))
    neg_init = sum(1 for b in res.init if (b.min_eigenvalue or 0) < 0)
    neg_trained = sum(1 for b in res.trained if (b.min_eigenvalue or 0) < 0)
    # PSD of the Gauss-Newton part: its smallest eigenvalue relative to its largest, over every block.
    gn_rel = {
        (tag, name): low / res_top[name]
        for tag, lows, res_top in (
            ("init", res.gn_min_init, res.gn_top_init),
            ("trained", res.gn_min_trained, res.gn_top_trained),
        )
        for name, low in lows.items()
        if res_top.get(name, 0) > 0
    }
    (gn_worst_tag, gn_worst_block), gn_worst = min(gn_rel.items(), key=lambda kv: kv[1])
    gn_psd = gn_worst >= -10 * st["tol"]
    # [P]'s value/key dominance: the rank of the value and key kinds among all kinds.
    vk_rank = {
        tag: (rank.index("value") + 1, rank.index("key") + 1)
        for tag, rank in (("init", init_rank), ("trained", trained_rank))
    }
    n_kinds = len(init_rank)

    def dominate(tag: str) -> bool:
        return max(vk_rank[tag]) <= 3

    if dominate("init") and dominate("trained"):
        verdict_p = "agree, at initialisation and after training"
    elif dominate("trained"):
        verdict_p = (
            f"agree after training (value {vk_rank['trained'][0]}, key {vk_rank['trained'][1]} "
            f"of {n_kinds}); "
            f"not at initialisation, where key ranks {vk_rank['init'][1]} of {n_kinds}"
        )
    elif dominate("init"):
        verdict_p = "agree at initialisation only"
    else:
        verdict_p = "disagree: value and key are not both among the top three kinds"
    n_blocks = len(res.init.blocks)
    att_i, att_t = res.attention_init, res.attention_trained
    sharper = all(t["logit_std"] > i["logit_std"] for i, t in zip(att_i, att_t))
    std_i = ", ".join(f"{a['logit_std']:.2f}" for a in att_i)
    std_t = ", ".join(f"{a['logit_std']:.2f}" for a in att_t)
    max_i = ", ".join(f"{a['max_weight']:.2f}" for a in att_i)
    max_t = ", ".join(f"{a['max_weight']:.2f}" for a in att_t)
    tokens = round(1 / att_i[0]["uniform"])
    not_converged = [
        f"{tag} `{b.name}`"
        for tag, rep in (("init", res.init), ("trained", res.trained))
        for b in rep
        if b.converged is False
    ]
    lines = [
        "## 2. Which blocks dominate the Hessian of a small ViT (digits)",
        "",
        paragraph(
            f"The ViT class of `examples/train_vit_digits.py` with {arch['depth']} layers (width",
            f"{arch['dim']}, {arch['heads']} heads, {arch['patch']}x{arch['patch']} patches, so a class",
            f"token and {tokens - 1} patch tokens; pre-norm blocks, a fused `qkv` projection that",
            "`find_blocks` slices into query, key and value blocks), measured with",
            f"`analyze(model, loss_fn, batch, split=True, tol={st['tol']:g})` on {st['batch']} fixed",
            "training images (cross-entropy), at initialisation (test accuracy",
            f"{res.init_accuracy:.1%}) and after {st['steps']} AdamW steps (lr 3e-3, weight decay",
            f"0.05, batch 64, warmup and cosine decay; {res.train_seconds:.1f} s, final training loss",
            f"{res.final_train_loss:.3f}, test accuracy {res.test_accuracy:.1%} on 297 held-out",
            "digits). A per-block Frobenius norm (trace of H²) is not available from `analyze`; we use",
            f"the top eigenvalue λ_max (Lanczos) and the trace (Hutch++). ({seconds:.1f} s)",
        ),
        "",
        paragraph(
            "Per block kind: the largest λ_max over the blocks of that kind (and which block), its rank",
            "among the kinds, and the trace summed over the kind's blocks.",
        ),
        "",
        "| kind | λ_max, init | block | rank | λ_max, trained | block | rank | Σ trace, init "
        "| Σ trace, trained |",
        "|---|---:|---|---:|---:|---|---:|---:|---:|",
    ]
    for kind in repro_vit.KINDS:
        if kind not in init_table:
            continue
        a, b = init_table[kind], trained_table[kind]
        lines.append(
            f"| {kind} | {fmt(a['top'])} | `{a['block']}` | {init_rank.index(kind) + 1} | {fmt(b['top'])} "
            f"| `{b['block']}` | {trained_rank.index(kind) + 1} | {fmt(a['trace'])} | {fmt(b['trace'])} |"
        )
    if not v_over_qk_init:
        verdict_vq = "partly (see the ratios)"
    elif v_over_q_trained and not exceptions:
        verdict_vq = "agree, in every layer, at initialisation and after training"
    else:
        verdict_vq = "agree at initialisation (every layer); after training value > query in " + (
            "every layer" if v_over_q_trained else "some layers"
        )
        if exceptions:
            verdict_vq += f", but the key block overtakes the value block in {', '.join(exceptions)}"
    verdict_func = "agree at initialisation" if qk_init > 1 else "disagree at initialisation"
    verdict_func += "; after training the Gauss-Newton part is larger" if qk_trained < 1 else "; and trained"
    lines += [
        "",
        "| claim | source | ours (this run) | verdict |",
        "|---|---|---|---|",
        "| The value block's Hessian is much larger than the query block's (shown for a one-block GPT-2 "
        "at initialisation); the query and key blocks carry higher powers of the input "
        "| [O] Fig. 1, Thm 3.1-3.2 "
        f"| λ_max(value) / λ_max(query): init {_ratio_text(ratios_init, 0)}; trained "
        f"{_ratio_text(ratios_trained, 0)}. λ_max(value) / λ_max(key): init {_ratio_text(ratios_init, 1)}; "
        f"trained {_ratio_text(ratios_trained, 1)} | {verdict_vq} |",
        "| At small input scale the functional part dominates the query/key blocks (H_f ~ s⁵ against "
        "H_o ~ s⁶); a single layer's (V,V) block has no functional part | [O] Thm 3.1-3.2 "
        "| median over blocks of max\\|λ(functional)\\| / λ_max(Gauss-Newton): query/key "
        f"{fmt(qk_init, 2)} at init, {fmt(qk_trained, 2)} trained; value {fmt(v_init, 2)} at init, "
        f"{fmt(v_trained, 2)} trained. Attention logit std per layer: init {std_i}; trained {std_t} "
        f"| {verdict_func} (see the commentary) |",
        "| The Gauss-Newton part is positive semi-definite; negative curvature comes from the functional "
        "part | [O] (outer-product / functional decomposition) "
        f"| blocks with Hessian λ_min < 0: {neg_init}/{n_blocks} at init, {neg_trained}/{n_blocks} trained. "
        'Gauss-Newton part alone (`analyze(..., curvature="gauss_newton")`): smallest λ_min / λ_max over '
        f"all blocks and both checkpoints {gn_worst:.1e} (`{gn_worst_block}`, {gn_worst_tag}) "
        f"| {'consistent' if gn_psd else 'inconsistent'} with PSD (Lanczos tolerance {st['tol']:g}; Ritz "
        "values lie inside the spectrum, so a negative λ_min would refute PSD and a non-negative one does "
        "not prove it; structural for cross-entropy, whose Hessian in the logits diag(p) − ppᵀ is PSD) |",
        "| Value and key blocks dominate the curvature of a ViT | [P] summary (as read in the audit of "
        "issue 15; their figure is not reproduced here) "
        f"| rank of value / key among {n_kinds} kinds by λ_max: init {vk_rank['init'][0]} / "
        f"{vk_rank['init'][1]}, trained {vk_rank['trained'][0]} / {vk_rank['trained'][1]}. Ranking, init: "
        f"{' > '.join(init_rank)}; trained: {' > '.join(trained_rank)} | {verdict_p} |",
        "",
        f"![per-block curvature of the ViT at initialisation and after training](images/{FIGURES['vit']})",
        "",
    ]
    ratio_lo = min(r[0] for r in ratios_init.values())
    ratio_hi = max(r[0] for r in ratios_init.values())
    comment = [
        "**Commentary.** At initialisation the value block's top eigenvalue exceeds the query block's",
        f"by a factor {fmt(ratio_lo, 2)} to {fmt(ratio_hi, 2)} across the {len(layers)} layers, as [O]",
        "show for GPT-2. The mechanism is the one of experiment 1: at initialisation the attention",
        f"logits are small (standard deviation {std_i} per layer; mean largest attention weight",
        f"{max_i}, against 1/{tokens} = {1 / tokens:.2f} for uniform attention), the small-s regime",
        "in which the query/key blocks are suppressed by high powers of the scale and their functional",
        f"part is the larger part (median ratio {fmt(qk_init, 2)}).",
    ]
    if sharper:
        comment += [
            f"Training sharpens the attention (logit standard deviation {std_t}; largest weight",
            f"{max_t}), moving the layers towards s ~ 1 and beyond.",
        ]
        if q_catches_up and k_catches_up:
            overtakes = f" (in {', '.join(exceptions)} the key block overtakes it)" if exceptions else ""
            comment.append(f"The query and key blocks gain on the value block in every layer{overtakes}.")
        else:
            comment.append("The query and key blocks catch up in some layers only (see the ratios).")
        if qk_trained < 1:
            comment.append(f"Their Gauss-Newton part becomes the larger part (ratio {fmt(qk_trained, 2)}).")
        else:
            comment.append(f"Their functional part stays the larger part (ratio {fmt(qk_trained, 2)}).")
        comment += [
            "So value-over-query dominance describes the attention's logit scale rather than a fixed",
            "property of the architecture.",
        ]
    else:
        comment.append(f"Training did not sharpen the attention in every layer here (logit std {std_t}).")
    norm_ranks = (init_rank.index("norm") + 1, trained_rank.index("norm") + 1)
    key_climb = (
        "; the key block's climb is the logit-scale effect above (small logits suppress the query/key "
        "blocks), so whether a ViT's key block dominates depends on when it is measured."
        if vk_rank["trained"][1] < vk_rank["init"][1]
        else "."
    )
    comment += [
        f"Across kinds, the three largest at initialisation are {', '.join(init_rank[:3])}; after",
        f"training {', '.join(trained_rank[:3])}. LayerNorm gains and biases rank {norm_ranks[0]} and",
        f"{norm_ranks[1]} of {len(init_rank)}. Against [P]'s value/key dominance: value ranks",
        f"{vk_rank['init'][0]} at initialisation and {vk_rank['trained'][0]} after training, key",
        f"{vk_rank['init'][1]} and {vk_rank['trained'][1]}{key_climb}",
    ]
    cls, pos = res.init.blocks.get("cls_token"), res.init.blocks.get("pos_embed")
    if cls and pos and abs(cls.top_eigenvalue / pos.top_eigenvalue - 1) < 0.01:
        comment += [
            "The class token and the positional embedding share their top eigenvalue at initialisation:",
            "the class token is added to the first row of the positional embedding, so both blocks",
            "contain the same directions.",
        ]
    comment += [
        "Absolute values move a lot with training; compare rankings and ratios, not values.",
        f"Lanczos stopped at a relative Ritz residual of {st['tol']:g};",
        "every block converged."
        if not not_converged
        else f"not converged (marked `*` below): {', '.join(not_converged)}.",
    ]
    lines += [
        paragraph(*comment),
        "",
        "<details><summary>Per-block tables from <code>report.table()</code> (init, then trained)</summary>",
        "",
        "```",
        res.init.table(),
        "",
        res.trained.table(),
        "```",
        "",
        "</details>",
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# 3. [P] Theorem 7
# ------------------------------------------------------------------------------------------------------------


def theorem7_section(res: repro_theorem7.Theorem7, seconds: float) -> str:
    ks = [10, 100, 1000]
    r_max = res.radii[-1]
    holds = all(v <= 1 for v in res.worst_ratio.values())
    worst = ", ".join(f"r = {r:g}: {res.worst_ratio[r]:.2g}" for r in res.radii)
    slopes = {r: repro_theorem7.loglog_slope(res.k, res.observed[r]) for r in res.radii}
    slope_text = ", ".join(f"r = {r:g}: {s:.3f}" for r, s in slopes.items())
    loose = min(1 / v for v in res.worst_ratio.values())
    i100 = 99  # k = 100
    grad_vs_curv = res.terms[1.0]["gradient"][i100] / res.terms[1.0]["curvature"][i100]
    rem_vs_curv = res.terms[r_max]["remainder"][i100] / res.terms[r_max]["curvature"][i100]
    lines = [
        "## 3. [P] Theorem 7: the loss change from one more sample, away from w*",
        "",
        paragraph(
            "[P] Thm 7: if w* is a stationary point of both L_k and L_(k+1) (their Assumption 1), then",
            "\\|L_(k+1)(w) − L_k(w)\\| ≤ 2 l_max/(k+1) + M ‖w − w*‖²/(k+1), with l_max ≥ l_i(w*) and",
            "M ≥ ‖∇²l_i(w*)‖₂ for every sample. **Not [P]'s experiment**: [P] illustrate Thm 7 on a",
            "ViT (as read in the audit of issue 15); we test the statement, which holds for any model, on",
            "a model where w*, l_max and M are computable exactly. Model: multinomial logistic",
            "regression on the 1797",
            "digits (64 pixels / 16 and a bias feature, 10 classes), per-sample loss cross-entropy +",
            f"({repro_theorem7.RIDGE:g}/2)‖W‖² (the ridge keeps w* finite: the digits are linearly",
            "separable). w* minimises the full-data loss L_n (L-BFGS, float64,",
            f"‖∇L_n(w*)‖ = {res.grad_norm:.1e}, ‖w*‖_F = {res.weight_norm:.1f}); l_max = max_i l_i(w*) =",
            f"{res.loss_max:.3f}; M = max_i ‖∇²l_i(w*)‖₂ = {res.hessian_max:.3f} (closed form). We",
            "evaluate at w = w* + r D, D a random unit direction, average \\|L_(k+1)(w) − L_k(w)\\|",
            f"over {res.orders} random orders of the data, and split it with",
            "`lightning_hessian.formulas.convergence.loss_difference_terms` into the terms of the Taylor",
            "identity around w*: value (l_(k+1)(w*) − L_k(w*))/(k+1), gradient, curvature and the",
            f"O(r³) remainder. ({seconds:.1f} s)",
        ),
        "",
        "| r = ‖w − w*‖ | k | bound: 2 l_max/(k+1) | bound: M r²/(k+1) | observed (mean over orders) "
        "| \\|value\\| | \\|gradient\\| | \\|curvature\\| | \\|remainder\\| |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res.radii:
        for k in ks:
            i = k - 1
            t = res.terms[r]
            lines.append(
                f"| {r:g} | {k} | {fmt(2 * res.loss_max / (k + 1))} "
                f"| {fmt(res.hessian_max * r**2 / (k + 1))} | {fmt(res.observed[r][i])} "
                f"| {fmt(t['value'][i])} | {fmt(t['gradient'][i])} | {fmt(t['curvature'][i])} "
                f"| {fmt(t['remainder'][i])} |"
            )
    lines += [
        "",
        "| claim | source | ours | verdict |",
        "|---|---|---|---|",
        "| \\|L_(k+1)(w) − L_k(w)\\| ≤ 2 l_max/(k+1) + M ‖w − w*‖²/(k+1) | [P] Thm 7 "
        f"| largest observed / bound over k = 1..{res.n - 1} and all {res.orders} orders: {worst} "
        f"| {'holds at every k, order and radius' if holds else 'VIOLATED (see the ratios)'} |",
        "| the difference decays like 1/k | [P] Thm 7 "
        f"| log-log slope of the mean observed difference, k ≥ 10: {slope_text} "
        f"| {'agree, trivially' if all(abs(s + 1) < 0.1 for s in slopes.values()) else 'partly'}: the "
        "running-mean identity L_(k+1) − L_k = (l_(k+1) − L_k)/(k+1) gives 1/k for any bounded losses, "
        "so this says nothing about the Hessian; the live 1/k signal is now [KG]'s criterion (section 6), "
        "whose k^-2 carries the landscape's constant S_D |",
        "| w* is stationary for L_k and L_(k+1) | [P] Assumption 1 | false here for k < n (w* minimises "
        f"L_n only): at r = 1, k = 100 the gradient term is {grad_vs_curv:.2g}x the curvature term "
        "| assumption not met; the bound holds anyway (see below) |",
        "",
        f"![Theorem 7: loss differences against k](images/{FIGURES['theorem7']})",
        "",
        paragraph(
            f"**Commentary.** The bound {'holds' if holds else 'fails'}, and loosely: the observed",
            f"differences stay at least a factor {loose:.2g} below it. 2 l_max is the worst sample's loss",
            "while the observed difference is set by a typical one, and M r² uses the largest per-sample",
            "curvature over all samples and directions, while a random direction sees far less. The 1/k",
            "rate is the running-mean identity L_(k+1) − L_k = (l_(k+1) − L_k)/(k+1), true for any",
            "bounded losses whatever the model: at w = w* (black curve, value term only) the statement",
            "holds trivially and says nothing about curvature, which is why the experiment is run away",
            "from w*. There the difference grows with r through the gradient term (first order in r,",
            "non-zero because w* is stationary only for the full data set) and the curvature term",
            f"(second order). At r = {r_max:g}, comparable to ‖w*‖ = {res.weight_norm:.1f}, the O(r³)",
            f"remainder is {rem_vs_curv:.2g}x the curvature term at k = 100:",
            "the quadratic model is no longer accurate there."
            if rem_vs_curv > 0.3
            else "the quadratic model still describes the loss well there.",
        ),
        "",
        paragraph(
            "**Why the bound survives the failed Assumption 1.** For non-negative per-sample losses",
            "whose Hessians are bounded by M everywhere, ‖∇l_i(w*)‖² ≤ 2M l_i(w*), hence",
            "l_i(w) ≤ 2 l_i(w*) + M‖w − w*‖², and \\|l_(k+1)(w) − L_k(w)\\| ≤ max(l_(k+1)(w), L_k(w))",
            "≤ 2 l_max + M‖w − w*‖²: the bound needs no stationarity, only M taken over all w (here",
            f"max_i ‖x_i‖²/2 + λ = {res.hessian_global:.3f}) instead of at w* ({res.hessian_max:.3f},",
            "the value Thm 7 states and the one checked above).",
        ),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# 4. [P] Thm 1 during training, in the papers' setting
# ------------------------------------------------------------------------------------------------------------


def live_bounds_section(res: repro_live_bounds.LiveBounds, summ: dict, seconds: float) -> str:
    names = repro_live_bounds.NAMES
    holds = all(summ[n]["max_corrected_ratio"] <= 1 for n in names)
    paper_violated = {n: summ[n]["paper_violated_at"] for n in names if summ[n]["paper_violated_at"]}
    first, last = 0, len(res.steps) - 1

    def tightness(n: str, i: int) -> float:
        return res.measured[n][i] / res.corrected[n][i]

    looser = all(tightness(n, last) < tightness(n, first) for n in ("Q", "K"))
    lines = [
        "## 4. [P] Theorem 1 during training, in the papers' setting",
        "",
        paragraph(
            "The papers' layer exactly (one head, W_Q, W_K, W_V of shape 8 x 8, no biases, no output",
            "projection), trained with the mean-squared error by Adam (lr 1e-2, batches of 64) to turn each",
            "digit upside down: the tokens are its 8 pixel rows and row i must fetch row 7 − i, so attention",
            "sharpens as it learns. At every pass, on 64 fixed digits, `analyze` measures ‖H(a,a)‖₂ =",
            "max(\\|λ_max\\|, \\|λ_min\\|) of the three diagonal blocks and `compare_attention(...,",
            "target=)` evaluates the corrected [P] Thm 1 bound (the proven setting, checked numerically at",
            f"every pass: {'yes' if summ['proven_every_pass'] else 'NO'}); the bound as the paper's proof",
            'gives it (`variant="paper"`) is evaluated on the same digits. Both are means over the 64',
            f"sequences of the per-sequence bounds. ({seconds:.1f} s)",
        ),
        "",
        "| step | loss | max ‖dA/dT‖ (1/L = "
        f"{1 / res.seq_len:.3g}) | ‖H(Q,Q)‖ | corrected | paper | ‖H(K,K)‖ | corrected | paper "
        "| ‖H(V,V)‖ | corrected | paper |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for i in sorted({first, len(res.steps) // 4, len(res.steps) // 2, last}):
        row = [str(res.steps[i]), fmt(res.loss[i]), fmt(res.peak[i])]
        for n in names:
            row += [fmt(res.measured[n][i]), fmt(res.corrected[n][i]), fmt(res.paper[n][i])]
        lines.append("| " + " | ".join(row) + " |")
    ratios = "; ".join(
        f"{n}: {summ[n]['min_corrected_ratio']:.2g} to {summ[n]['max_corrected_ratio']:.2g}" for n in names
    )
    lines += [
        "",
        "| claim | source | ours | verdict |",
        "|---|---|---|---|",
        "| ‖H(a,a)‖₂ ≤ o_aa + f_aa (corrected per-block bound) | [P] Thm 1, corrected (docs/formulas.md §3) "
        f"| measured / bound over {len(res.steps)} passes: {ratios} "
        f"| {'holds at every pass' if holds else 'VIOLATED'} |",
        "| the printed bound (‖dA/dT‖ ≤ 1/L) | [P] Thm 1 as proved "
        f"| attention peakedness rose from {res.peak[first]:.3g} to {max(res.peak):.3g} (1/L = "
        f"{1 / res.seq_len:.3g}); measured / paper bound at most "
        f"{max(summ[n]['max_paper_ratio'] for n in names):.2g} "
        f"| {'violated at steps ' + str(paper_violated) if paper_violated else 'not violated here'} |",
        "",
        f"![Thm 1 during training](images/{FIGURES['live_bounds']})",
        "",
        paragraph(
            "**Commentary.** The corrected bound is a theorem and holds at every pass. How tight it is",
            "differs by block: for the value block it is within a factor",
            f"{1 / summ['V']['max_corrected_ratio']:.2g} (its outer part c‖AX‖² ⊗ I is exact for one",
            "sequence; the slack comes from averaging bounds over sequences and from the functional part),",
            "for the query and key blocks it is loose by a factor",
            f"{1 / summ['Q']['max_corrected_ratio']:.2g} to {1 / summ['Q']['min_corrected_ratio']:.2g} (Q)",
            f"and {1 / summ['K']['max_corrected_ratio']:.2g} to {1 / summ['K']['min_corrected_ratio']:.2g}",
            "(K) over the passes (from step",
            f"{res.steps[first]} to {res.steps[last]}: Q {tightness('Q', first):.2g} →",
            f"{tightness('Q', last):.2g}, K {tightness('K', first):.2g} → {tightness('K', last):.2g}"
            + (", looser as training proceeds):" if looser else "):"),
            "it multiplies spectral norms (‖W_K‖²‖W_V‖²‖X‖⁶ and the softmax-Jacobian norm), which bound",
            "the curvature over all directions at once, far above what the Hessian shows. The paper's",
            "printed bound assumes uniform attention (‖dA/dT‖ ≤ 1/L), which training breaks here;",
            f"it is violated at steps {paper_violated}."
            if paper_violated
            else "yet it is not violated: its other steps (‖A‖ ≤ L, ρ ≥ ‖F − T‖_F) are loose enough to "
            "absorb the error in this task.",
            "The violations it allows are constructed in tests/test_formulas_attention.py (peaked",
            "two-point attention).",
        ),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# 5. [O] LayerNorm placement and temperature
# ------------------------------------------------------------------------------------------------------------


def layernorm_section(res: repro_layernorm.LayerNormScaling, seconds: float) -> str:
    def stat(key: tuple[str, float], block: str) -> str:
        s = repro_layernorm.slopes(res, key, block)
        return f"{np.median(s):.2f} [{s.min():.2f}, {s.max():.2f}]"

    def ratio(key: tuple[str, float]) -> str:
        r = repro_layernorm.ratio_at_smallest(res, key)
        return f"{fmt(float(np.median(r)), 2)} [{fmt(float(r.min()), 2)}, {fmt(float(r.max()), 2)}]"

    base = repro_layernorm.ratio_at_smallest(res, ("none", 1.0))
    pre = repro_layernorm.ratio_at_smallest(res, ("pre", 1.0))
    pre_slopes = np.concatenate([repro_layernorm.slopes(res, ("pre", 1.0), b) for b in "QV"])
    pre_flat = bool(np.all(np.abs(pre_slopes) < 0.3))
    tau_gain = {
        t: float(np.median(repro_layernorm.ratio_at_smallest(res, ("none", t)) / base))
        for t in repro_layernorm.TEMPERATURES
        if t != 1.0
    }
    tau_ok = all(abs(g / t**2 - 1) < 0.05 for t, g in tau_gain.items())
    post = repro_layernorm.ratio_at_smallest(res, ("post", 1.0))
    post_q = float(np.median(repro_layernorm.slopes(res, ("post", 1.0), "Q")))
    post_v = float(np.median(repro_layernorm.slopes(res, ("post", 1.0), "V")))
    post_ok = abs(post_q - 4) < 0.5 and abs(post_v) < 0.5 and np.median(post) > np.median(base)
    paper = {("none", 1.0): ("5 / 2 (4.98 / 1.98)", "~5e5"), ("pre", 1.0): ("about 0†", "4.6†")}
    lines = [
        "## 5. [O] LayerNorm placement and temperature",
        "",
        paragraph(
            "The setting of experiment 1 (one head, L = 8, d_V = d_K = 8, MSE against a standard-normal",
            f"target, weights N(0, 1/d_V)), {res.norms[('none', 1.0)]['Q'].shape[0]} draws,",
            f"{len(res.scales)} log-spaced scales from 0.01 to 10, with a LayerNorm without affine",
            "parameters (eps 1e-5) placed nowhere, before the attention (pre-LN: the layer reads",
            "LN(s X)) or after it (post-LN: the loss reads LN(F)); and, without LayerNorm, the",
            "temperature τ at 1/4, 1 and 4 times √d_K. The (Q,Q) and (V,V) Hessian blocks are formed",
            "densely by `torch.func.hessian` (float64); slopes as in experiment 1 on [0.01, 0.1]",
            f"(median [range] over draws). ({seconds:.1f} s)",
        ),
        "",
        "| setting | slope of ‖H(Q,Q)‖_F | slope of ‖H(V,V)‖_F | [O], slopes Q / V "
        "| ‖H(V,V)‖ / ‖H(Q,Q)‖ at s = 0.01 | [O], same ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    names = {"none": "no LayerNorm", "pre": "pre-LN", "post": "post-LN"}
    for key in res.norms:
        place, mult = key
        label = names[place] + ("" if mult == 1.0 else f", τ = {mult:g}·√d_K")
        p_slope, p_ratio = paper.get(key, ("—", "—"))
        lines.append(
            f"| {label} | {stat(key, 'Q')} | {stat(key, 'V')} | {p_slope} | {ratio(key)} | {p_ratio} |"
        )
    lines += [
        "",
        "† from the audit of [O]'s released data in issue 15 (their sizes, not ours), not regenerated here.",
        "",
        "| claim | source | ours | verdict |",
        "|---|---|---|---|",
        "| Pre-LN removes the input-scale dependence: the small-scale slopes collapse to about 0 and the "
        "value block's dominance at s = 0.01 disappears | [O], LayerNorm experiment (released data†: "
        "slopes ~0, V/Q 5e5 → 4.6) "
        f"| slopes {stat(('pre', 1.0), 'Q')} (Q), {stat(('pre', 1.0), 'V')} (V); V/Q at s = 0.01 "
        f"{fmt(float(np.median(base)), 2)} → {fmt(float(np.median(pre)), 2)} "
        f"| {'agree' if pre_flat and np.median(pre) < 100 else 'partly'} |",
        "| Post-LN (derived here from [O] Thm 3.1-3.2, not a claim of [O]): LN(F) cancels F's overall "
        "scale s, so H(V,V) ~ s⁰ and H(Q,Q) ~ s⁴, and the value block dominates even more at small s "
        f"| ours | slopes {stat(('post', 1.0), 'Q')} (Q), {stat(('post', 1.0), 'V')} (V); V/Q at s = 0.01 "
        f"{ratio(('post', 1.0))} | {'derivation confirmed' if post_ok else 'derivation NOT confirmed'} |",
        "| Temperature (derived here): the logits are s²XW_QW_KᵀXᵀ/τ, so at small logits H(Q,Q) ∝ τ⁻² "
        "while H(V,V) does not depend on τ: V/Q ∝ τ², slopes unchanged | ours | V/Q at s = 0.01 relative "
        "to τ = √d_K: "
        + ", ".join(f"×{g:.3g} at τ = {t:g}·√d_K (τ²: {t**2:g})" for t, g in tau_gain.items())
        + f" | {'derivation confirmed' if tau_ok else 'derivation NOT confirmed'} |",
        "",
        f"![LayerNorm placement and temperature](images/{FIGURES['layernorm']})",
        "",
        paragraph(
            "**Commentary.** With pre-LN the layer sees LN(s X) = LN(X) up to eps: the Hessian no longer",
            "depends on the input scale, and the value-over-query dominance that experiment 1 finds at",
            "small s is the one at s ~ 1. The remaining small slopes come from eps (at s = 0.01 the",
            "input variance 1e-4 is only 10x eps). Post-LN normalises the output instead: the input",
            "scale still reaches the softmax, so the query block keeps a steep slope while the value",
            "block loses its own. Our pre-LN V/Q at s = 0.01 and [O]'s 4.6 are ratios of O(1) blocks at",
            "different sizes and draws; we compare their order of magnitude, not their values.",
        ),
        "",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------
# Driver
# ------------------------------------------------------------------------------------------------------------


def reproduce(quick: bool = False, out: str | Path = "docs") -> dict:
    """Run the eight experiments, write ``out/images/repro_*.png`` and ``out/reproduction.md``.

    Returns the raw results, the written paths and the timings (for the tests).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    att = repro_attention.run(quick=quick)
    att_summary = repro_attention.summary(att)
    repro_attention.plot(att, att_summary, str(out / "images" / FIGURES["attention"]))
    timings["attention"] = time.perf_counter() - t
    print(f"[1/8] attention scaling: {timings['attention']:.1f} s", flush=True)

    t = time.perf_counter()
    vit = repro_vit.run(quick=quick)
    repro_vit.plot(vit, str(out / "images" / FIGURES["vit"]))
    timings["vit"] = time.perf_counter() - t
    print(f"[2/8] ViT blocks: {timings['vit']:.1f} s", flush=True)

    t = time.perf_counter()
    thm7 = repro_theorem7.run(quick=quick)
    repro_theorem7.plot(thm7, str(out / "images" / FIGURES["theorem7"]))
    timings["theorem7"] = time.perf_counter() - t
    print(f"[3/8] Theorem 7: {timings['theorem7']:.1f} s", flush=True)

    t = time.perf_counter()
    live = repro_live_bounds.run(quick=quick)
    live_summary = repro_live_bounds.summary(live)
    repro_live_bounds.plot(live, str(out / "images" / FIGURES["live_bounds"]))
    timings["live_bounds"] = time.perf_counter() - t
    print(f"[4/8] Thm 1 during training: {timings['live_bounds']:.1f} s", flush=True)

    t = time.perf_counter()
    ln = repro_layernorm.run(quick=quick)
    repro_layernorm.plot(ln, str(out / "images" / FIGURES["layernorm"]))
    timings["layernorm"] = time.perf_counter() - t
    print(f"[5/8] LayerNorm placement and temperature: {timings['layernorm']:.1f} s", flush=True)

    t = time.perf_counter()
    stab = repro_stabilization.run(quick=quick)
    repro_stabilization.plot(stab, str(out / "images" / FIGURES["stabilization"]))
    timings["stabilization"] = time.perf_counter() - t
    print(f"[6/8] [KG] stabilisation: {timings['stabilization']:.1f} s", flush=True)

    t = time.perf_counter()
    block = repro_block_bound.run(quick=quick)
    block_summary = repro_block_bound.summary(block)
    repro_block_bound.plot(block, str(out / "images" / FIGURES["block_bound"]))
    timings["block_bound"] = time.perf_counter() - t
    print(f"[7/8] full-block bound during training: {timings['block_bound']:.1f} s", flush=True)
    scaling = repro_scaling.run(quick=quick, log=lambda _line: None)
    for family in scaling.runs:
        scaling_figures.plot(scaling, family, out / "images" / FIGURES[f"scaling_{family}"])
    timings["scaling"] = time.perf_counter() - t
    print(f"[8/8] curvature against width, depth and data: {timings['scaling']:.1f} s", flush=True)

    timings["total"] = time.perf_counter() - start
    command = "python experiments/reproduce_papers.py" + (" --quick" if quick else "")
    header = [
        "# Reproducing the papers' claims",
        "",
        paragraph(
            f"Generated by `{command}` ({'quick' if quick else 'full'} run, {timings['total']:.0f} s on",
            f"{torch.get_num_threads()} CPU thread(s), torch {torch.__version__}, Python",
            f"{platform.python_version()}). Every number on this page was measured in that run, and the",
            "verdicts are computed from those numbers; rerun the command to regenerate the page and its",
            "figures (`--quick` gives a smaller, noisier version in well under a minute).",
        ),
        "",
        '- [O] W. Ormaniec, F. Dangel, S. P. Singh, "What Does It Mean to Be a Transformer? Insights from a '
        'Theoretical Hessian Analysis", ICLR 2025, arXiv:2410.10986.',
        '- [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer '
        'Hessians and Their Implications for Scaling Laws", arXiv:2510.16927.',
        '- [KG] N. Kiselev, A. Grabovoy, "Curvature-Aligned Probing for Local Loss-Landscape Stabilization", '
        "arXiv:2604.14870.",
        "",
        paragraph(
            "The papers' formulas, with their errors corrected, are implemented and tested against",
            "autograd in `lightning_hessian.formulas` (see the docstrings). The numbers quoted from",
            "[O]'s experiments (slopes 4.98 and 1.98, the ratio ~5e5 at s = 0.01 and the crossover near",
            "s ~ 0.8) are taken from the project's notes on the paper, not re-read from it for this page;",
            "the crossover in [O]'s released data (median 0.83, range 0.72 – 1.03 over 20 repeats) and",
            "[P]'s ViT statements (value and key blocks dominate; Thm 7 illustrated on a ViT) are quoted",
            "from the audit in issue 15, also not regenerated here. Where we could not check what a paper",
            "claims, we say so.",
        ),
        "",
    ]
    text = "\n".join(
        [
            *header,
            attention_section(att, att_summary, timings["attention"]),
            vit_section(vit, timings["vit"]),
            theorem7_section(thm7, timings["theorem7"]),
            live_bounds_section(live, live_summary, timings["live_bounds"]),
            layernorm_section(ln, timings["layernorm"]),
            repro_stabilization.section(stab, timings["stabilization"], command),
            repro_block_bound.section(block, block_summary, timings["block_bound"], FIGURES["block_bound"]),
            scaling_report.section(scaling, timings["scaling"], command),
        ]
    )
    report = out / "reproduction.md"
    report.write_text(text)
    print(f"wrote {report} and {len(FIGURES)} figures in {out / 'images'} ({timings['total']:.0f} s)")
    return {
        "attention": att,
        "attention_summary": att_summary,
        "vit": vit,
        "theorem7": thm7,
        "live_bounds": live,
        "live_bounds_summary": live_summary,
        "layernorm": ln,
        "stabilization": stab,
        "block_bound": block,
        "scaling": scaling,
        "timings": timings,
        "report": report,
        "figures": [out / "images" / name for name in FIGURES.values()],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller grids, fewer draws, a 2-layer ViT")
    parser.add_argument(
        "--out", help="output folder (default: docs for the full run, a new temporary folder with --quick)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: these small problems run fastest on one thread, and a shared "
        "machine is not oversubscribed)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out or (tempfile.mkdtemp(prefix="reproduction-quick-") if args.quick else DOCS)
    reproduce(quick=args.quick, out=out)


if __name__ == "__main__":
    main()
