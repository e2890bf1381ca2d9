"""The pipeline's stages, what happened to each, and the one time format: shared by the runner, the run folder and
the report without any of them importing another."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import Any


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


@dataclass
class StageOutcome:
    """What happened to one stage: the manifest's ``stages.<key>`` entry."""

    key: str
    notebook: str
    status: str = "pending"  # pending | running | ok | failed | skipped | interrupted
    started: str | None = None
    finished: str | None = None
    seconds: float | None = None
    error: dict[str, str] | None = None  # {"ename", "evalue", "hint"}
    executed: str | None = None  # file name of the executed notebook, relative to the run folder
    html: str | None = None  # file name of the HTML report, relative to the run folder
    report_error: str | None = None  # why the HTML could not be rendered (the .ipynb is still there)
    pid: int | None = None  # the process running the stage, so a later reader can tell a dead "running" from a live one
    host: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form for the manifest."""
        return dict(self.__dict__)


def now_iso() -> str:
    """UTC, ISO 8601, seconds precision (``2026-12-03T12:47:30+00:00``): the one time format of vesselnb's files."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
