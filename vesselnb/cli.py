"""The ``vesselnb`` command. Each subcommand is registered by the module that owns it (``add_cli``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vesselnb import infer_cli, runner
from vesselnb.convert import cli as convert_cli
from vesselnb.errors import VesselnbError
from vesselnb.fs_errors import describe_os_error, log_traceback
from vesselnb.interrupts import Interrupted


def build_parser() -> argparse.ArgumentParser:
    """All subcommands; owners register theirs so this file stays a dispatcher (registering imports no torch)."""
    parser = argparse.ArgumentParser(
        prog="vesselnb",
        description="Convert, run and analyse fine-tuned Sa2VA vessel-segmentation checkpoints. "
                    "Start with `vesselnb demo`; then `vesselnb run params/<run>.yaml` (see README.md).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    runner.add_cli(sub)  # run, compare, demo, index
    convert_cli.add_cli(sub)  # convert, diff
    infer_cli.add_cli(sub)  # infer, merge-predictions
    doctor = sub.add_parser("doctor", help="check an HF model folder in seconds, before a long run")
    doctor.add_argument("folder", type=Path, help="the HF folder (converted Sa2VA model)")
    doctor.add_argument("--device", default="auto", help="auto | cpu | cuda (as inference.device)")
    doctor.add_argument("--dtype", default="auto", help="auto | bf16 | fp16 | fp32 (as inference.dtype)")
    doctor.add_argument("--quick", action="store_true", help="skip the NaN/inf scan of every weight")
    doctor.set_defaults(func=_run_doctor)
    return parser


def _run_doctor(args: argparse.Namespace) -> int:
    from vesselnb import doctor  # imported when the command runs: registering it imports nothing

    return doctor.cli_main(args)


def main(argv: list[str] | None = None) -> int:
    """Entry point: user errors print one clear line and exit 2, never a deep traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VesselnbError as exc:
        print(f"vesselnb: error: {exc}", file=sys.stderr)
        return 2
    except Interrupted as exc:  # a graceful stop: what was done is saved, a rerun resumes
        again = "" if "again" in str(exc) else "; run the same command again to resume"
        print(f"vesselnb: {exc}{again}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a stage (loading params, building the demo): nothing half-written
        print("vesselnb: interrupted (SIGINT) outside a stage; run the same command again", file=sys.stderr)
        return 130
    except OSError as exc:  # read-only, full disk, permissions: one line with the path and the fix
        log = log_traceback(exc)
        print(f"vesselnb: error: {describe_os_error(exc)}" + (f" (details: {log})" if log else ""), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
