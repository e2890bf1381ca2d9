"""The pipeline's stages and the manifest's time format: shared by the runner and the report without either
importing the other."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stage:
    """One notebook of the pipeline: the CLI key, the notebook file and the report name."""

    key: str
    notebook: str

    @property
    def stem(self) -> str:
        """``01_convert`` for ``01_convert.ipynb``: the name of the executed notebook and its HTML."""
        return Path(self.notebook).stem


RUN_STAGES: tuple[Stage, ...] = (
    Stage("convert", "01_convert.ipynb"),
    Stage("infer", "02_inference.ipynb"),
    Stage("analyze", "03_error_analysis.ipynb"),
)
COMPARE_STAGE = Stage("compare", "04_compare_checkpoints.ipynb")


def now_iso() -> str:
    """Local time with offset, seconds precision: readable in the manifest and the index."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
