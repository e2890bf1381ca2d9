"""The headline numbers of a run (``summary.json["headline"]``): what each one is, so none is printed bare.

Why a module of its own: stage 03 computes these numbers and writes them, the index (:mod:`vesselnb.report`) and the
stage 03 report print them, and a median HD95 beside a mean HD95 is only readable when both say which they are. One
table here names each number's metric, statistic, unit and direction for every place that prints it.

Sa2VA's referring-segmentation evaluations report two IoU aggregates: **cIoU**, the IoU of all pixels pooled over
the frames (Σ intersection / Σ union: large masks weigh more), and **gIoU**, the mean per-frame IoU where a frame
with an empty ground truth *and* an empty prediction scores 1 (MONAI leaves any frame with an empty ground truth out of
the mean IoU). Without such frames gIoU is the mean per-frame IoU, so the stage 03 report shows it once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from vesselnb.htmlrepr import number as formatted
from vesselnb.metrics import MetricInfo, metric_info

MEAN = "mean per frame"
MEDIAN = "median per frame"
POOLED = "pooled pixels"


@dataclass(frozen=True)
class HeadlineNumber:
    """One headline number: the metric it aggregates (label, unit, direction) and how (the statistic)."""

    info: MetricInfo
    statistic: str
    why: str = ""  # why this statistic (shown as a note where it is not the obvious mean)

    def heading(self) -> str:
        """``HD95 (px, median per frame, ↓ better)``."""
        return self.info.heading(self.statistic)


# Keys are summary.json's (stage 04 and older manifests read them); the order is the reports'.
HEADLINE: dict[str, HeadlineNumber] = {
    "dice": HeadlineNumber(metric_info("dice"), MEAN),
    "cldice": HeadlineNumber(metric_info("cldice"), MEAN),
    "iou": HeadlineNumber(metric_info("iou"), MEAN),
    "hd95": HeadlineNumber(metric_info("hd95"), MEDIAN,
                           "a median: a frame with one mask empty has an infinite HD95, which a median ranks "
                           "last and a mean cannot hold"),
    "nsd": HeadlineNumber(metric_info("nsd"), MEAN),
    "ciou": HeadlineNumber(MetricInfo("cIoU", "", True, "Sa2VA's cIoU: Σ intersection / Σ union over all frames"),
                           POOLED),
    "giou": HeadlineNumber(MetricInfo("gIoU", "", True,
                                      "Sa2VA's gIoU: mean per-frame IoU, an empty GT with an empty prediction = 1"),
                           "mean per frame, empty vs empty = 1"),
}


def number(key: str) -> HeadlineNumber:
    """The :class:`HeadlineNumber` of ``key``; an unknown key gets its own name and no statistic."""
    return HEADLINE.get(key, HeadlineNumber(metric_info(key), ""))


def heading(key: str, nsd_tolerance_px: float | None = None) -> str:
    """The heading of headline number ``key``; NSD names its tolerance when it is given (``NSD at 2 px (...)``)."""
    entry = number(key)
    if key == "nsd" and nsd_tolerance_px is not None:
        entry = replace(entry, info=replace(entry.info, label=f"NSD at {nsd_tolerance_px:g} px"))
    return entry.heading()


def text(key: str, value: object) -> str:
    """``HD95 60.95 px (median per frame)``: a headline number inline, with its unit and statistic."""
    entry = number(key)
    unit = f" {entry.info.unit}" if entry.info.unit else ""
    return f"{entry.info.label} {formatted(value)}{unit} ({entry.statistic})" if entry.statistic else \
        f"{entry.info.label} {formatted(value)}{unit}"
