"""Training checkpoint -> Hugging Face folder, with every key accounted for (see docs/contracts.md).

Entry points: :func:`convert_checkpoint`, :func:`convert_stage` (notebook 01 / runner), :func:`diff_weights`,
:func:`weights_fingerprint`.

The names are loaded on first use (PEP 562): importing ``vesselnb.convert.cli`` to register ``vesselnb convert``
runs this file, and must not pay for torch (``vesselnb --help`` stays fast).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vesselnb.convert.converter import convert_checkpoint, read_record
    from vesselnb.convert.coverage import ConversionReport
    from vesselnb.convert.diff import WeightDiff, diff_weights
    from vesselnb.convert.stage import convert_stage
    from vesselnb.fingerprint import weights_fingerprint

_EXPORTS = {
    "ConversionReport": "vesselnb.convert.coverage",
    "WeightDiff": "vesselnb.convert.diff",
    "convert_checkpoint": "vesselnb.convert.converter",
    "convert_stage": "vesselnb.convert.stage",
    "diff_weights": "vesselnb.convert.diff",
    "read_record": "vesselnb.convert.converter",
    "weights_fingerprint": "vesselnb.fingerprint",
}
__all__ = [
    "ConversionReport",
    "WeightDiff",
    "convert_checkpoint",
    "convert_stage",
    "diff_weights",
    "read_record",
    "weights_fingerprint",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vesselnb.convert' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
