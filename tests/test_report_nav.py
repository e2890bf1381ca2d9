"""Report headers, links between reports, the sortable index and pseudonymised patient names, on real run folders.

Stand-in notebooks (real papermill kernels, as in test_runner.py) print patient names the way the real stages do:
in tables (sample ids, a patient column), in printed lines and in a flag message the index shows. Two runs and
their comparison pseudonymise (the default); a third run in its own outputs folder shows names
(``report.pseudonymize: false``). Pages are parsed with BeautifulSoup (html.parser), and the sorting script runs in
Debian's headless Chromium when it is installed.
"""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import nbformat
import pytest
import yaml
from _spine_fixtures import load_json, unresolved_refs, write_params, write_stub_notebooks
from bs4 import BeautifulSoup

from vesselnb import headline, pseudonym
from vesselnb.runner import COMPARE_STAGE, RUN_STAGES, compare_runs, run_params

FRAMES = ("Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034", "Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000035",
          "Li_Wei_0000200001__2-1_frame_000001")
PATIENTS = ("Chen_Fang_0000103366", "Li_Wei_0000200001")
# What 03 and 04 print: a table of sample ids and patients, a line naming a patient, and a flag message (-> index).
_NAMES_CELL = f"""
import json, pathlib
import pandas as pd
from IPython.display import display
from vesselnb.data import parse_sample_name
frames = {list(FRAMES)!r}
display(pd.DataFrame({{"sample_id": frames, "patient": [parse_sample_name(f)[0] for f in frames]}}))
print("worst patient: Chen_Fang_0000103366; also Li Wei (id 0000200001)")
"""
_SUMMARY_CELL = """
from vesselnb.params import load_params
params = load_params(params_path, check_paths=False)
path = pathlib.Path(run_dir) / "analysis" / "summary.json"
summary = json.loads(path.read_text())
summary["headline"]["dice"] = 0.5 + params.iteration / 100  # runs differ, so sorting by Dice means something
summary["flags"].append({"level": "warning", "code": "worst_patient", "message": "Chen_Fang_0000103366 is worst"})
path.write_text(json.dumps(summary))
"""


def _notebooks(folder: Path) -> Path:
    write_stub_notebooks(folder)
    for name, extra in (("03_error_analysis.ipynb", _NAMES_CELL + _SUMMARY_CELL),
                        ("04_compare_checkpoints.ipynb", _NAMES_CELL)):
        notebook = nbformat.read(str(folder / name), as_version=4)
        notebook.cells.append(nbformat.v4.new_code_cell(extra.strip()))
        nbformat.write(notebook, str(folder / name))
    return folder


def _params(path: Path, name: str, iteration: int, **extra: object) -> Path:
    write_params(path, name, iteration=iteration, **extra)
    for frame in FRAMES:
        (path.parent / "images" / f"{frame}.jpg").touch()
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """outputs/ with runs a (iteration 7), b (3) and compare_a_vs_b, pseudonymised; shown/ with one run naming."""
    root = tmp_path_factory.mktemp("nav")
    notebooks = _notebooks(root / "notebooks")
    outputs, shown = root / "outputs", root / "shown"
    for name, iteration in (("a", 7), ("b", 3)):
        result = run_params(_params(root / "params" / f"{name}.yaml", name, iteration), outputs_dir=outputs,
                            notebooks_dir=notebooks, progress=False)
        assert result.ok, result.failure_line()
    result = compare_runs([outputs / "a", outputs / "b"], outputs_dir=outputs, notebooks_dir=notebooks,
                          progress=False)
    assert result.ok, result.failure_line()
    named = _params(root / "params" / "named.yaml", "named", 5, report={"pseudonymize": False})
    result = run_params(named, outputs_dir=shown, notebooks_dir=notebooks, progress=False)
    assert result.ok, result.failure_line()
    return {"outputs": outputs, "shown": shown}


def _soup(page: Path) -> BeautifulSoup:
    return BeautifulSoup(page.read_text(encoding="utf-8"), "html.parser")


def _pages(outputs: Path) -> list[Path]:
    return sorted(outputs.glob("*.html")) + sorted(outputs.glob("*/*.html"))


def _readable(soup: BeautifulSoup) -> str:
    """The text a reader sees plus every attribute a browser shows (titles, alts) or a link carries."""
    for hidden in soup(["style", "script"]):
        hidden.decompose()
    attributes = [str(v) for tag in soup.find_all(True) for k, v in tag.attrs.items()
                  if k in ("title", "alt", "href", "id", "data-sort") and not str(v).startswith("data:")]
    return soup.get_text(" ") + "\n" + "\n".join(attributes)


def _header_value(soup: BeautifulSoup, label: str) -> str:
    header = soup.find("header", class_="vnb-header")
    assert header is not None, "the report has no vesselnb header"
    for row in header.find_all("tr"):
        cells = row.find_all("td")
        if cells and cells[0].get_text(strip=True) == label:
            return cells[1].get_text(" ", strip=True)
    raise AssertionError(f"the header has no {label!r} row")


def _mapping(folder: Path) -> dict[str, str]:
    with (folder / pseudonym.MAPPING_FILE).open(encoding="utf-8") as stream:
        return {row["patient"]: row["pseudonym"] for row in csv.DictReader(stream)}


def test_no_patient_name_in_any_html_when_pseudonymised(site: dict[str, Path]) -> None:
    outputs = site["outputs"]
    names = pseudonym.Pseudonyms(pseudonym.assign(PATIENTS, pseudonym.new_salt()))
    pages = _pages(outputs)
    assert len(pages) == 1 + 2 * len(RUN_STAGES) + 1
    for page in pages:
        html = page.read_text(encoding="utf-8")
        assert names.leaks(_readable(_soup(page))) == [], f"{page} names a patient"
        assert "Chen_Fang" not in html and "0000103366" not in html and "Li_Wei" not in html, page
        if page.name != "index.html":
            assert _header_value(_soup(page), "patient names").startswith("hidden"), page
    for folder in (outputs / "a", outputs / "b", outputs / "compare_a_vs_b"):
        assert set(_mapping(folder)) >= set(PATIENTS)  # the mapping is kept beside the reports, for the user
    # One patient, one pseudonym across the runs and their comparison (b and the comparison are seeded from a).
    a, b, both = (_mapping(outputs / n) for n in ("a", "b", "compare_a_vs_b"))
    assert {p: a[p] for p in PATIENTS} == {p: b[p] for p in PATIENTS} == {p: both[p] for p in PATIENTS}
    report = _readable(_soup(outputs / "a" / "03_error_analysis.html"))
    chen, li = a["Chen_Fang_0000103366"], a["Li_Wei_0000200001"]
    assert f"{chen}__1-4_1_04B2D3CF_frame_000034" in report and f"{chen}__1-4_1_04B2D3CF_frame_000035" in report
    assert f"worst patient: {chen}; also {li} (id {li})" in report
    assert f"{chen} is worst" in _readable(_soup(outputs / "index.html"))  # the flag's message, in a title
    # The executed notebook beside the report is the user's record and keeps the names.
    executed = (outputs / "a" / "03_error_analysis.ipynb").read_text(encoding="utf-8")
    assert "Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034" in executed


def test_names_shown_when_pseudonymize_is_off_and_the_header_says_so(site: dict[str, Path]) -> None:
    run = site["shown"] / "named"
    assert not (run / pseudonym.MAPPING_FILE).exists()
    report = _soup(run / "03_error_analysis.html")
    assert _header_value(report, "patient names").startswith("shown")
    assert "Chen_Fang_0000103366__1-4_1_04B2D3CF_frame_000034" in _readable(report)
    index = _soup(site["shown"] / "index.html")
    row = index.find("tr", id="run-named")
    assert row is not None and row.find_all("td")[-1].get_text(strip=True) == "shown"
    assert "Chen_Fang_0000103366 is worst" in _readable(index)
    pseudonymised = _soup(site["outputs"] / "index.html").find("tr", id="run-a")
    assert pseudonymised.find_all("td")[-1].get_text(strip=True).startswith("hidden")


def _links(page: Path) -> list[str]:
    return [a["href"] for a in _soup(page).find_all("a", href=True)]


def _resolves(page: Path, href: str, root: Path) -> bool:
    """A relative link to a file under ``root`` that exists, whose #fragment (if any) is an id in that file."""
    parsed = urlparse(href)
    if parsed.scheme or parsed.netloc:
        return False
    path, fragment = urldefrag(href)
    target = (page.parent / unquote(path)).resolve() if path else page
    if not target.is_relative_to(root.resolve()) or not target.is_file():
        return False
    return not fragment or _soup(target).find(id=fragment) is not None


def test_every_link_resolves_and_reports_link_their_neighbours(site: dict[str, Path]) -> None:
    outputs = site["outputs"]
    for page in _pages(outputs) + _pages(site["shown"]):
        root = page.parent if page.name == "index.html" else page.parent.parent
        broken = [h for h in _links(page) if not _resolves(page, h, root)]
        assert broken == [], f"{page}: links that do not resolve: {broken}"
        assert unresolved_refs(page, root) == [], page
    convert, infer, analyze = (stage.stem for stage in RUN_STAGES)
    compare = f"../compare_a_vs_b/{COMPARE_STAGE.stem}.html"
    expected = {
        f"a/{convert}.html": {"../index.html#run-a", f"{infer}.html", f"{analyze}.html"},
        f"a/{infer}.html": {"../index.html#run-a", f"{convert}.html", f"{analyze}.html"},
        f"a/{analyze}.html": {"../index.html#run-a", f"{convert}.html", f"{infer}.html", compare},
        f"b/{analyze}.html": {"../index.html#run-b", compare},  # 03 of b was written before the comparison existed
        f"compare_a_vs_b/{COMPARE_STAGE.stem}.html": {"../index.html#cmp-compare_a_vs_b", f"../a/{analyze}.html",
                                                      f"../b/{analyze}.html"},
    }
    for page, links in expected.items():
        assert links <= set(_links(outputs / page)), f"{page} lacks links {links - set(_links(outputs / page))}"
    index_links = set(_links(outputs / "index.html"))
    for run in ("a", "b"):
        assert {f"{run}/{stage.stem}.html" for stage in RUN_STAGES} <= index_links
    runs = _soup(outputs / "index.html").find("table", id="runs")
    for run in ("a", "b"):  # each run's row links the comparisons it is in
        row_links = {a["href"] for a in runs.find("tr", id=f"run-{run}").find_all("a", href=True)}
        assert f"compare_a_vs_b/{COMPARE_STAGE.stem}.html" in row_links


def test_header_all_runs_link_points_at_the_runs_row_of_the_index(site: dict[str, Path]) -> None:
    soup = _soup(site["outputs"] / "a" / "01_convert.html")
    link = soup.find("header", class_="vnb-header").find("a", href="../index.html#run-a")
    assert link is not None and link.get_text(strip=True) == "outputs/index.html"


def test_index_is_one_sortable_row_per_run_with_status_and_metrics(site: dict[str, Path]) -> None:
    soup = _soup(site["outputs"] / "index.html")
    table = soup.find("table", id="runs")
    assert "sortable" in table["class"]
    headers = [th.get_text(strip=True) for th in table.thead.find_all("th")]
    assert headers[:2] == ["run", "status"] and headline.heading("dice") in headers
    rows = table.tbody.find_all("tr", recursive=False)
    assert [r["id"] for r in rows] == ["run-b", "run-a"]  # by iteration
    dice = headers.index(headline.heading("dice"))
    for row in rows:
        cells = row.find_all("td", recursive=False)
        assert len(cells) == len(headers)  # no colspan: every column sorts
        assert cells[1].get_text(strip=True) == "ok"
        manifest = load_json(site["outputs"] / row["id"].removeprefix("run-") / "manifest.json")
        assert float(cells[dice]["data-sort"]) == pytest.approx(manifest["summary"]["headline"]["dice"])
    scripts = soup.find_all("script")
    assert scripts and all(not s.get("src") for s in scripts) and "sortBy" in scripts[0].get_text()


def test_params_default_is_pseudonymised(tmp_path: Path) -> None:
    from vesselnb.params import load_params

    path = write_params(tmp_path / "p.yaml", "p")
    assert load_params(path).report.pseudonymize is True
    data = yaml.safe_load(path.read_text())
    data["report"] = {"pseudonymize": "no"}
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(Exception, match="pseudonymize"):
        load_params(path)


def test_frame_pseudonymises_patient_and_sample_columns_and_index() -> None:
    import pandas as pd

    names = pseudonym.Pseudonyms(pseudonym.assign(PATIENTS, pseudonym.new_salt()))
    table = pd.DataFrame({"sample_id": list(FRAMES), "patient": ["Chen_Fang_0000103366"] * 2 + ["Li_Wei_0000200001"],
                          "dice": [0.1, 0.2, 0.3]}).set_index("patient")
    out = pseudonym.frame(table, names)
    assert list(out.index) == [names.patient(p) for p in table.index]
    assert list(out["sample_id"]) == [names.sample_id(s) for s in FRAMES] and list(out["dice"]) == [0.1, 0.2, 0.3]
    assert names.leaks(out.to_string()) == [] and names.leaks(table.to_string())  # the original still names them
    assert pseudonym.frame(table, None) is table


def test_index_sorts_in_a_real_browser(site: dict[str, Path]) -> None:
    browser_helpers = pytest.importorskip("_browser")
    browser_helpers.require_browser()
    with browser_helpers.serve_folder(site["outputs"]) as base, browser_helpers.chromium() as browser:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base + "index.html")
        order = "() => [...document.querySelectorAll('#runs tbody tr')].map(r => r.id)"
        assert page.evaluate(order) == ["run-b", "run-a"]
        dice = page.locator(f'#runs thead th[title="sort by {headline.heading("dice")}"]')
        dice.click()  # ascending: b (0.53) before a (0.57)
        assert page.evaluate(order) == ["run-b", "run-a"] and dice.get_attribute("aria-sort") == "ascending"
        dice.click()
        assert page.evaluate(order) == ["run-a", "run-b"] and dice.get_attribute("aria-sort") == "descending"
        run = page.locator('#runs thead th[title="sort by run"]')
        run.click()
        assert page.evaluate(order) == ["run-a", "run-b"]
        run.press("Enter")
        assert page.evaluate(order) == ["run-b", "run-a"]
        assert errors == []


def test_every_header_link_looks_like_a_link_in_a_real_browser(site: dict[str, Path]) -> None:
    """Computed styles, not the stylesheet's text: each header link of 01-04 is coloured unlike the header's text
    and underlined, in the same colour on every report (a link that looks like plain text is never clicked)."""
    browser_helpers = pytest.importorskip("_browser")
    browser_helpers.require_browser()
    pages = [f"a/{stage.stem}.html" for stage in RUN_STAGES] + [f"compare_a_vs_b/{COMPARE_STAGE.stem}.html"]
    styles = """() => [...document.querySelectorAll('header.vnb-header a')].map(a => {
        const s = getComputedStyle(a); return {text: a.textContent, colour: s.color, line: s.textDecorationLine}; })"""
    text_colour = "() => getComputedStyle(document.querySelector('header.vnb-header td')).color"
    colours = set()
    with browser_helpers.serve_folder(site["outputs"]) as base, browser_helpers.chromium() as browser:
        page = browser.new_page(viewport=browser_helpers.VIEWPORT)
        for name in pages:
            page.goto(base + name)
            links = page.evaluate(styles)
            assert len(links) >= 2, f"{name}: the header links the index and the neighbouring reports"
            plain = page.evaluate(text_colour)
            for link in links:
                assert link["colour"] != plain and "underline" in link["line"], f"{name}: {link}"
                colours.add(link["colour"])
    assert len(colours) == 1, colours
