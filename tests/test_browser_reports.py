"""The demo's reports in a real browser: headless Debian Chromium (Playwright) at 1280 px, as a reviewer opens them.

Starting at outputs/index.html, every page reachable by links is opened over a local HTTP server: each image must
decode, each link answer, no request fail and no script error; and nothing may reach past the right edge of a
1280 px window (document.scrollWidth <= innerWidth, and no element wider than the viewport, also inside a scrolling
box: there the content is hidden until the reader scrolls that box). Full-page screenshots of every page are kept in
``$VESSELNB_TEST_ARTIFACTS/browser`` (default test-artifacts/browser/), printed with every failure.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urldefrag

import numpy as np
import pytest
from _browser import PageCheck, artifact_dir, check_page, chromium, require_browser, serve_folder
from PIL import Image

from vesselnb.runner import COMPARE_STAGE, RUN_STAGES

RUNS = ("demo", "demo_long")
COMPARISON = f"compare_demo_vs_demo_long/{COMPARE_STAGE.stem}.html"
PAGES = ["index.html", *(f"{run}/{stage.stem}.html" for run in RUNS for stage in RUN_STAGES), COMPARISON]

# Known defects, tracked in issue 16; strict: the test fails as soon as a fix lands, so the mark gets removed.
KNOWN_OVERFLOW = {
    COMPARISON: "issue 16: 04's Runs table (table.dataframe with absolute paths, ~1600 px) is wider than a 1280 px "
                "window; it scrolls inside its box, its right part hidden",
}


@pytest.fixture(scope="module")
def browsed(demo_outputs: Path) -> dict[str, PageCheck]:
    """Every page reachable from the index, checked once (several tests read the result)."""
    require_browser()
    shots = artifact_dir("browser")
    print(f"browser screenshots: {shots}")
    checks: dict[str, PageCheck] = {}
    with serve_folder(demo_outputs) as base, chromium() as browser:
        queue = ["index.html"]
        while queue:
            relative = queue.pop(0)
            if relative in checks:
                continue
            checks[relative] = check = check_page(browser, base, relative, shots)
            for href in check.links:
                target = urldefrag(href)[0]
                if target.startswith(base) and target.endswith(".html"):
                    queue.append(target.removeprefix(base))
    return checks


def _where(check: PageCheck) -> str:
    return f"(screenshot: {check.screenshot})"


@pytest.mark.slow
def test_index_reaches_every_report(browsed: dict[str, PageCheck], demo_outputs: Path) -> None:
    on_disk = {str(p.relative_to(demo_outputs)) for p in demo_outputs.rglob("*.html")
               if not p.relative_to(demo_outputs).parts[0].startswith("_")}
    assert set(PAGES) <= on_disk, f"the demo wrote no {sorted(set(PAGES) - on_disk)}"
    assert on_disk - set(browsed) == set(), "reports no link leads to (from the index on)"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES)
def test_page_resources_resolve(browsed: dict[str, PageCheck], page: str) -> None:
    check = browsed[page]
    assert check.broken_images == [], f"{page}: images that did not load {_where(check)}"
    assert check.broken_links == [], f"{page}: links that do not resolve {_where(check)}"
    assert check.failed_requests == [], f"{page}: failed requests {_where(check)}"
    assert check.console_errors == [], f"{page}: script errors {_where(check)}"
    assert check.title.strip(), f"{page} has no <title>"
    pixels = np.asarray(Image.open(check.screenshot).convert("L"), dtype=np.float32)
    assert pixels.std() > 5.0, f"{page}: the screenshot is (nearly) one colour: the page did not render"
    if page.endswith(("03_error_analysis.html", f"{COMPARE_STAGE.stem}.html")):
        assert check.n_images > 0, f"{page}: a report of figures shows no image"


@pytest.mark.slow
@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=KNOWN_OVERFLOW[p]))
                                  if p in KNOWN_OVERFLOW else p for p in PAGES])
def test_page_fits_1280px(browsed: dict[str, PageCheck], page: str) -> None:
    check = browsed[page]
    assert check.inner_width == 1280
    assert not check.overflows, f"{check.overflow_text()}\n{_where(check)}"
