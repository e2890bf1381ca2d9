"""Training checkpoint -> Hugging Face folder, with every key accounted for (see docs/contracts.md).

Entry points: :func:`convert_checkpoint`, :func:`convert_stage` (notebook 01 / runner), :func:`diff_weights`,
:func:`weights_fingerprint`.
"""

from vesselnb.convert.converter import convert_checkpoint, read_record
from vesselnb.convert.coverage import ConversionReport
from vesselnb.convert.diff import WeightDiff, diff_weights
from vesselnb.convert.stage import convert_stage
from vesselnb.fingerprint import weights_fingerprint

__all__ = [
    "ConversionReport",
    "WeightDiff",
    "convert_checkpoint",
    "convert_stage",
    "diff_weights",
    "read_record",
    "weights_fingerprint",
]
