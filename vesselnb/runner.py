"""Executing the notebooks: one papermill run per stage, each in its own fresh kernel process.

Why a kernel per notebook and strictly one at a time: papermill's known failure modes are a kernel killed for memory
and port clashes between kernels started in parallel. A fresh process per stage returns all memory (model weights,
figures) to the system before the next stage starts, and kernels talk over private Unix sockets in a per-stage temp
folder, so two ``vesselnb run`` commands on one machine never fight over TCP ports.

A failed cell does not lose the report: papermill writes the executed notebook with the error, we render its HTML,
record the failure in ``manifest.json`` and mark later stages ``skipped``.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from vesselnb.errors import StageError, VesselnbError
from vesselnb.interrupts import Interrupted, graceful_stop, papermill_kwargs, stop_requested
from vesselnb.params import RunParams, load_params
from vesselnb.report import render_html, write_index
from vesselnb.run_folder import INDEX_FILE, RunFolder, comparison_folder_name, now_iso
from vesselnb.stages import COMPARE_STAGE, RUN_STAGES, Stage, StageOutcome

KERNEL_NAME = "vesselnb"
__all__ = ["RUN_STAGES", "COMPARE_STAGE", "KERNEL_NAME", "RunResult", "Stage", "StageOutcome", "compare_runs",
           "ensure_kernel", "execute_stage", "run_demo", "run_params"]


@dataclass
class RunResult:
    """The outcome of ``vesselnb run`` / ``compare``: where things are and which stage (if any) failed."""

    name: str
    run_dir: Path
    stages: list[StageOutcome] = field(default_factory=list)

    @property
    def failed(self) -> StageOutcome | None:
        """The first failed stage, or None when every executed stage succeeded."""
        return next((s for s in self.stages if s.status == "failed"), None)

    @property
    def ok(self) -> bool:
        return self.failed is None

    def failure_line(self) -> str:
        """One clear line for the terminal: which stage, which error, which report to open."""
        stage = self.failed
        if stage is None:
            return f"{self.name}: all stages ok"
        error = stage.error or {}
        where = self.run_dir / (stage.html or stage.executed or "")
        return f"stage '{stage.key}' of '{self.name}' failed: {error.get('ename', 'Error')}: " \
               f"{error.get('evalue', '')} (report: {where})"


def repo_root() -> Path:
    """The checkout holding this package (``notebooks/`` and ``params/`` live beside ``vesselnb/``)."""
    return Path(__file__).resolve().parent.parent


def default_notebooks_dir() -> Path:
    """``$VESSELNB_NOTEBOOKS`` or the checkout's ``notebooks/``."""
    return Path(os.environ.get("VESSELNB_NOTEBOOKS") or repo_root() / "notebooks")


def ensure_kernel(kernel_name: str = KERNEL_NAME) -> str:
    """Make sure the Jupyter kernel ``kernel_name`` runs *this* interpreter, installing it into ``sys.prefix``.

    Why: a kernelspec found elsewhere (a user-wide ``python3``) may start another Python without vesselnb or with
    other package versions, and the notebooks would silently test a different environment. ``make setup`` installs
    the spec; this re-checks and repairs it on every run.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    def current_argv0() -> str | None:
        try:
            return KernelSpecManager().get_kernel_spec(kernel_name).argv[0]
        except NoSuchKernel:
            return None

    if current_argv0() == sys.executable:
        return kernel_name
    from ipykernel.kernelspec import install

    try:
        install(kernel_name=kernel_name, display_name=f"Python ({kernel_name})", prefix=sys.prefix)
    except OSError as exc:
        raise StageError(
            f"cannot install the Jupyter kernel '{kernel_name}' into {sys.prefix}: {exc}. "
            f"Run `make setup` or `{sys.executable} -m ipykernel install --sys-prefix --name {kernel_name}`."
        ) from None
    found = current_argv0()
    if found != sys.executable:
        spec_dir = KernelSpecManager().find_kernel_specs().get(kernel_name)
        raise StageError(
            f"the Jupyter kernel '{kernel_name}' at {spec_dir} runs {found}, not {sys.executable}; "
            "remove that kernelspec (jupyter kernelspec remove) so the venv's one is used"
        )
    return kernel_name


def execute_stage(
    stage: Stage,
    parameters: dict[str, Any],
    out_dir: Path,
    notebooks_dir: Path,
    *,
    header: dict[str, Any],
    progress: bool = True,
    log_output: bool = False,
    show_code: bool = False,
    kernel_name: str | None = None,
) -> StageOutcome:
    """Execute one notebook with papermill into ``out_dir/<stem>.ipynb`` and render ``<stem>.html``.

    Never raises for a failing notebook: the outcome says ``failed`` with the error, and the executed notebook and
    its HTML still exist (with the error visible) whenever papermill got as far as writing them.
    """
    import papermill  # nbclient, zmq, tornado: paid when a notebook runs, not by `vesselnb --help`
    from papermill.exceptions import PapermillExecutionError

    _check_notebooks(notebooks_dir, [stage])
    source = notebooks_dir / stage.notebook
    folder = RunFolder(out_dir).create()
    executed = folder.notebook_path(stage)
    html = folder.html_path(stage)
    for stale in (executed, html):  # a report from an earlier run must not pass for this one
        stale.unlink(missing_ok=True)
    outcome = StageOutcome(stage.key, stage.notebook, status="running", started=now_iso())
    kernel = kernel_name or ensure_kernel()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vnb-k-") as sockets:
        try:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=parameters,
                kernel_name=kernel,
                language="python",  # our notebooks are Python even when their metadata says nothing
                cwd=str(notebooks_dir),
                progress_bar=progress,
                log_output=log_output,
                config=_kernel_config(Path(sockets)),
                **papermill_kwargs(),  # Ctrl-C/SIGTERM: stop before the next cell, or the kernel after its frame
            )
            outcome.status = "ok"
        except PapermillExecutionError as exc:
            outcome.status = "failed"
            outcome.error = {"ename": exc.ename, "evalue": _first_line(exc.evalue), "cell": str(exc.exec_count)}
        except Interrupted as exc:  # stopped between cells (papermill still wrote the executed notebook)
            outcome.status = "interrupted"
            outcome.error = {"ename": "Interrupted", "evalue": str(exc)}
        except Exception as exc:  # noqa: BLE001 - kernel death, timeouts: recorded, reported, never lost
            outcome.status = "failed"
            outcome.error = {"ename": type(exc).__name__, "evalue": _first_line(str(exc)) or _kernel_hint(exc)}
    if outcome.status == "failed" and stop_requested() is not None:  # the kernel stopped after its current frame
        outcome.status = "interrupted"
    outcome.seconds = round(time.perf_counter() - start, 2)
    outcome.finished = now_iso()
    if executed.is_file():
        outcome.executed = executed.name
        # Stage 01 computes the fingerprint while it runs, so look again now that it has.
        fingerprint = header.get("fingerprint") or folder.weights_fingerprint(compute=False)
        try:
            render_html(executed, html, header={**header, "stage": stage.stem, "status": outcome.status,
                                                "error": outcome.error, "fingerprint": fingerprint},
                        show_code=show_code)
            outcome.html = html.name
        except Exception as exc:  # noqa: BLE001 - the executed notebook is the record; a report glitch must not hide it
            outcome.report_error = f"{type(exc).__name__}: {_first_line(str(exc))}"
            print(f"vesselnb: warning: could not render {html.name}: {outcome.report_error}", file=sys.stderr)
    return outcome


def _check_notebooks(notebooks_dir: Path, stages: list[Stage]) -> None:
    """All notebooks of a run must exist before the first one starts, not be found missing halfway."""
    for stage in stages:
        if not (notebooks_dir / stage.notebook).is_file():
            raise StageError(
                f"{notebooks_dir / stage.notebook}: notebook not found; run from a vesselnb checkout, pass "
                "--notebooks DIR or set VESSELNB_NOTEBOOKS"
            )


def _kernel_config(socket_dir: Path) -> Any:
    """Kernel over Unix sockets in a private folder: no TCP ports, so parallel runs cannot clash."""
    from traitlets.config import Config

    config = Config()
    if os.name == "posix":
        config.KernelManager.transport = "ipc"
        config.KernelManager.ip = str(socket_dir / "k")
    return config


def _first_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[0][:500] if lines else ""


def _kernel_hint(exc: Exception) -> str:
    if type(exc).__name__ == "DeadKernelError":
        return "the kernel died (often out of memory: lower data.limit or use a bigger machine)"
    return repr(exc)


def run_params(
    params_path: str | Path,
    *,
    outputs_dir: str | Path = "outputs",
    stages: list[str] | None = None,
    notebooks_dir: str | Path | None = None,
    progress: bool = True,
    log_output: bool = False,
    show_code: bool = False,
    refresh_index: bool = True,
) -> RunResult:
    """``vesselnb run``: execute the requested stages of one params file into ``outputs_dir/<run_name>/``.

    Stages run in pipeline order whatever order they are given in; the first failure stops the rest (``skipped``).
    The manifest is rewritten after every stage, so an interrupted run still says how far it got.
    """
    params = _load_building_demo(params_path)
    wanted = _select_stages(stages)
    outputs = Path(outputs_dir).resolve()
    folder = RunFolder(outputs / params.run_name)
    run_dir = folder.path
    notebooks = Path(notebooks_dir).resolve() if notebooks_dir else default_notebooks_dir()
    _check_notebooks(notebooks, wanted)
    kernel = ensure_kernel()
    parameters = {"params_path": str(params.source_file), "run_dir": str(run_dir)}
    result = RunResult(params.run_name, run_dir)
    outcomes = folder.begin_run(params, wanted)  # locks the folder: a second run on it is refused at once
    for stage in wanted:
        if stop_requested() is not None:  # a stop arrived while the previous stage finished its last cell
            _stop_run(folder, params, None, stage, outputs if refresh_index else None)
        if result.failed is not None:
            skipped = outcomes[stage.key]
            skipped.status = "skipped"
            skipped.error = {"ename": "Skipped", "evalue": f"stage '{result.failed.key}' failed"}
            folder.end_stage(params, skipped)
            continue
        if progress:
            print(f"[{params.run_name}] {stage.stem} ...", file=sys.stderr, flush=True)
        folder.begin_stage(params, outcomes[stage.key])
        try:
            outcome = execute_stage(stage, parameters, run_dir, notebooks, header=_header(params, folder),
                                    progress=progress, log_output=log_output, show_code=show_code,
                                    kernel_name=kernel)
        except KeyboardInterrupt:  # Ctrl-C without graceful_stop: the manifest must not claim the stage still runs
            outcomes[stage.key].status = "interrupted"
            outcomes[stage.key].error = {"ename": "KeyboardInterrupt", "evalue": "interrupted by the user"}
            folder.end_stage(params, outcomes[stage.key])
            folder.end_run()
            raise
        outcomes[stage.key] = outcome
        result.stages = list(outcomes.values())
        folder.end_stage(params, outcome)
        if outcome.status == "interrupted":
            _stop_run(folder, params, outcome, stage, outputs if refresh_index else None)
    folder.end_run()
    result.stages = list(outcomes.values())
    if refresh_index:
        write_index(outputs)
    return result


def _stop_run(folder: RunFolder, params: RunParams, outcome: StageOutcome | None, stage: Stage,
              outputs: Path | None) -> NoReturn:
    """A graceful stop: release the folder, refresh the index (it shows ``interrupted``), raise the one line."""
    folder.end_run()
    if outputs is not None:
        write_index(outputs)
    signum = stop_requested() or signal.SIGINT
    again = f"run `vesselnb run {params.source_file}` again to resume"
    if outcome is None:
        raise Interrupted(signum, f"before stage '{stage.key}' of '{params.run_name}'; {again}")
    detail = re.sub(r"^stopped by SIG\w+ ?", "", (outcome.error or {}).get("evalue", ""))
    report = folder.path / (outcome.html or outcome.executed or "")
    raise Interrupted(signum, f"during stage '{stage.key}' of '{params.run_name}'" + (f" {detail}" if detail else "")
                      + f"; report: {report}; {again}")


def _select_stages(keys: list[str] | None) -> list[Stage]:
    if not keys:
        return list(RUN_STAGES)
    known = {s.key: s for s in RUN_STAGES}
    unknown = [k for k in keys if k not in known]
    if unknown:
        choices = ", ".join(known)
        raise VesselnbError(f"unknown stage {unknown[0]!r}; choose from {choices} (e.g. --stages infer,analyze)")
    return [s for s in RUN_STAGES if s.key in keys]


def _load_building_demo(params_path: str | Path) -> RunParams:
    """``load_params``, after building the demo assets a params file's ``demo_root`` asks for (if missing)."""
    unchecked = load_params(params_path, check_paths=False)
    if unchecked.demo_root is None:
        return load_params(params_path)
    _build_demo(unchecked.demo_root)
    return load_params(params_path)


def _build_demo(root: Path) -> None:
    """Build (or check) the demo assets under ``root``."""
    from vesselnb.demo import ensure_demo_assets  # torch: paid by demo runs only, not by `vesselnb --help`

    ensure_demo_assets(root)


def _header(params: RunParams, folder: RunFolder) -> dict[str, Any]:
    fingerprint = folder.weights_fingerprint(params, compute=False)
    return {"run": params.run_name, "fingerprint": fingerprint, "date": now_iso(),
            "iteration": folder.iteration(params)}


def compare_runs(
    runs: list[str | Path],
    *,
    outputs_dir: str | Path = "outputs",
    notebooks_dir: str | Path | None = None,
    progress: bool = True,
    log_output: bool = False,
    show_code: bool = False,
    refresh_index: bool = True,
) -> RunResult:
    """``vesselnb compare``: notebook 04 over several finished runs into ``outputs_dir/compare_<a>_vs_<b>...``.

    Each argument is a params file (its run folder is ``outputs_dir/<run_name>``) or a run folder itself.
    """
    if len(runs) < 2:
        raise VesselnbError("compare needs at least two params files or run folders")
    outputs = Path(outputs_dir).resolve()
    run_dirs = [_resolve_run_dir(Path(r), outputs) for r in runs]
    names = [d.name for d in run_dirs]
    if len(set(names)) != len(names):
        raise VesselnbError(f"compare got the same run twice: {names}")
    out_dir = outputs / comparison_folder_name(names)
    notebooks = Path(notebooks_dir).resolve() if notebooks_dir else default_notebooks_dir()
    parameters = {"run_dirs": [str(d) for d in run_dirs], "out_dir": str(out_dir)}
    result = RunResult(out_dir.name, out_dir)
    if progress:
        print(f"[{out_dir.name}] {COMPARE_STAGE.stem} ...", file=sys.stderr, flush=True)
    header = {"run": out_dir.name, "fingerprint": None, "date": now_iso(), "iteration": None}
    outcome = execute_stage(COMPARE_STAGE, parameters, out_dir, notebooks, header=header, progress=progress,
                            log_output=log_output, show_code=show_code)
    result.stages = [outcome]
    RunFolder(out_dir).write_compare_manifest(run_dirs, outcome)
    if refresh_index:
        write_index(outputs)
    if outcome.status == "interrupted":
        report = out_dir / (outcome.html or outcome.executed or "")
        raise Interrupted(stop_requested() or signal.SIGINT,
                          f"during the comparison {out_dir.name}; report: {report}; run the same command again")
    return result


def _resolve_run_dir(arg: Path, outputs: Path) -> Path:
    if arg.is_dir():
        run_dir = arg.resolve()
    else:
        params = load_params(arg, check_paths=False)
        run_dir = outputs / params.run_name
    folder = RunFolder(run_dir)
    if not folder.manifest_path.is_file():
        raise VesselnbError(
            f"{run_dir}: no finished run here ({folder.manifest_path.name} missing); run `vesselnb run {arg}` first"
        )
    return run_dir


def run_demo(
    *,
    outputs_dir: str | Path = "outputs",
    params_dir: str | Path | None = None,
    notebooks_dir: str | Path | None = None,
    progress: bool = True,
) -> list[RunResult]:
    """``vesselnb demo``: build the demo assets, run both demo checkpoints fully, then compare them."""

    folder = Path(params_dir) if params_dir else repo_root() / "params"
    files = [folder / "demo.yaml", folder / "demo_long.yaml"]
    first = load_params(files[0], check_paths=False)
    if first.demo_root is None:
        raise VesselnbError(f"{files[0]}: 'demo_root' is not set; the demo needs it to build its assets")
    if progress:
        print(f"demo assets: {first.demo_root}", file=sys.stderr, flush=True)
    _build_demo(first.demo_root)
    results = []
    for path in files:
        result = run_params(path, outputs_dir=outputs_dir, notebooks_dir=notebooks_dir, progress=progress)
        results.append(result)
        if not result.ok:
            return results
    results.append(compare_runs(files, outputs_dir=outputs_dir, notebooks_dir=notebooks_dir, progress=progress))
    write_index(Path(outputs_dir))
    return results


# --- CLI: run, compare, demo, index -------------------------------------------------------------------------------

def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``run``, ``compare``, ``demo`` and ``index``."""
    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--outputs", default="outputs", help="outputs folder (default: ./outputs)")
        p.add_argument("--notebooks", default=None, help="notebooks folder (default: the checkout's notebooks/)")
        p.add_argument("--show-code", action="store_true", help="keep code cells in the HTML reports")
        p.add_argument("--log-output", action="store_true", help="stream notebook output to the terminal")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    run = subparsers.add_parser("run", help="execute the notebooks for one params file into outputs/<run>/")
    run.add_argument("params", help="params YAML file, e.g. params/demo.yaml")
    run.add_argument("--stages", default=None, help="comma-separated subset of convert,infer,analyze (default: all)")
    common(run)
    run.set_defaults(func=_cmd_run)

    compare = subparsers.add_parser("compare", help="notebook 04 over several runs (params files or run folders)")
    compare.add_argument("runs", nargs="+", help="params files (or outputs/<run> folders) of finished runs")
    common(compare)
    compare.set_defaults(func=_cmd_compare)

    demo = subparsers.add_parser("demo", help="build the demo, run both demo checkpoints and compare them")
    demo.add_argument("--outputs", default="outputs", help="outputs folder (default: ./outputs)")
    demo.add_argument("--params", default=None,
                      help="folder holding demo.yaml and demo_long.yaml (default: the checkout's params/)")
    demo.add_argument("--notebooks", default=None, help="notebooks folder (default: the checkout's notebooks/)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    index = subparsers.add_parser("index", help="rebuild outputs/index.html from the manifests")
    index.add_argument("--outputs", default="outputs", help="outputs folder (default: ./outputs)")
    index.set_defaults(func=_cmd_index)


def _log_cells(enabled: bool) -> None:
    """``--log-output``: papermill logs each cell's output to its logger, which prints nothing unless configured."""
    if enabled:
        logging.basicConfig(level=logging.INFO, format="%(message)s")


def _cmd_run(args: argparse.Namespace) -> int:
    _log_cells(args.log_output)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    with graceful_stop():
        result = run_params(args.params, outputs_dir=args.outputs, stages=stages, notebooks_dir=args.notebooks,
                            progress=not args.no_progress, log_output=args.log_output, show_code=args.show_code)
    return _report_result(result, Path(args.outputs))


def _cmd_compare(args: argparse.Namespace) -> int:
    _log_cells(args.log_output)
    with graceful_stop():
        result = compare_runs(args.runs, outputs_dir=args.outputs, notebooks_dir=args.notebooks,
                              progress=not args.no_progress, log_output=args.log_output, show_code=args.show_code)
    return _report_result(result, Path(args.outputs))


def _cmd_demo(args: argparse.Namespace) -> int:
    with graceful_stop():
        results = run_demo(outputs_dir=args.outputs, params_dir=args.params, notebooks_dir=args.notebooks,
                           progress=not args.no_progress)
    codes = [_report_result(r, Path(args.outputs)) for r in results]
    return max(codes)


def _cmd_index(args: argparse.Namespace) -> int:
    print(write_index(Path(args.outputs)))
    return 0


def _report_result(result: Any, outputs: Path) -> int:
    if result.ok:
        print(f"{result.name}: ok -> {result.run_dir}  (index: {outputs.resolve() / INDEX_FILE})")
        return 0
    print(f"vesselnb: {result.failure_line()}", file=sys.stderr)
    return 1
