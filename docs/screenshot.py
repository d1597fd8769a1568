"""Take a screenshot of the curvature dashboard in TensorBoard (docs/dashboard.png).

    python docs/screenshot.py                      # runs `lightning-curvature demo` first
    python docs/screenshot.py --logdir RUN_DIR     # an existing TensorBoard run
    python docs/screenshot.py --logdir RUN_DIR --tab scalars --out /tmp/scalars.png

It starts TensorBoard on a free localhost port, opens it in headless Chromium (Debian's
``chromium`` package: ``apt-get install chromium``) and drives it over the DevTools protocol
on a pipe (``--remote-debugging-pipe``), so no Python package beyond the standard library and
TensorBoard is needed. The protocol lets the script turn TensorBoard's "Ignore outliers in
chart scaling" off (a localStorage setting, out of reach of ``chromium --screenshot``), wait
until every chart has drawn its curves (TensorBoard loads them lazily), and crop the picture
to the dashboard. TensorBoard and Chromium are shut down in all cases.

A maintainer's tool: it is not part of the package, the tests or CI.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

DOCS = Path(__file__).resolve().parent
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--mute-audio",
    "--hide-scrollbars",
)
# TensorBoard plugin tab -> (plugin name in /data/plugins_listing, default URL hash parameters,
# how many category panes to capture: custom scalars all, scalars the tag filter's results)
TABS = {
    "custom_scalars": ("custom_scalars", {}, None),
    "scalars": (
        "scalars",
        {"tagFilter": r"^curvature/(lambda_max|lambda_max_x_lr|stability_ratio|trace)$"},
        1,
    ),
}

# Walks the shadow roots of TensorBoard's Polymer dashboards. Returns how many line charts the
# chosen category panes with charts show (__PANES__: all of them, or the first: the scalars
# tab's "tags matching" pane), how many have drawn a curve, where the lowest pane ends, and the
# page size.
CHARTS_JS = r"""
(() => {
  const all = (root, selector, out = []) => {
    root.querySelectorAll(selector).forEach((e) => out.push(e));
    root.querySelectorAll('*').forEach((e) => {
      if (e.shadowRoot) all(e.shadowRoot, selector, out);
    });
    return out;
  };
  const inside = (element, selector) =>
    all(element, selector, element.shadowRoot ? all(element.shadowRoot, selector) : []);
  const visible = (element) => element.getBoundingClientRect().width > 0;
  const panes = all(document, 'tf-category-paginated-view')
    .filter((pane) => visible(pane) && inside(pane, 'vz-line-chart2').some(visible))
    .slice(0, __PANES__);
  const charts = panes.flatMap((pane) => inside(pane, 'vz-line-chart2').filter(visible));
  const drawn = charts.filter((chart) => inside(chart, 'path.line')
    .some((path) => (path.getAttribute('d') || '').length > 20)).length;
  const bottom = Math.max(0, ...panes.map((pane) => pane.getBoundingClientRect().bottom));
  return {charts: charts.length, drawn, bottom: Math.ceil(bottom + scrollY),
          width: document.documentElement.scrollWidth,
          height: document.documentElement.scrollHeight};
})()
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--logdir",
        type=Path,
        help="a TensorBoard run directory; without it, `lightning-curvature demo` makes one",
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
    candidates = (explicit,) if explicit else CHROMIUM_NAMES
    for name in candidates:
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit(
        f"error: {explicit or 'chromium'} not found; install it with `apt-get install chromium`"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_demo(directory: Path) -> Path:
    """Run ``lightning-curvature demo --out DIRECTORY``; TensorBoard finds the run below it."""
    command = shutil.which("lightning-curvature")
    prefix = [command] if command else [sys.executable, "-m", "lightning_curvature.cli"]
    print(f"running {' '.join([*prefix, 'demo', '--out', str(directory)])}", file=sys.stderr)
    status = subprocess.run([*prefix, "demo", "--out", str(directory)]).returncode
    if status != 0:
        raise SystemExit(f"error: `lightning-curvature demo` failed (exit status {status})")
    if not any(directory.rglob("events.out.tfevents.*")):
        raise SystemExit(f"error: the demo wrote no TensorBoard event file under {directory}")
    return directory


def stop(process: subprocess.Popen | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for_tensorboard(
    process: subprocess.Popen, base_url: str, plugin: str, log: Path, timeout: float
) -> None:
    """Until TensorBoard answers and has read data for ``plugin`` (it loads runs lazily)."""
    deadline = time.monotonic() + timeout
    listing: dict = {}
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(
                f"error: TensorBoard exited with status {process.returncode}:\n"
                + log.read_text(errors="replace")[-2000:]
            )
        try:
            with urllib.request.urlopen(f"{base_url}/data/plugins_listing", timeout=5) as reply:
                listing = json.load(reply)
            if listing.get(plugin, {}).get("enabled"):
                return
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.5)
    if listing:
        raise SystemExit(
            f"error: TensorBoard found no {plugin} data in the log directory within {timeout:.0f}s"
        )
    raise SystemExit(f"error: TensorBoard did not answer on {base_url} within {timeout:.0f}s")


class DevTools:
    """The Chrome DevTools protocol over ``--remote-debugging-pipe`` (fds 3 and 4)."""

    def __init__(self, chromium: str, args: list[str], log) -> None:
        # The browser reads commands from fd 3 and writes replies to fd 4; the shell maps our
        # stdin/stdout pipes onto them.
        self.process = subprocess.Popen(
            ["sh", "-c", 'exec "$@" 3<&0 4>&1 </dev/null >/dev/null', "sh", chromium, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        self.buffer = b""
        self.next_id = 0

    def send(
        self,
        method: str,
        params: dict | None = None,
        session: str | None = None,
        timeout: float = 60.0,
    ) -> dict:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.process.stdin.write(json.dumps(message).encode() + b"\0")
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})

    def _read(self, deadline: float, method: str) -> dict:
        fd = self.process.stdout.fileno()
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"Chromium did not answer {method} in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium exited (status {self.process.poll()})")
                self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.send("Browser.close", timeout=10)
            except (RuntimeError, OSError, ValueError):
                pass
        stop(self.process)


def evaluate(tools: DevTools, session: str, expression: str) -> object:
    result = tools.send(
        "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
    )
    if "exceptionDetails" in result:
        raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
    return result["result"].get("value")


def resize(tools: DevTools, session: str, width: int, height: int, scale: float) -> None:
    metrics = {"width": width, "height": height, "deviceScaleFactor": scale, "mobile": False}
    tools.send("Emulation.setDeviceMetricsOverride", metrics, session)


def capture(
    chromium: str, url: str, panes: int | None, out: Path, args: argparse.Namespace, log
) -> dict:
    with tempfile.TemporaryDirectory(prefix="screenshot-chromium-") as profile:
        flags = [
            *CHROMIUM_FLAGS,
            "--remote-debugging-pipe",
            f"--user-data-dir={profile}",
            f"--window-size={args.width},{args.height}",
            "about:blank",
        ]
        tools = DevTools(chromium, flags, log)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
                "sessionId"
            ]
            tools.send("Page.enable", {}, session)  # or new-document scripts do not run
            resize(tools, session, args.width, args.height, args.scale)
            # Show every point: TensorBoard keeps this checkbox in localStorage, default on.
            tools.send(
                "Page.addScriptToEvaluateOnNewDocument",
                {
                    "source": "try { localStorage.setItem('_ignoreYOutliers', 'false'); } "
                    "catch (e) {}"
                },
                session,
            )
            tools.send("Page.navigate", {"url": url}, session)
            script = CHARTS_JS.replace("__PANES__", "undefined" if panes is None else str(panes))
            charts = wait_for_charts(tools, session, script, args.timeout)
            height = args.height
            for _ in range(3):  # TensorBoard scrolls inside the page: grow the window to fit
                if charts["bottom"] + 16 <= height:
                    break
                height = charts["bottom"] + 16
                resize(tools, session, args.width, height, args.scale)
                charts = wait_for_charts(tools, session, script, args.timeout)
            clip = screenshot_clip(charts, args)
            shot = tools.send(
                "Page.captureScreenshot",
                {"format": "png", "clip": clip, "captureBeyondViewport": True},
                session,
                timeout=args.timeout,
            )
        finally:
            tools.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base64.b64decode(shot["data"]))
    return charts


def wait_for_charts(tools: DevTools, session: str, script: str, timeout: float) -> dict:
    """Until every chart on the page has drawn a curve and the page has stopped changing."""
    deadline = time.monotonic() + timeout
    previous, stable, charts = None, 0, {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        charts = evaluate(tools, session, script) or {}
        ready = charts.get("charts", 0) > 0 and charts["drawn"] == charts["charts"]
        stable = stable + 1 if ready and charts == previous else 0
        previous = charts
        if stable >= 3:  # 1.5 s without change: the curves and axes are final
            time.sleep(0.5)
            return charts
    raise SystemExit(
        f"error: the charts did not render within {timeout:.0f}s "
        f"({charts.get('drawn', 0)} of {charts.get('charts', 0)} drawn)"
    )


def screenshot_clip(charts: dict, args: argparse.Namespace) -> dict:
    """The page's full width (header and settings included), down to the last chart pane."""
    height = charts["height"]
    if not args.full_page:
        height = min(height, charts["bottom"] + 16)
    return {"x": 0, "y": 0, "width": charts["width"], "height": height, "scale": 1}


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
        scratch = Path(scratch)
        logdir = args.logdir or run_demo(scratch / "demo")
        if not logdir.exists():
            raise SystemExit(f"error: no such log directory: {logdir}")
        port = free_port()
        base_url = f"http://127.0.0.1:{port}"
        tensorboard_log = scratch / "tensorboard.log"
        chromium_log = scratch / "chromium.log"
        tensorboard = None
        with open(tensorboard_log, "wb") as tb_out, open(chromium_log, "wb") as chrome_out:
            try:
                tensorboard = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "tensorboard.main",
                        "--logdir",
                        str(logdir),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(port),
                    ],
                    stdout=tb_out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
                wait_for_tensorboard(tensorboard, base_url, plugin, tensorboard_log, args.timeout)
                fragment = urllib.parse.urlencode(hash_params, quote_via=urllib.parse.quote)
                url = f"{base_url}/#{args.tab}&{fragment}"
                try:
                    charts = capture(chromium, url, panes, args.out, args, chrome_out)
                except RuntimeError as error:
                    chrome_out.flush()
                    tail = chromium_log.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"error: {error}\n{tail}") from error
            finally:
                stop(tensorboard)
    size = args.out.stat().st_size
    print(
        f"wrote {args.out} ({size / 1024:.0f} KiB, {charts['drawn']} charts) "
        f"from {logdir} ({args.tab})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
