"""``vesselnb infer`` and ``vesselnb merge-predictions``: argument parsing only.

Why apart from :mod:`vesselnb.infer`: that module imports torch and transformers (seconds), and registering a
subcommand must not cost ``vesselnb --help`` that. The inference module is imported when ``infer`` runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vesselnb.run_folder import RunFolder
from vesselnb.store import merge_parts


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``infer`` and ``merge-predictions``."""
    infer = subparsers.add_parser(
        "infer", help="run stage 02 (predict_forward over the frames) into <run-dir>/predictions",
        description="Run an HF Sa2VA folder over the frames of a params file. Resumable; for several GPUs use "
                    "`accelerate launch --num_processes N -m vesselnb.cli infer PARAMS --run-dir DIR`.",
    )
    infer.add_argument("params", type=Path, help="params YAML (see params/demo.yaml)")
    infer.add_argument("--run-dir", type=Path, default=None, help="run folder (default: outputs/<run_name>)")
    infer.add_argument("--shard", default=None, help="k/n: run only shard k of n (0-based; default under "
                                                      "accelerate launch: RANK/WORLD_SIZE)")
    infer.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                       help="override inference.device")
    infer.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    infer.add_argument("--retry-errors", action="store_true",
                       help="predict every stored error record again (by default only those whose file changed)")
    infer.set_defaults(func=_run_infer)

    merge = subparsers.add_parser(
        "merge-predictions", help="merge shard parts (predictions/parts/*) into the run's prediction store",
    )
    merge.add_argument("path", type=Path, help="the run folder or its predictions/ folder")
    merge.add_argument("--allow-incomplete", action="store_true",
                       help="also merge parts whose shard has not finished (their remaining samples stay missing)")
    merge.set_defaults(func=_run_merge)


def _run_infer(args: argparse.Namespace) -> int:
    from vesselnb import infer  # torch, transformers: paid when inference runs, not by `vesselnb --help`

    return infer._cli_infer(args)


def _run_merge(args: argparse.Namespace) -> int:
    folder = RunFolder(args.path)
    path = folder.predictions_dir if folder.predictions_dir.is_dir() else args.path
    report = merge_parts(path, require_complete=not args.allow_incomplete)
    print(f"merged {len(report.parts)} part(s) into {report.store}: {report.copied} samples copied, "
          f"{report.already_present} already present")
    if report.incomplete_parts:
        print(f"not merged (shard still running or killed; rerun it): {', '.join(report.incomplete_parts)}",
              file=sys.stderr)
        return 1
    return 0
