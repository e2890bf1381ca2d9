"""Comparing runs of checkpoints: is the later one really better — and is it even a different model?

Shaped like :mod:`vesselnb.convert`: :mod:`~vesselnb.compare.runs` (reading run folders, identity, comparability),
:mod:`~vesselnb.compare.paired` (every metric paired by patient, Holm, the verdict), :mod:`~vesselnb.compare.figures`,
:mod:`~vesselnb.compare.report` (one method per report section, ``comparison.json``) and
:mod:`~vesselnb.compare.stage` (:func:`compare_stage`). The statistics themselves live in :mod:`vesselnb.stats`.
"""

from vesselnb.compare.paired import CompareSettings, PairedComparison, paired_comparison
from vesselnb.compare.report import ComparisonReport
from vesselnb.compare.runs import NEAR_ZERO_REL_CHANGE, RunInputs, load_run
from vesselnb.compare.stage import compare_stage

__all__ = [
    "NEAR_ZERO_REL_CHANGE",
    "CompareSettings",
    "ComparisonReport",
    "PairedComparison",
    "RunInputs",
    "compare_stage",
    "load_run",
    "paired_comparison",
]
