"""Regenerate the TensorBoard screenshots in ``docs/images/`` from a real run of the ViT demo, and one from
a short budget-mode run of the character GPT.

Run it in the project's environment (``pip install -e ".[examples]"``: tensorboard, matplotlib, Pillow);
it also needs Chromium and Playwright's Python package (Playwright drives the system Chromium; its own
browser download is not used):

    apt-get install -y chromium          # or any Chromium / Chrome; pass its path with --chromium
    pip install playwright
    python docs/make_screenshots.py                            # trains the demo (~2 min), then shoots
    python docs/make_screenshots.py --logdir runs/vit_digits   # shoots existing logs of the demo
    python docs/make_screenshots.py --shots budget             # only the budget-mode run (~1-2 min)

It starts ``tensorboard --logdir <logdir> --host 127.0.0.1`` on a free port, opens the Custom Scalars,
Images and Text tabs in headless Chromium (light theme, no smoothing, y outliers kept), and writes

    dashboard_stability.png    Custom Scalars, "Curvature: Stability"
    dashboard_attention.png    Custom Scalars, "Curvature: Attention"
    spectral_density.png       Images, curvature/spectral_density
    heatmaps.png               Images, curvature/top_eigenvalue_heatmap and curvature/density_over_time
    text_latest.png            Text, curvature/latest and alerts

and, from ``examples/train_char_gpt.py --max-steps 600 --budget 0.3`` (``HessianMonitor`` without a
schedule, planning its tiers within 30% of the training time so that a short run has points to show;
``--budget-logdir`` shoots existing logs of such a run):

    dashboard_budget.png       Custom Scalars, "Curvature: Stability" over "Curvature: Pass cost"

each kept under 400 KB (palette-quantised when needed).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from PIL import Image, ImageChops
from playwright.sync_api import Locator, Page, sync_playwright

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [  # without the networking flags headless Chromium hangs on a machine with no internet
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MAX_BYTES = 400_000
#: The budget-mode run: 30% of the training time, so that 600 steps give the tiers enough points to chart.
BUDGET_RUN = ["--max-steps", "600", "--budget", "0.3"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_tensorboard(logdir: Path, port: int) -> subprocess.Popen:
    """``tensorboard`` in the background; returns once its HTTP server lists at least one run."""
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--port", str(port)]
    process = subprocess.Popen([*command, "--host", "127.0.0.1"], stderr=subprocess.DEVNULL)
    for _ in range(120):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/data/runs", timeout=2) as response:
                if response.read().strip() not in (b"", b"[]"):
                    return process
        except OSError:
            pass
        time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"tensorboard did not serve the runs of {logdir}")


def save(locator: Locator, path: Path) -> None:
    """Screenshot one element into ``path``."""
    locator.screenshot(path=str(path))
    shrink(path)


def shrink(path: Path) -> None:
    """Crop the page background off the bottom and right, then keep the PNG under MAX_BYTES (palette
    first, then a smaller size)."""
    image = Image.open(path).convert("RGB")
    background = Image.new("RGB", image.size, image.getpixel((image.width - 1, image.height - 1)))
    box = ImageChops.difference(image, background).getbbox()
    if box is not None:
        image = image.crop((0, 0, min(image.width, box[2] + 10), min(image.height, box[3] + 10)))
        image.save(path)
    scale = 1.0
    while path.stat().st_size > MAX_BYTES:
        size = (round(image.width * scale), round(image.height * scale))
        image.resize(size, Image.LANCZOS).quantize(256).save(path, optimize=True)
        scale *= 0.85
    print(f"wrote {path} ({path.stat().st_size // 1000} KB)")


def open_custom_scalars(page: Page, url: str) -> None:
    """The Custom Scalars tab with smoothing 0 and outliers kept."""
    page.set_viewport_size({"width": 1120, "height": 1000})  # two charts per row
    page.goto(f"{url}#custom_scalars")
    page.get_by_text("Curvature: Stability").first.wait_for()
    page.get_by_text("Ignore outliers in chart scaling").click()  # keep the spikes: they are the story
    smoothing = page.locator("tf-smoothing-input input").first
    smoothing.fill("0")
    smoothing.press("Enter")


def pane(page: Page, category: str, log_scale: tuple[str, ...], height: int = 1000) -> Locator:
    """One Custom Scalars category, every chart fitted to its data with its legend shown, ``log_scale``
    charts (by a word of their title) on a log y axis."""
    # Charts render only while on screen: a viewport as tall as the longest pane keeps them all drawn.
    page.set_viewport_size({"width": 1120, "height": height})
    found = page.locator("tf-category-paginated-view").filter(has_text=category).first
    cards = found.locator("tf-custom-scalar-multi-line-chart-card")
    for i in range(cards.count()):
        card = cards.nth(i)
        if any(card.get_by_text(word).count() for word in log_scale):
            card.locator("paper-icon-button[icon='line-weight']").click()  # log y axis
        card.locator("paper-icon-button[icon='settings-overscan']").click()  # fit the data
        card.locator("paper-icon-button.toggle-matches-button").click()  # the legend: tags and markers
    page.wait_for_timeout(1500)
    return found


def custom_scalars(page: Page, url: str, out: Path) -> None:
    open_custom_scalars(page, url)
    for category, name, log_scale in [
        ("Curvature: Stability", "dashboard_stability.png", ("vs threshold",)),
        ("Curvature: Attention", "dashboard_attention.png", ("λ_max",)),
        ("Curvature: Theory vs measured", "dashboard_theory.png", ("against the bounds", "/ outer bound")),
    ]:
        save(pane(page, category, log_scale, 2600 if "Theory" in category else 1000), out / name)


def budget_mode(page: Page, url: str, out: Path) -> None:
    """The budget-mode charts: the Stability pane (update curvature and critical sharpness against 2/lr,
    alignments) above the Pass cost pane (the monitor's overhead), in one image."""
    open_custom_scalars(page, url)
    parts = [out / "_stability.png", out / "_cost.png"]
    pane(page, "Curvature: Stability", ("vs threshold", "vs 2/lr"), 1400).screenshot(path=str(parts[0]))
    pane(page, "Curvature: Pass cost", ()).screenshot(path=str(parts[1]))
    images = [Image.open(p).convert("RGB") for p in parts]
    both = Image.new("RGB", (max(i.width for i in images), sum(i.height for i in images) + 20), "white")
    both.paste(images[0], (0, 0))
    both.paste(images[1], (0, images[0].height + 20))
    for p in parts:
        p.unlink()
    both.save(out / "dashboard_budget.png")
    shrink(out / "dashboard_budget.png")


def images(page: Page, url: str, out: Path) -> None:
    page.set_viewport_size({"width": 1800, "height": 1200})  # the spectral density figure is 1170 px wide
    page.goto(f"{url}#images")
    page.get_by_text("curvature/spectral_density").first.wait_for()
    page.get_by_text("Show actual image size").click()
    page.wait_for_timeout(2000)
    cards = page.locator("tf-image-loader")
    save(cards.filter(has_text="curvature/spectral_density").first, out / "spectral_density.png")
    heatmaps = [out / "_top.png", out / "_density.png"]
    cards.filter(has_text="curvature/top_eigenvalue_heatmap").first.screenshot(path=str(heatmaps[0]))
    cards.filter(has_text="curvature/density_over_time").first.screenshot(path=str(heatmaps[1]))
    parts = [Image.open(p).convert("RGB") for p in heatmaps]
    both = Image.new("RGB", (sum(p.width for p in parts) + 20, max(p.height for p in parts)), "white")
    both.paste(parts[0], (0, 0))
    both.paste(parts[1], (parts[0].width + 20, 0))
    for p in heatmaps:
        p.unlink()
    both.save(out / "heatmaps.png")
    shrink(out / "heatmaps.png")


# Text cards scroll inside a 500 px box: show the latest table whole, and the alerts from a chosen step on.
_TEXT_JS = """([alertsStep]) => {
  const loaders = [];  // the text cards live in nested shadow roots
  const walk = (root) => root.querySelectorAll("*").forEach((el) => {
    if (el.tagName === "TF-TEXT-LOADER") loaders.push(el);
    if (el.shadowRoot) walk(el.shadowRoot);
  });
  walk(document);
  for (const loader of loaders) {
    const box = loader.shadowRoot.querySelector("#steps-container");
    const steps = [...box.querySelectorAll(".step-container")];
    if (loader.tag.startsWith("curvature/latest")) {
      steps.slice(1).forEach((step) => { step.nextElementSibling.remove(); step.remove(); });
      box.style.maxHeight = "none";
    } else {
      const first = steps.find((step) => step.innerText.trim() === `step ${alertsStep}`) || steps[0];
      box.style.maxHeight = "330px";
      box.scrollTop += first.getBoundingClientRect().top - box.getBoundingClientRect().top - 10;
    }
  }
}"""


def text(page: Page, url: str, out: Path, alerts_step: int) -> None:
    page.set_viewport_size({"width": 1600, "height": 1800})  # the dashboard scrolls inside: fit it all
    page.goto(f"{url}#text")
    page.get_by_text("curvature/latest").first.wait_for()
    page.wait_for_timeout(2000)
    page.evaluate(_TEXT_JS, [alerts_step])
    page.wait_for_timeout(500)
    save(page.locator("tf-text-dashboard [slot=center]").first, out / "text_latest.png")


def shoot(logdir: Path, chromium: str, take: Callable[[Page, str], None]) -> None:
    """Serve ``logdir`` with TensorBoard and run ``take(page, url)`` in headless Chromium."""
    port = free_port()
    tensorboard = start_tensorboard(logdir, port)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
            take(browser.new_page(), f"http://127.0.0.1:{port}/?darkMode=false")
            browser.close()
    finally:
        tensorboard.terminate()
        tensorboard.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--logdir", type=Path, help="logs of examples/train_vit_digits.py (default: run it)")
    parser.add_argument(
        "--budget-logdir", type=Path, help="logs of a budget-mode train_char_gpt.py (default: run it)"
    )
    parser.add_argument("--shots", choices=("all", "demo", "budget"), default="all", help="which to make")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images", help="where the PNGs go")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--alerts-step", type=int, default=75, help="scroll the alerts card to this step")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    def demo_shots(page: Page, url: str) -> None:
        custom_scalars(page, url, args.out)
        images(page, url, args.out)
        text(page, url, args.out, args.alerts_step)

    with tempfile.TemporaryDirectory() as tmp:
        if args.shots in ("all", "demo"):
            logdir = args.logdir
            if logdir is None:
                logdir = Path(tmp) / "vit_digits"
                demo = ROOT / "examples" / "train_vit_digits.py"
                subprocess.run([sys.executable, str(demo), "--logdir", str(logdir)], check=True)
            shoot(logdir, args.chromium, demo_shots)
        if args.shots in ("all", "budget"):
            logdir = args.budget_logdir
            if logdir is None:
                logdir = Path(tmp) / "char_gpt"
                run = [sys.executable, str(ROOT / "examples" / "train_char_gpt.py"), *BUDGET_RUN]
                subprocess.run([*run, "--logdir", str(logdir)], check=True)
            shoot(logdir, args.chromium, lambda page, url: budget_mode(page, url, args.out))


if __name__ == "__main__":
    main()
