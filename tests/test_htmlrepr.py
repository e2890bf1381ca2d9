"""The HTML vocabulary every result object displays with: one colour set, escaped text, embedded figures."""

from __future__ import annotations

import base64
import io
import re
from html.parser import HTMLParser

import pandas as pd
import pytest
from matplotlib.figure import Figure
from PIL import Image

from vesselnb import htmlrepr as hr
from vesselnb.convert.coverage import ConversionReport
from vesselnb.convert.diff import WeightDiff


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.seen: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.seen.append(tag)
        if tag not in ("img", "br"):
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1] if self.open else None}>"
        self.open.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> _Tags:
    tags = _Tags()
    tags.feed(page)
    tags.close()
    assert not tags.open, f"unclosed {tags.open}"
    return tags


def test_banner_levels_use_the_one_colour_set_and_escape_text() -> None:
    page = hr.banner("<b>bad</b> & co", level="error", lines=["x < y"], items=["w1", "w2"])
    assert hr.COLOURS["error"][0] in page and hr.COLOURS["error"][1] in page
    tags = parse(page)
    assert "<b>bad</b> & co" in "".join(tags.text) and tags.seen.count("li") == 2 and "b" not in tags.seen
    assert hr.COLOURS["ok"][0] in hr.banner("fine", level="ok")
    strong = hr.banner("ALERT", level="error", strong=True)
    assert f"background:{hr.COLOURS['error'][0]}" in strong
    with pytest.raises(ValueError, match="unknown banner level 'red'"):
        hr.banner("x", level="red")


def test_tables_from_frames_mappings_and_rows() -> None:
    frame = pd.DataFrame({"metric": ["dice", "hd95"], "value": [0.812345, float("nan")]})
    page = hr.table(frame, caption="Headline", float_format="{:.3f}")
    tags = parse(page)
    assert "0.812" in page and "NaN" in page and "Headline" in "".join(tags.text) and "table" in tags.seen
    rows = parse(hr.table({"store": "/a/<b>", "n": 3, "x": 0.5}))
    assert rows.seen.count("tr") == 3 and "/a/<b>" in "".join(rows.text)
    assert parse(hr.table([("k", "v")], max_rows=0)).seen.count("tr") == 0


def test_figure_is_an_embedded_png() -> None:
    fig = Figure(figsize=(2, 1))
    fig.subplots().plot([0, 1], [1, 0])
    page = hr.figure(fig, caption="a line")
    encoded = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    with Image.open(io.BytesIO(base64.b64decode(encoded))) as image:
        assert image.format == "PNG" and image.width > 50
    assert "a line" in page
    assert hr.figure(base64.b64decode(encoded)).count("base64,") == 1
    with pytest.raises(TypeError, match="matplotlib Figure or PNG bytes"):
        hr.figure("figure.png")


def test_notes_are_empty_without_items() -> None:
    assert hr.notes([]) == ""
    assert parse(hr.notes(["a", "b"], title="Notes")).seen.count("li") == 2


def test_conversion_report_shows_its_banner_once_without_the_tables() -> None:
    """Notebook 01 displays the report and then each table under its heading: the report must not repeat them."""
    report = ConversionReport(output_dir="/o", fingerprint="f" * 16, dtype="bf16", source={"path": "/c"},
                              coverage={"merged_lora": 4, "dropped": 0}, warnings=["IDENTICAL WEIGHTS: run 'a'"],
                              components={"llm": {"n_tensors": 2, "rel_change": 0.1, "sources": {"lora": 2}}})
    page = report._repr_html_()
    tags = parse(page)
    assert "table" not in tags.seen and page.count("vesselnb-banner") == 1
    assert hr.COLOURS["error"][0] in page and "IDENTICAL WEIGHTS" in page and "merged_lora 4" in page
    assert hr.COLOURS["ok"][0] in ConversionReport(output_dir="/o", fingerprint="f", dtype="bf16",
                                                   source={})._repr_html_()


def test_weight_diff_uses_the_vocabulary() -> None:
    tensors = pd.DataFrame({"hf_key": ["a.w", "b.w"], "component": ["llm", "llm"], "shape": [[2], [2]],
                            "max_abs": [0.0, 0.0], "rel_norm": [0.0, 0.0], "identical": [True, True],
                            "diff_sq": [0.0, 0.0], "ref_sq": [1.0, 1.0]})
    page = WeightDiff("A", "B", tensors)._repr_html_()
    parse(page)
    assert "IDENTICAL weights" in page and hr.COLOURS["error"][0] in page and "Largest changes" in page


def test_size_never_rounds_a_small_folder_to_zero_gigabytes():
    assert hr.size(340_123) == "340.1 kB"
    assert hr.size(17_000_000_000) == "17.0 GB"
    assert hr.size(12) == "12 B"


def test_number_spells_nan_and_inf_and_keeps_ratios_to_three_decimals():
    assert hr.number(0.76543) == "0.765"
    assert hr.number(71.1986) == "71.2"
    assert hr.number(float("nan")) == "n/a"
    assert hr.number(float("inf")) == "inf"
    assert hr.number(123456.0) == "123,456"


def test_metric_heading_states_unit_statistic_and_direction():
    from vesselnb.metrics import METRICS, metric_info

    assert metric_info("hd95").heading("median") == "HD95 (px, median, ↓ better)"
    assert metric_info("dice").heading("mean") == "Dice (mean, ↑ better)"
    assert metric_info("not_a_metric").heading() == "not_a_metric"
    assert all(info.higher_is_better is not None for info in METRICS.values())


def test_conversion_report_states_a_small_folder_in_kilobytes_and_its_sections_are_well_formed() -> None:
    """The demo's 340 kB folder once read "0.000 GB"; every section parses (balanced tags) even with no record."""
    report = ConversionReport(output_dir="/o", fingerprint="f" * 16, dtype="bf16",
                              source={"path": "/c", "bytes": 133_130}, output_bytes=342_443)
    text = " ".join(parse(report._repr_html_()).text)
    assert "342.4 kB" in text and "133.1 kB" in text and "GB" not in text
    for section in (report.training_html(), report.components_html(), report.lora_tokenizer_html(),
                    report.coverage_html(), report.provenance_html()):
        tags = parse(section)
        assert "not" in "".join(tags.text) and "table" not in tags.seen  # one line saying so, never an empty table


def test_mapping_tables_align_values_left() -> None:
    """JupyterLab's CSS right-aligns table cells: a key/value table then pushes its values to the far edge."""
    page = hr.table({"store": "/a/b", "speed": "1.5 frames/s"})
    cells = re.findall(r"<td style='([^']*)'", page)
    assert len(cells) == 2 and all("text-align:left" in style for style in cells)


def test_doctests() -> None:
    import doctest

    from vesselnb import htmlrepr

    result = doctest.testmod(htmlrepr)
    assert result.attempted > 0 and result.failed == 0
