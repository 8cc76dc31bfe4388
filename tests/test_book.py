"""The book as a website (chapters/_book/build.py): built from the committed notebooks, complete, and readable
offline, checked in the HTML and in headless Chromium.

Run as a script to build the book into build/book/ and save a screenshot of chapter 03's page, at the block-table
widget's static snapshot, to figures/book_ch03.png::

    python tests/test_book.py
"""

from __future__ import annotations

import base64
import html.parser
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "browser"))
BUILD = ROOT / "chapters" / "_book" / "build.py"
NOTEBOOKS = sorted((ROOT / "chapters").glob("[0-9]*.ipynb"))
OFF_MACHINE = re.compile(r"^\s*(https?:)?//", re.I)


def build_book(out: Path) -> str:
    """Build into ``out`` with the book's own command; Sphinx's warnings (empty when there were none)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_nb")
    warnings = out.parent / "warnings.txt"
    run = subprocess.run([sys.executable, str(BUILD), "--out", str(out), "--warnings", str(warnings)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return warnings.read_text()


class Page(html.parser.HTMLParser):
    """What a page asks the browser to load (scripts, styles, images, frames), its images and its title."""

    def __init__(self, text: str):
        super().__init__()
        self.assets, self.images, self.h1 = [], [], []
        self._in_h1 = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("img", "script", "iframe", "source", "embed", "video", "audio") and a.get("src"):
            self.assets.append(a["src"])
        if tag == "link" and a.get("href") and {"stylesheet", "preload", "icon", "modulepreload"} & set(
                (a.get("rel") or "").split()):
            self.assets.append(a["href"])
        self._in_h1 = self._in_h1 or tag == "h1"

    def handle_endtag(self, tag):
        self._in_h1 = self._in_h1 and tag != "h1"

    def handle_data(self, data):
        if self._in_h1:
            self.h1.append(data)


@pytest.fixture(scope="module")
def book(tmp_path_factory):
    out = tmp_path_factory.mktemp("book") / "html"
    t0 = time.monotonic()
    warnings = build_book(out)
    print(f"book built in {time.monotonic() - t0:.1f} s")
    return out, warnings


def test_builds_without_warnings(book):
    _, warnings = book
    assert warnings.strip() == "", warnings


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_chapter_has_its_page(book, nb):
    out, _ = book
    page_path = out / "chapters" / f"{nb.stem}.html"
    assert page_path.exists()
    cells = json.loads(nb.read_text())["cells"]
    title = "".join(cells[0]["source"]).splitlines()[0].lstrip("# ").strip()
    text = page_path.read_text()
    page = Page(text)
    assert title in "".join(page.h1), (title, page.h1)
    code = [c for c in cells if c["cell_type"] == "code"]
    assert text.count('class="cell_input') == len(code), "a code cell is missing"
    assert f'href="chapters/{nb.stem}.html"' in (out / "index.html").read_text(), "not on the front page"
    for src in page.images:  # every image is a file of the site (figures and the notebooks' plots alike)
        if not src.startswith("data:"):
            assert (page_path.parent / src.split("?")[0]).resolve().is_file(), f"broken image {src}"
    wanted = re.findall(r"\]\(\.\./figures/([^)]+\.png)\)", "".join("".join(c["source"]) for c in cells))
    shown = {Path(s).name.split(".")[0] for s in page.images}
    assert {Path(w).stem for w in wanted} <= shown, f"figures missing: {wanted}, images: {page.images}"
    assert "VBox(children=" not in text, "a widget shown as its text repr, with no static snapshot"


def test_math_is_mathml(book):
    out, _ = book
    text = (out / "chapters" / "01_naive_attention.html").read_text()
    assert text.count("<math") >= 10 and not re.search(r"<script[^>]*mathjax", text, re.I)


def test_widget_snapshot_in_chapter_03(book):
    out, _ = book
    text = (out / "chapters" / "03_paged_kv.html").read_text()
    viewer = text.index("BlockTableViewer</span><span class=\"p\">(</span><span class=\"n\">snaps")
    after = text[viewer:text.index('class="cell_input', viewer)]  # the viewer cell's output
    assert 'class="nanovllm-blocks"' in after and after.count('class="block') > 5


def test_nothing_needed_comes_from_another_host(book):
    out, _ = book
    for path in [*out.glob("*.html"), *(out / "chapters").glob("*.html")]:
        page = Page(path.read_text())
        assert not [a for a in page.assets if OFF_MACHINE.match(a)], path
        for href in page.assets:
            if not href.startswith(("data:", "#")):
                assert (path.parent / href.split("?")[0].split("#")[0]).resolve().exists(), (path, href)
    for path in (out / "_static").rglob("*.css"):
        urls = re.findall(r"url\(\s*['\"]?([^'\")]+)", path.read_text(errors="replace"))
        assert not [u for u in urls if OFF_MACHINE.match(u)], path


# -- in a real browser ------------------------------------------------------------------------------------
PAGE_JS = """(() => {
  const imgs = Array.from(document.images);
  const blocks = document.querySelectorAll('.nanovllm-blocks svg rect.block').length;
  const maths = Array.from(document.querySelectorAll('math'));
  return {title: document.title, h1: (document.querySelector('h1') || {}).textContent || '',
          images: imgs.length, broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src),
          blocks: blocks, code: document.querySelectorAll('div.cell_input pre').length,
          nav: document.querySelectorAll('.bd-sidebar-primary li.toctree-l1 > a').length,
          math: maths.length, math_drawn: maths.filter(m => m.getBoundingClientRect().width > 0).length,
          ready: document.readyState};
})()"""


class Recorder:
    """Chromium over its DevTools protocol (check_widget.py's client), keeping the events it sends:
    every request the page makes, failed loads and console errors."""

    def __init__(self, ws_url: str):
        from check_widget import DevTools

        self.cdp = DevTools(ws_url, keep_events=True)
        self.events = self.cdp.events
        for domain in ("Page", "Runtime", "Network", "Log"):
            self.cdp.call(f"{domain}.enable")

    def open(self, url: str) -> dict:
        from check_widget import wait_for

        self.events.clear()
        self.cdp.call("Page.navigate", url=url)
        state = wait_for(url, lambda: (s := self.cdp.js(PAGE_JS)) and s["ready"] == "complete" and s, 30)
        time.sleep(0.5)  # late loads (fonts, deferred scripts)
        return state

    def problems(self) -> list[str]:
        found = []
        for e in self.events:
            m, p = e["method"], e.get("params", {})
            if m == "Network.requestWillBeSent" and not p["request"]["url"].startswith(("file:", "data:")):
                found.append(f"request to {p['request']['url']}")
            elif m == "Network.loadingFailed" and not p.get("canceled"):
                found.append(f"failed load: {p.get('errorText')}")
            elif m == "Log.entryAdded" and p["entry"]["level"] == "error":
                found.append(f"console: {p['entry'].get('text')} {p['entry'].get('url', '')}")
            elif m == "Runtime.exceptionThrown":
                found.append(f"exception: {p['exceptionDetails'].get('text')}")
        return found


def chromium_session(profile: Path):
    """Start headless Chromium (Debian's); its process and a Recorder attached to its page."""
    from check_widget import CHROMIUM_FLAGS, HEIGHT, WIDTH, find_chromium, wait_for

    proc = subprocess.Popen(
        [find_chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
         "--remote-debugging-port=0", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = wait_for("Chromium's DevTools port", lambda: (profile / "DevToolsActivePort").read_text().split()[0], 60)
        targets = wait_for("a page target", lambda: [t for t in json.load(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=5)) if t["type"] == "page"], 30)
        rec = Recorder(targets[0]["webSocketDebuggerUrl"])
        rec.cdp.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1,
                     mobile=False)
    except BaseException:
        proc.kill()
        raise
    return proc, rec


def check_in_browser(out: Path, screenshot: Path | None = None) -> dict:
    """Open the index and chapters 01 and 03 in headless Chromium; what each page showed.  Raises
    AssertionError when a page is missing its parts or asked for something it could not load."""
    tmp = Path(tempfile.mkdtemp(prefix="nanovllm-book-chromium-"))
    proc, rec = chromium_session(tmp)
    try:
        seen = {}
        for name in ("index", "chapters/01_naive_attention", "chapters/03_paged_kv"):
            state = rec.open((out / f"{name}.html").as_uri())
            seen[name] = state
            assert not state["broken"], (name, state["broken"])
            assert not rec.problems(), (name, rec.problems())
            assert "nanovllm" in state["title"], state
            assert state["nav"] >= len(NOTEBOOKS), f"{name}: the chapters are not all in the navigation: {state}"
        assert seen["chapters/01_naive_attention"]["math"] >= 10
        assert seen["chapters/01_naive_attention"]["math_drawn"] == seen["chapters/01_naive_attention"]["math"]
        ch03 = seen["chapters/03_paged_kv"]
        assert ch03["h1"].startswith("3 · The paged KV cache"), ch03
        assert ch03["images"] >= 2 and ch03["code"] > 10 and ch03["blocks"] > 10, ch03
        if screenshot is not None:
            rec.cdp.js("""(() => { const b = document.querySelectorAll('.nanovllm-blocks');
              b[0].closest('.cell').scrollIntoView({block: 'start'}); return true; })()""")
            time.sleep(0.5)
            shot = rec.cdp.call("Page.captureScreenshot", format="png")
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        rec.cdp.close()
        return seen
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)


def browser_missing() -> str:
    import importlib.util

    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        return "needs Chromium (apt-get install chromium; .ci/setup installs it where apt works)"
    if importlib.util.find_spec("websocket") is None:
        return "needs websocket-client"
    return ""


@pytest.mark.skipif(bool(browser_missing()), reason=browser_missing() or "ok")
def test_pages_render_in_chromium(book):
    out, _ = book
    t0 = time.monotonic()
    seen = check_in_browser(out)
    print(f"browser check in {time.monotonic() - t0:.1f} s: {seen}")


if __name__ == "__main__":
    out = ROOT / "build" / "book"
    t0 = time.monotonic()
    warnings = build_book(out)
    print(f"built {out} in {time.monotonic() - t0:.1f} s" + (f"; warnings:\n{warnings}" if warnings else ""))
    t0 = time.monotonic()
    seen = check_in_browser(out, screenshot=ROOT / "figures" / "book_ch03.png")
    print(f"Chromium: {json.dumps(seen, indent=1)}\nchecked in {time.monotonic() - t0:.1f} s; "
          f"screenshot: figures/book_ch03.png")
