"""Plain, strict-JSON values from what the stages compute (numpy scalars, NaN, inf, paths).

``json.dumps`` writes NaN and Infinity, which strict parsers (browsers' ``JSON.parse``, jq) refuse; every JSON file a
stage writes goes through :func:`strict_json` first.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import numpy as np


def strict_json(value: Any, inf_as: Literal["string", "null"] = "string") -> Any:
    """NaN -> null, numpy scalars -> Python, paths -> str, and ±inf -> "inf"/"-inf" (``inf_as="string"``,
    summary.json: an infinite HD95 is information) or null (``inf_as="null"``).

    >>> strict_json({"x": float("nan"), "y": np.float32(0.5), "z": [np.int64(3), float("inf")]})
    {'x': None, 'y': 0.5, 'z': [3, 'inf']}
    """
    if isinstance(value, dict):
        return {str(k): strict_json(v, inf_as) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v, inf_as) for v in value]
    if isinstance(value, np.ndarray):
        return [strict_json(v, inf_as) for v in value.tolist()]
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (np.floating, float)):
        number = float(value)
        if math.isnan(number):
            return None
        if math.isinf(number):
            return None if inf_as == "null" else ("inf" if number > 0 else "-inf")
        return number
    if isinstance(value, Path):
        return str(value)
    return value
