"""Real-browser checks: Debian's headless Chromium driven by Playwright (no browser download, no `playwright install`).

Pages are served over a local HTTP server (as a reviewer's browser or an attachment viewer sees files, with real
request statuses) and checked at a fixed viewport: every image decoded, every link answered, nothing wider than the
window. Screenshots go to :func:`artifact_dir` so a failure can be looked at.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urldefrag, urlparse

import pytest
from playwright.sync_api import Browser, Page, sync_playwright

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS_ENV = "VESSELNB_TEST_ARTIFACTS"
CHROMIUM_NAMES = ("/usr/bin/chromium", "chromium", "chromium-browser")
VIEWPORT = {"width": 1280, "height": 900}
# Flags for a sandbox-less container and no side-channel traffic (updates, sync, first-run pages).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium_path() -> str | None:
    """Debian's chromium binary, or None."""
    for name in CHROMIUM_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def skip_reason() -> str | None:
    """Why the browser tests cannot run here (None when they can): named so the skip says what to install."""
    if chromium_path() is None:
        return "Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)"
    return None


def artifact_dir(name: str) -> Path:
    """Where screenshots of one test go: ``$VESSELNB_TEST_ARTIFACTS/<name>`` or ``test-artifacts/<name>``."""
    root = Path(os.environ.get(ARTIFACTS_ENV) or REPO / "test-artifacts")
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002  (the base class's name)
        pass


@contextlib.contextmanager
def serve_folder(root: Path) -> Iterator[str]:
    """Serve ``root`` on 127.0.0.1 (a free port) for the duration; yields the base URL ending in '/'."""
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@contextlib.contextmanager
def chromium() -> Iterator[Browser]:
    """A headless Chromium (Debian's binary) as a Playwright ``Browser``."""
    path = chromium_path()
    assert path is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=path, headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


# Collected in the page: images that did not decode, links, and the outermost boxes reaching past the window.
_INSPECT_JS = """
() => {
  const vw = window.innerWidth;
  const describe = (el) => {
    let name = el.tagName.toLowerCase();
    if (el.id) name += '#' + el.id;
    const classes = typeof el.className === 'string' ? el.className.trim() : '';
    if (classes) name += '.' + classes.split(/\\s+/).join('.');
    const parents = [];
    for (let p = el.parentElement; p && p !== document.body && parents.length < 3; p = p.parentElement) {
      parents.push(p.tagName.toLowerCase() + (p.id ? '#' + p.id : ''));
    }
    const text = (el.innerText || el.getAttribute('alt') || '').replace(/\\s+/g, ' ').trim().slice(0, 80);
    return {element: name, inside: parents.reverse().join(' > '), text: text};
  };
  const visible = (el) => {
    const style = getComputedStyle(el);
    return style.display !== 'none' && style.visibility !== 'hidden';
  };
  const wide = [];
  for (const el of document.body.querySelectorAll('*')) {
    if (!visible(el)) continue;
    const r = el.getBoundingClientRect();
    if (r.width === 0 || r.height === 0) continue;
    const right = r.right + window.scrollX, left = r.left + window.scrollX;
    if (right > vw + 1 || left < -1 || r.width > vw + 1) {
      const parent = el.parentElement;
      const pr = parent ? parent.getBoundingClientRect() : null;
      const parentWide = pr && parent !== document.body && (pr.right + window.scrollX > vw + 1 || pr.width > vw + 1);
      if (!parentWide) wide.push(Object.assign(describe(el), {width: Math.round(r.width), right: Math.round(right)}));
    }
  }
  const images = [...document.images].map((img) => ({
    src: img.currentSrc.startsWith('data:') ? img.currentSrc.slice(0, 40) : img.currentSrc,
    ok: img.complete && img.naturalWidth > 0, alt: img.alt,
  }));
  const links = [...document.querySelectorAll('a[href]')].map((a) => a.href);
  return {scrollWidth: document.documentElement.scrollWidth, innerWidth: vw, wide: wide, images: images,
          links: links, title: document.title, text: document.body.innerText};
}
"""


@dataclass
class PageCheck:
    """What one page showed in the browser."""

    url: str
    title: str
    scroll_width: int
    inner_width: int
    wide: list[dict] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    n_images: int = 0
    links: list[str] = field(default_factory=list)
    broken_links: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None
    text: str = ""  # what a reader sees as text (innerText: no markup, no embedded image data)

    @property
    def overflows(self) -> bool:
        return self.scroll_width > self.inner_width or bool(self.wide)

    def overflow_text(self) -> str:
        """One line per element reaching past the window, for the failure message and the defect note."""
        lines = [f"{self.url}: document.scrollWidth {self.scroll_width} px > innerWidth {self.inner_width} px"
                 if self.scroll_width > self.inner_width else f"{self.url}: no page scroll, but boxes overflow"]
        lines += [f"  <{w['element']}> in {w['inside'] or 'body'}: {w['width']} px wide, right edge {w['right']} px"
                  f" ({w['text']!r})" for w in self.wide[:12]]
        if len(self.wide) > 12:
            lines.append(f"  ... and {len(self.wide) - 12} more")
        return "\n".join(lines)


def _link_problem(browser_page: Page, base_url: str, href: str) -> str | None:
    """Why a link does not resolve (None when it does): local targets must answer 200, anchors must exist."""
    parsed = urlparse(href)
    if parsed.scheme in ("mailto", "javascript", "data"):
        return f"{href}: {parsed.scheme}: links do not belong in a report"
    if not href.startswith(base_url):
        return f"{href}: points outside the outputs folder (reports must be self-contained)"
    target, fragment = urldefrag(href)
    response = browser_page.request.get(target)
    if response.status != 200:
        return f"{href}: HTTP {response.status}"
    if fragment and target == urldefrag(browser_page.url)[0]:
        if browser_page.evaluate("(id) => !document.getElementById(id) && !document.getElementsByName(id).length",
                                 fragment):
            return f"{href}: no element with id {fragment!r} in the page"
    return None


def check_page(browser: Browser, base_url: str, relative: str, screenshots: Path) -> PageCheck:
    """Open ``relative`` (under the served folder) at :data:`VIEWPORT`, inspect it, screenshot the full page."""
    context = browser.new_context(viewport=VIEWPORT, java_script_enabled=True)
    page = context.new_page()
    failed: list[str] = []
    console: list[str] = []
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))
    page.on("response", lambda r: failed.append(f"{r.url}: HTTP {r.status}") if r.status >= 400 else None)
    # Chromium asks every server for /favicon.ico; a report has none and needs none.
    page.on("console", lambda m: console.append(f"{m.text} ({m.location.get('url')})")
            if m.type == "error" and not m.location.get("url", "").endswith("/favicon.ico") else None)
    url = base_url + relative
    try:
        response = page.goto(url, wait_until="load")
        assert response is not None and response.status == 200, f"{url} did not load: {response and response.status}"
        page.evaluate("document.fonts.ready")
        found = page.evaluate(_INSPECT_JS)
        png = screenshots / (relative.replace("/", "__").removesuffix(".html") + ".png")
        page.screenshot(path=str(png), full_page=True)
        check = PageCheck(url=url, title=found["title"], scroll_width=found["scrollWidth"],
                          inner_width=found["innerWidth"], wide=found["wide"], n_images=len(found["images"]),
                          broken_images=[i["src"] or f"(no src, alt {i['alt']!r})" for i in found["images"]
                                         if not i["ok"]],
                          failed_requests=failed, console_errors=console, screenshot=png,
                          links=list(dict.fromkeys(found["links"])), text=found["text"])
        for href in check.links:
            problem = _link_problem(page, base_url, href)
            if problem:
                check.broken_links.append(problem)
        return check
    finally:
        context.close()


def require_browser() -> None:
    """Skip the calling test, with the reason, when chromium or playwright is missing."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
