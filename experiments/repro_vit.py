"""[P]/[O] Which Hessian blocks dominate a small ViT on scikit-learn's digits, at initialisation and trained.

The model is the ViT class of ``examples/train_vit_digits.py``, built with explicit arguments (8x8 digits
cut into 2x2 patches, a class token plus 16 patch tokens, width 32, 4 heads, pre-norm blocks with a fused
``qkv`` projection that ``find_blocks`` slices into query, key and value blocks, GELU MLP, head on the class
token). It is trained here with a plain PyTorch AdamW loop (no Lightning), and
:func:`lightning_hessian.analyze` measures, per block, the top and smallest Hessian eigenvalues (Lanczos),
the trace (Hutch++) and the Gauss-Newton / functional split, on a fixed batch of training images, once at
initialisation and once after training; and, with ``curvature="gauss_newton"``, the smallest eigenvalue of
each block's Gauss-Newton part (the test of its positive semi-definiteness: its λ_max says nothing about
that).

References:
    [O] W. Ormaniec, F. Dangel, S. P. Singh, arXiv:2410.10986 (ICLR 2025), Fig. 1 and §4.
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, arXiv:2510.16927.
"""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from lightning_hessian import BlockCurvature, CurvatureReport, analyze

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_vit_digits.py"

#: Block kinds in the order used for tables and figures.
KINDS = ("embedding", "query", "key", "value", "attn_out", "norm", "ffn_in", "ffn_out", "head")


def load_example() -> ModuleType:
    """Import ``examples/train_vit_digits.py`` (not a package) to reuse its ``ViT`` and ``loss_fn``."""
    spec = importlib.util.spec_from_file_location("train_vit_digits", EXAMPLE)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class VitResult:
    init: CurvatureReport
    trained: CurvatureReport
    settings: dict
    train_seconds: float
    test_accuracy: float
    init_accuracy: float
    final_train_loss: float
    attention_init: list[dict[str, float]]  # per layer, see attention_stats
    attention_trained: list[dict[str, float]]
    gn_min_init: dict[str, float]  # block -> smallest eigenvalue of its Gauss-Newton part (Lanczos)
    gn_min_trained: dict[str, float]
    gn_top_init: dict[str, float]  # block -> the same run's Gauss-Newton λ_max (the scale of gn_min)
    gn_top_trained: dict[str, float]


Split = tuple[torch.Tensor, torch.Tensor]


def digits_split(seed: int = 0) -> tuple[Split, Split]:
    """The example's split: 1500 training and 297 held-out digits, grey levels scaled to [0, 1]."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, test = order[:1500], order[1500:]
    return (images[train], labels[train]), (images[test], labels[test])


def accuracy(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(images).argmax(-1) == labels).float().mean())


def train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    steps: int,
    seed: int = 0,
    lr: float = 3e-3,
    batch_size: int = 64,
) -> float:
    """AdamW (weight decay 0.05), linear warmup over 10% of the steps then cosine decay; returns the last
    training loss (mean of the last 20 steps)."""
    images, labels = data
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warmup = max(1, steps // 10)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    recent: list[float] = []
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        recent = [*recent[-19:], loss.item()]
    return float(np.mean(recent))


def run(quick: bool = False, seed: int = 0) -> VitResult:
    """Analyse the ViT at initialisation and after training.

    Full: 3 layers (the example's model), 400 AdamW steps, curvature batch of 256 training images,
    Lanczos tolerance 1e-4 (the library default). Quick: 2 layers, 150 steps, 32 images, tolerance 1e-2 and
    fewer iterations.
    """
    example = load_example()
    settings = (
        {"depth": 2, "steps": 150, "batch": 32, "tol": 1e-2, "max_iter": 30, "trace_matvecs": 9}
        if quick
        else {"depth": 3, "steps": 400, "batch": 256, "tol": 1e-4, "max_iter": 100, "trace_matvecs": 30}
    )
    # Every architecture argument explicit: the example's defaults may change, this experiment should not.
    arch = {"patch": 2, "dim": 32, "depth": settings["depth"], "heads": 4}
    settings["arch"] = arch
    torch.manual_seed(seed)
    model = example.ViT(**arch)
    (x_train, y_train), (x_test, y_test) = digits_split(seed)
    batch = (x_train[: settings["batch"]], y_train[: settings["batch"]])
    kwargs = {
        "split": True,  # Gauss-Newton / functional parts (the loss_fn returns (loss, logits))
        "tol": settings["tol"],
        "max_iter": settings["max_iter"],
        "trace_matvecs": settings["trace_matvecs"],
        "seed": seed,
    }
    init_acc = accuracy(model, x_test, y_test)
    init_attention = attention_stats(model, batch[0])
    init = analyze(model, example.loss_fn, batch, **kwargs)
    gn_init = gauss_newton_extremes(model, example.loss_fn, batch, settings, seed)
    start = time.perf_counter()
    last_loss = train(model, (x_train, y_train), settings["steps"], seed=seed)
    seconds = time.perf_counter() - start
    trained = analyze(model, example.loss_fn, batch, **kwargs)
    gn_trained = gauss_newton_extremes(model, example.loss_fn, batch, settings, seed)
    return VitResult(
        init=init,
        trained=trained,
        settings=settings,
        train_seconds=seconds,
        test_accuracy=accuracy(model, x_test, y_test),
        init_accuracy=init_acc,
        final_train_loss=last_loss,
        attention_init=init_attention,
        attention_trained=attention_stats(model, batch[0]),
        gn_min_init=gn_init[0],
        gn_min_trained=gn_trained[0],
        gn_top_init=gn_init[1],
        gn_top_trained=gn_trained[1],
    )


def gauss_newton_extremes(
    model: torch.nn.Module, loss_fn, batch: Split, settings: dict, seed: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Per block, the smallest and the largest eigenvalue of the Gauss-Newton part ``J^T H_out J`` (Lanczos,
    no trace). PSD means the smallest is >= 0 up to the Lanczos tolerance relative to the largest."""
    report = analyze(
        model,
        loss_fn,
        batch,
        curvature="gauss_newton",
        trace=False,
        tol=settings["tol"],
        max_iter=settings["max_iter"],
        seed=seed,
    )
    return (
        {b.name: float(b.min_eigenvalue) for b in report if b.min_eigenvalue is not None},
        {b.name: float(b.top_eigenvalue) for b in report},
    )


def attention_stats(model: torch.nn.Module, images: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: the standard deviation of the attention logits and the mean largest attention weight.

    [O]'s small-input regime is the one where the logits are small and attention is nearly uniform (largest
    weight close to 1/L); these numbers place the ViT's layers in that picture. The input of each attention
    module is captured with a forward hook, and its logits are recomputed from the fused ``qkv`` projection.
    """
    inputs: list[torch.Tensor] = []
    hooks = [
        blk.attn.register_forward_hook(lambda _m, args, _out: inputs.append(args[0])) for blk in model.blocks
    ]
    model.eval()
    try:
        with torch.no_grad():
            model(images)
            stats = []
            for blk, h in zip(model.blocks, inputs):
                b, n, d = h.shape
                heads = blk.attn.heads
                q, k, _ = blk.attn.qkv(h).reshape(b, n, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
                logits = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
                stats.append(
                    {
                        "logit_std": float(logits.std()),
                        "max_weight": float(logits.softmax(-1).amax(-1).mean()),
                        "uniform": 1.0 / n,
                    }
                )
    finally:
        for hook in hooks:
            hook.remove()
    return stats


def functional_magnitude(block: BlockCurvature) -> float:
    """Largest absolute eigenvalue of the block's functional part (0 when it has none)."""
    return max(abs(block.functional_top or 0.0), abs(block.functional_min or 0.0))


def short_name(name: str) -> str:
    """``blocks.1.attn.q`` -> ``L1 q``; ``blocks.0.mlp.fc1`` -> ``L0 fc1``; top-level names unchanged."""
    parts = name.split(".")
    if parts[0] == "blocks":
        return f"L{parts[1]} {parts[-1]}"
    return name


def kind_table(report: CurvatureReport) -> dict[str, dict[str, float]]:
    """Per block kind: the largest top eigenvalue over its blocks (and which block), the summed trace."""
    out: dict[str, dict[str, float]] = {}
    for b in report:
        if b.kind not in KINDS:
            continue
        row = out.setdefault(b.kind, {"top": -math.inf, "trace": 0.0, "block": ""})
        if b.top_eigenvalue > row["top"]:
            row["top"], row["block"] = b.top_eigenvalue, b.name
        row["trace"] += b.trace or 0.0
    return out


def ranking(report: CurvatureReport) -> list[str]:
    """Block kinds sorted by their largest top eigenvalue, largest first."""
    table = kind_table(report)
    return sorted(table, key=lambda k: -table[k]["top"])


def value_query_ratios(report: CurvatureReport) -> dict[int, tuple[float, float]]:
    """Per layer: ``λ_max(value) / λ_max(query)`` and ``λ_max(value) / λ_max(key)``."""
    per_layer: dict[int, dict[str, float]] = {}
    for b in report:
        if b.kind in ("query", "key", "value") and b.layer is not None:
            per_layer.setdefault(b.layer, {})[b.kind] = b.top_eigenvalue
    return {layer: (v["value"] / v["query"], v["value"] / v["key"]) for layer, v in sorted(per_layer.items())}


def plot(res: VitResult, path: str) -> None:
    """Top: λ_max per block, init vs trained (log). Bottom: after training, Gauss-Newton λ_max against the
    functional part's largest |eigenvalue|, per block (log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res.init.blocks)
    colors = {
        "embedding": "tab:gray",
        "query": "tab:red",
        "key": "tab:orange",
        "value": "tab:blue",
        "attn_out": "tab:cyan",
        "norm": "tab:olive",
        "ffn_in": "tab:green",
        "ffn_out": "tab:purple",
        "head": "k",
    }
    x = np.arange(len(names))
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(15, 8.5), sharex=True)
    width = 0.4
    init_top = np.array([max(res.init.blocks[n].top_eigenvalue, 1e-8) for n in names])
    trained_top = np.array([max(res.trained.blocks[n].top_eigenvalue, 1e-8) for n in names])
    kinds = [res.init.blocks[n].kind for n in names]
    bar_colors = [colors.get(k, "tab:brown") for k in kinds]
    ax.bar(x - width / 2, init_top, width, color=bar_colors, alpha=0.35, edgecolor="k", lw=0.4)
    ax.bar(x + width / 2, trained_top, width, color=bar_colors, edgecolor="k", lw=0.4)
    ax.set_yscale("log")
    ax.set_ylabel("top Hessian eigenvalue λ_max")
    ax.set_title(
        f"ViT on digits ({res.settings['depth']} layers, {res.settings['arch']['patch']}x"
        f"{res.settings['arch']['patch']} patches, fused qkv sliced into q/k/v), per-block λ_max on "
        f"{res.settings['batch']} training images:\nlight bars = initialisation, dark bars = after "
        f"{res.settings['steps']} AdamW steps (test accuracy {res.test_accuracy:.1%})",
        fontsize=10,
    )
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[k]) for k in KINDS]
    handles += [plt.Rectangle((0, 0), 1, 1, color="0.5", alpha=alpha) for alpha in (0.35, 1.0)]
    ax.legend(
        handles,
        [*KINDS, "(light) init", "(dark) trained"],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.005, 1.0),
        title="kind",
    )
    ax.grid(True, axis="y", which="major", alpha=0.3)

    gn = np.array([res.trained.blocks[n].gauss_newton_top or np.nan for n in names])
    func = np.array([functional_magnitude(res.trained.blocks[n]) for n in names])
    # The head and the final norm's gain and bias enter the logits linearly: no functional part. Such blocks
    # get a "0" label instead of a bar (a log axis has no zero).
    func[func == 0] = np.nan
    ax2.bar(x - width / 2, gn, width, color=bar_colors, edgecolor="k", lw=0.4, label="Gauss-Newton λ_max")
    ax2.bar(
        x + width / 2,
        func,
        width,
        color=bar_colors,
        edgecolor="k",
        lw=0.4,
        hatch="///",
        alpha=0.6,
        label="functional part, max |λ|",
    )
    for i in np.nonzero(np.isnan(func))[0]:
        ax2.annotate(
            "0",
            (x[i] + width / 2, 0),
            xycoords=("data", "axes fraction"),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    ax2.set_yscale("log")
    ax2.set_ylabel("eigenvalue magnitude, trained")
    ax2.set_title(
        "After training: Gauss-Newton (outer-product) part vs functional part, per block", fontsize=10
    )
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.005, 1.0))
    ax2.grid(True, axis="y", which="major", alpha=0.3)
    ax2.set_xticks(x, [short_name(n) for n in names], rotation=60, ha="right", fontsize=8)
    ax2.set_xlabel("block (L<i> = layer i; fc1/fc2 = FFN in/out; proj = attention output)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
