"""End-to-end check of chapter 03's block-table widget in a real browser.

Serves JupyterLab on loopback (a free port picked now, a random token), opens a copy of chapter 03 in headless
Chromium, runs all cells, waits for them, checks that the widget rendered (a slider and the SVG picture of the
cache), scrolls to it and saves a screenshot::

    python tests/browser/check_widget.py                      # writes figures/browser_ch03_widget.png
    python tests/browser/check_widget.py --out shot.png

Needs Debian's ``chromium`` (``apt-get install chromium``), JupyterLab and ipywidgets in this Python, and
``websocket-client`` (Chromium is driven over its DevTools protocol).  The notebook is copied to a temporary
folder first (with the figures it shows), so JupyterLab's autosave never touches the repository's notebook.
Exits 0 when the widget was seen, 1 otherwise.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOK = "chapters/03_paged_kv.ipynb"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--mute-audio", "--hide-scrollbars"]
WIDTH, HEIGHT = 1280, 1000


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except Exception:  # not up yet
            value = None
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class DevTools:
    """The smallest client of Chromium's DevTools protocol: send a command, wait for its answer.  With
    ``keep_events``, the events that arrive meanwhile (failed loads, console messages, ...) are kept in
    ``self.events``; otherwise they are dropped."""

    def __init__(self, ws_url: str, keep_events: bool = False):
        import websocket  # websocket-client

        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.ids = itertools.count(1)
        self.events: list[dict] | None = [] if keep_events else None

    def call(self, method: str, **params):
        msg_id = next(self.ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if self.events is not None and "method" in msg:
                self.events.append(msg)
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def js(self, expression: str):
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(res["exceptionDetails"].get("text", "JavaScript error"))
        return res["result"].get("value")

    def close(self):
        self.ws.close()


STATE_JS = """(() => { try {
  const app = window.jupyterapp; if (!app) return null;
  const w = Array.from(app.shell.widgets('main')).find(x => x.content && x.sessionContext);
  if (!w || !w.content.widgets.length) return null;
  const cells = w.content.widgets.filter(c => c.model.type === 'code');
  const errors = cells.filter(c => c.model.outputs.toJSON().some(o => o.output_type === 'error'));
  const kernel = w.sessionContext.session && w.sessionContext.session.kernel;
  return {cells: cells.length, done: cells.filter(c => c.model.executionCount !== null).length,
          status: kernel ? kernel.status : 'none', errors: errors.length,
          error_text: errors.length ? JSON.stringify(errors[0].model.outputs.toJSON()).slice(0, 2000) : ''};
} catch (e) { return {js_error: String(e)}; } })()"""

WIDGET_JS = """(() => {
  const w = Array.from(window.jupyterapp.shell.widgets('main')).find(x => x.content && x.sessionContext);
  const cell = w.content.widgets.find(c => c.model.sharedModel.getSource().includes('BlockTableViewer(snaps'));
  if (!cell) return {found: false};
  const out = cell.node.querySelector('.jp-OutputArea');
  const slider = out && out.querySelector('.widget-slider, .jupyter-widgets .slider-container, input[type=range]');
  const svg = out && out.querySelector('.nanovllm-blocks svg');
  const blocks = out ? out.querySelectorAll('.nanovllm-blocks rect.block').length : 0;
  cell.node.scrollIntoView({block: 'start'});
  const caption = out && out.querySelector('.nanovllm-blocks div');
  return {found: true, slider: !!slider, svg: !!svg, blocks: blocks, caption: caption ? caption.textContent : ''};
})()"""


def debug(cdp: DevTools, out: Path) -> None:
    """What the page looks like when something did not happen: its title, state and a screenshot."""
    try:
        print("page:", cdp.js("document.title"), "| app exposed:", cdp.js("!!window.jupyterapp"),
              "| state:", cdp.js(STATE_JS), file=sys.stderr)
        path = out.with_name(out.stem + "-debug.png")
        path.write_bytes(base64.b64decode(cdp.call("Page.captureScreenshot", format="png")["data"]))
        print(f"debug screenshot: {path}", file=sys.stderr)
    except Exception as e:  # the page may be gone
        print(f"no debug information: {e}", file=sys.stderr)


def run(out: Path, timeout: float) -> int:
    chromium = find_chromium()
    if chromium is None:
        print("chromium not found (apt-get install chromium)", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="nanovllm-browser-"))
    procs: list[subprocess.Popen] = []
    try:
        # a copy of the chapter and the figures it shows; JupyterLab's settings and state kept in tmp too
        (tmp / "chapters").mkdir()
        shutil.copy(ROOT / NOTEBOOK, tmp / NOTEBOOK)
        shutil.copytree(ROOT / "figures", tmp / "figures", ignore=shutil.ignore_patterns("*.py", "data"))
        # no "would you like news?" toast over the screenshot
        settings = tmp / "settings" / "@jupyterlab" / "apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(tmp / "cfg"), JUPYTER_RUNTIME_DIR=str(tmp / "rt"),
                   JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"), JUPYTERLAB_WORKSPACES_DIR=str(tmp / "ws"),
                   IPYTHONDIR=str(tmp / "ipython"))
        port, token = free_port(), secrets.token_hex(16)
        lab_log = open(tmp / "lab.log", "w")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
             f"--ServerApp.root_dir={tmp}", "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.extension_manager=readonly", *(["--allow-root"] if os.geteuid() == 0 else [])],
            cwd=tmp, env=env, stdout=lab_log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{port}"
        try:
            wait_for("JupyterLab", lambda: urllib.request.urlopen(f"{base}/api/status?token={token}",
                                                                  timeout=5).status == 200, 120)
        except TimeoutError:
            print((tmp / "lab.log").read_text()[-3000:], file=sys.stderr)
            raise
        print(f"JupyterLab up on 127.0.0.1:{port}")

        profile = tmp / "chromium-profile"
        procs.append(subprocess.Popen(
            [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
             "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=open(tmp / "chromium.log", "w")))
        devtools_port = wait_for("Chromium's DevTools port",
                                 lambda: (profile / "DevToolsActivePort").read_text().split()[0], 60)
        targets = wait_for("a page target", lambda: [t for t in json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{devtools_port}/json/list", timeout=5)) if t["type"] == "page"], 30)
        cdp = DevTools(targets[0]["webSocketDebuggerUrl"])
        cdp.call("Page.enable")
        cdp.call("Runtime.enable")
        cdp.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
        cdp.call("Page.navigate", url=f"{base}/lab/tree/{NOTEBOOK}?token={token}")
        try:
            state = wait_for("the notebook and its kernel",
                             lambda: (s := cdp.js(STATE_JS)) and s["status"] == "idle" and s, 90)
        except TimeoutError:
            debug(cdp, out)
            raise
        print(f"notebook open: {state['cells']} code cells; running all")
        t0 = time.monotonic()
        cdp.js("""(() => { const app = window.jupyterapp;
          const w = Array.from(app.shell.widgets('main')).find(x => x.content && x.sessionContext);
          app.shell.activateById(w.id);
          app.commands.execute('notebook:run-all-cells'); return true; })()""")
        time.sleep(2)

        def finished():
            s = cdp.js(STATE_JS)
            if s and s["errors"]:
                raise SystemExit(f"a cell failed: {s['error_text']}")
            return s if s and s["done"] == s["cells"] and s["status"] == "idle" else None

        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline and state is None:
            try:
                state = finished()
            except SystemExit:
                raise
            except Exception:
                state = None
            if state is None:
                time.sleep(2)
        if state is None:
            print(f"timed out after {timeout:.0f} s: {cdp.js(STATE_JS)}", file=sys.stderr)
            return 1
        print(f"all {state['cells']} cells ran in {time.monotonic() - t0:.0f} s")
        widget = wait_for("the widget", lambda: (w := cdp.js(WIDGET_JS)) and w.get("slider") and w.get("svg") and w,
                          60)
        print(f"widget: slider {widget['slider']}, svg with {widget['blocks']} blocks; caption: {widget['caption']}")
        time.sleep(1.5)  # let the scroll settle and the widget paint
        cdp.js(WIDGET_JS)
        time.sleep(0.5)
        shot = cdp.call("Page.captureScreenshot", format="png")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(base64.b64decode(shot["data"]))
        print(f"screenshot: {out}")
        try:
            cdp.call("Browser.close")
        except Exception:
            pass
        cdp.close()
        return 0
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "figures" / "browser_ch03_widget.png")
    ap.add_argument("--timeout", type=float, default=900, help="seconds to wait for all cells")
    args = ap.parse_args()
    return run(args.out.resolve(), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
