"""Take a screenshot of the curvature dashboard in TensorBoard (docs/dashboard.png).

    python docs/screenshot.py                      # runs `lightning-curvature demo` first
    python docs/screenshot.py --logdir RUN_DIR     # an existing TensorBoard run
    python docs/screenshot.py --logdir RUN_DIR --tab scalars --out /tmp/scalars.png

It serves the run with TensorBoard on a free port of 127.0.0.1 and opens it in a real
headless browser driven by Playwright (``pip install "lightning_curvature[docs]"``) with the
system's Chromium (``apt-get install chromium``; ``--chromium PATH`` for another one;
Playwright's own browser download is not needed). Before the page loads, TensorBoard's
"Ignore outliers in chart scaling" is turned off (a localStorage setting); the script then
waits until every chart has drawn its curves (TensorBoard loads them lazily), grows the
window to fit the charts, and crops the picture below the last chart that has data (the
per-layer charts stay empty in a run without per-layer measurements). TensorBoard and the
browser are shut down in all cases.

A maintainer's tool: it is not part of the package, the tests or CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# TensorBoard plugin tab -> (plugin name in /data/plugins_listing, default URL hash parameters,
# how many category panes to capture: custom scalars all, scalars the tag filter's results)
TABS: dict[str, tuple[str, dict[str, str], int | None]] = {
    "custom_scalars": ("custom_scalars", {}, None),
    "scalars": (
        "scalars",
        {"tagFilter": r"^curvature/(lambda_max|lambda_max_x_lr|stability_ratio|trace)$"},
        1,
    ),
}
# True when a chart has drawn a curve (an SVG path with more than a couple of points).
# CSS pixels below a chart that belong to its card (buttons, the "Matches (n)" line).
CARD_FOOTER = 70
CURVE_DRAWN_JS = "paths => paths.some(path => (path.getAttribute('d') || '').length > 20)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--logdir",
        type=Path,
        help="a TensorBoard run directory; without it, `lightning-curvature demo` makes one",
    )
    parser.add_argument(
        "--demo-steps",
        type=int,
        default=None,
        help="--max-steps for the demo run (default: the demo's own)",
    )
    parser.add_argument("--out", type=Path, default=DOCS / "dashboard.png", help="PNG to write")
    parser.add_argument(
        "--tab",
        choices=sorted(TABS),
        default="custom_scalars",
        help="TensorBoard page to capture (default: custom_scalars)",
    )
    parser.add_argument(
        "--tag-filter",
        help="tag regex for the scalars tab (default: the λmax, λmax·lr, stability ratio and "
        "trace charts)",
    )
    parser.add_argument("--smoothing", type=float, default=0.0, help="TensorBoard smoothing")
    parser.add_argument("--width", type=int, default=1280, help="browser window width (CSS px)")
    parser.add_argument(
        "--height",
        type=int,
        default=900,
        help="browser window height (CSS px); grown to fit the charts",
    )
    parser.add_argument("--scale", type=float, default=1.5, help="device pixels per CSS pixel")
    parser.add_argument(
        "--full-page", action="store_true", help="keep the whole page instead of cropping"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait per stage")
    parser.add_argument("--chromium", help="path of the Chromium binary (default: search PATH)")
    return parser.parse_args(argv)


def find_chromium(explicit: str | None) -> str:
    for name in (explicit,) if explicit else CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        f"error: {explicit or 'chromium'} not found; install it with `apt-get install chromium`"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_demo(directory: Path, steps: int | None) -> Path:
    """Run ``lightning-curvature demo --out DIRECTORY``; TensorBoard finds the run below it."""
    command = [sys.executable, "-m", "lightning_curvature", "demo", "--out", str(directory)]
    if steps is not None:
        command += ["--max-steps", str(steps)]
    print(f"running {' '.join(command)}", file=sys.stderr)
    status = subprocess.run(command).returncode
    if status != 0:
        raise SystemExit(f"error: `lightning-curvature demo` failed (exit status {status})")
    if not any(directory.rglob("events.out.tfevents.*")):
        raise SystemExit(f"error: the demo wrote no TensorBoard event file under {directory}")
    return directory


@contextmanager
def tensorboard(logdir: Path, plugin: str, timeout: float, log: Path) -> Iterator[str]:
    """TensorBoard serving ``logdir`` on 127.0.0.1; yields its URL once it has read data for
    ``plugin`` (it loads runs lazily), and stops it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir)),
                *("--host", "127.0.0.1", "--port", str(port)),
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            wait_for_plugin(process, url, plugin, timeout, log)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def wait_for_plugin(
    process: subprocess.Popen[bytes], url: str, plugin: str, timeout: float, log: Path
) -> None:
    deadline = time.monotonic() + timeout
    listing: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"error: TensorBoard exited with status {process.returncode}:\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            with urllib.request.urlopen(f"{url}/data/plugins_listing", timeout=5) as reply:
                listing = json.load(reply)
            if listing.get(plugin, {}).get("enabled"):
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    if listing:
        raise SystemExit(f"error: TensorBoard found no {plugin} data within {timeout:.0f}s")
    raise SystemExit(f"error: TensorBoard did not answer on {url} within {timeout:.0f}s")


def chart_state(page: Any, panes: int | None) -> dict[str, int]:
    """How many line charts the chosen category panes show (``panes``: all of them, or the
    first few), how many have drawn a curve, how many match no tag (the per-layer charts of
    a run without per-layer tags say "Matches (0)"), and where, in page pixels, the lowest
    drawn chart's card ends. Playwright's CSS locators reach into TensorBoard's shadow roots
    by themselves."""
    views = (
        page.locator("tf-category-paginated-view")
        .filter(visible=True)
        .filter(has=page.locator("vz-line-chart2"))
        .all()
    )
    charts = drawn = empty = bottom = 0
    scroll_y = page.evaluate("() => window.scrollY")
    for view in views[:panes]:
        empty += view.get_by_text("Matches (0)", exact=True).filter(visible=True).count()
        for chart in view.locator("vz-line-chart2").filter(visible=True).all():
            charts += 1
            if chart.locator("path.line").evaluate_all(CURVE_DRAWN_JS):
                drawn += 1
                box = chart.bounding_box()
                if box is not None:  # the card's buttons and "Matches" line come below
                    bottom = max(bottom, int(box["y"] + box["height"] + scroll_y) + CARD_FOOTER)
    return {"charts": charts, "drawn": drawn, "empty": empty, "bottom": bottom}


def wait_for_charts(page: Any, panes: int | None, timeout: float) -> dict[str, int]:
    """Until every chart that matches a tag has drawn a curve and nothing has changed for
    1.5 seconds."""
    deadline = time.monotonic() + timeout
    previous: dict[str, int] = {}
    stable = 0
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        state = chart_state(page, panes)
        ready = state["drawn"] > 0 and state["drawn"] + state["empty"] == state["charts"]
        stable = stable + 1 if ready and state == previous else 0
        previous = state
        if stable >= 3:
            return state
    raise SystemExit(
        f"error: the charts did not render within {timeout:.0f}s "
        f"({previous.get('drawn', 0)} of {previous.get('charts', 0)} drawn)"
    )


def capture(chromium: str, url: str, panes: int | None, args: argparse.Namespace) -> int:
    """Open ``url`` in headless Chromium, wait for the charts, write the PNG; return how many
    charts it shows."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise SystemExit(
            "error: the screenshot needs Playwright: pip install 'lightning_curvature[docs]'"
        ) from None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium, args=["--no-sandbox", "--disable-gpu"]
        )
        try:
            context = browser.new_context(
                viewport={"width": args.width, "height": args.height},
                device_scale_factor=args.scale,
            )
            # Show every point: TensorBoard keeps this checkbox in localStorage, default on.
            context.add_init_script("localStorage.setItem('_ignoreYOutliers', 'false')")
            page = context.new_page()
            page.set_default_timeout(args.timeout * 1000)
            page.goto(url)
            state = wait_for_charts(page, panes, args.timeout)
            height = args.height
            for _ in range(3):  # TensorBoard scrolls inside the page: grow the window to fit
                if state["bottom"] + 16 <= height:
                    break
                height = state["bottom"] + 16
                page.set_viewport_size({"width": args.width, "height": height})
                state = wait_for_charts(page, panes, args.timeout)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            if args.full_page:
                page.screenshot(path=str(args.out), full_page=True)
            else:
                clip = {"x": 0, "y": 0, "width": args.width, "height": state["bottom"] + 16}
                page.screenshot(path=str(args.out), clip=clip)
        finally:
            browser.close()
    return state["drawn"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    chromium = find_chromium(args.chromium)
    plugin, hash_params, panes = TABS[args.tab]
    hash_params = {**hash_params, "_smoothingWeight": f"{args.smoothing:g}"}
    if args.tag_filter is not None:
        hash_params["tagFilter"] = args.tag_filter
    if not hash_params.get("tagFilter", True):
        del hash_params["tagFilter"]
    with tempfile.TemporaryDirectory(prefix="screenshot-") as scratch:
        logdir = args.logdir or run_demo(Path(scratch) / "demo", args.demo_steps)
        if not logdir.exists():
            raise SystemExit(f"error: no such log directory: {logdir}")
        with tensorboard(logdir, plugin, args.timeout, Path(scratch) / "tensorboard.log") as url:
            fragment = urllib.parse.urlencode(hash_params, quote_via=urllib.parse.quote)
            charts = capture(chromium, f"{url}/#{args.tab}&{fragment}", panes, args)
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size / 1024:.0f} KiB, {charts} charts) from {logdir} ({args.tab})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
