"""``vesselnb convert`` and ``vesselnb diff``: thin argument parsing over :mod:`vesselnb.convert`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vesselnb.convert.flags import TRUST_PICKLE_FLAG


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register ``convert`` and ``diff``."""
    convert = subparsers.add_parser(
        "convert",
        help="training checkpoint -> verified HF folder",
        description="Convert an xtuner/mmengine Sa2VA training checkpoint into a HF folder; "
        "every key is accounted for, nothing is dropped silently.",
    )
    convert.add_argument(
        "checkpoint", type=Path, help="iter_N.pth, its work dir (last_checkpoint) or a DeepSpeed folder"
    )
    convert.add_argument("--base", type=Path, help="the HF folder training started from (default: the config's path)")
    convert.add_argument("--config", type=Path, help="the training config .py (read, never executed)")
    convert.add_argument("--out", type=Path, required=True, help="output HF folder")
    convert.add_argument("--pretrained-pth", type=Path, help="flat state dict loaded before the checkpoint")
    convert.add_argument("--lora-r", type=int)
    convert.add_argument("--lora-alpha", type=float)
    convert.add_argument("--lora-targets", nargs="+", help="LoRA target module names (default: the config's)")
    convert.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    convert.add_argument("--shard-size", default="5GB")
    convert.add_argument("--allow-shape-mismatch", action="store_true", help="keep base tensors where shapes differ")
    convert.add_argument("--allow-missing", action="store_true", help="proceed despite unaccounted keys")
    # Flag names as in vesselnb.convert.checks (spelt out here: registering the CLI must not import torch).
    convert.add_argument(
        "--allow-missing-components", action="store_true", help="take trained parts the checkpoint lacks from the base"
    )
    convert.add_argument(
        "--allow-frozen-mismatch", action="store_true", help="proceed although frozen copies differ from --base"
    )
    convert.add_argument(
        "--allow-other-base", action="store_true", help="proceed although --base is not the config's base"
    )
    convert.add_argument("--overwrite", action="store_true", help="replace an earlier conversion at --out")
    convert.add_argument(
        TRUST_PICKLE_FLAG,
        dest="trust_pickle",
        action="store_true",
        help="load pickles needing classes outside the allow-list: RUNS CODE FROM THE FILE",
    )
    convert.add_argument("--no-free-space-check", dest="check_free_space", action="store_false")
    convert.add_argument("--json", action="store_true", help="print the conversion record as JSON")
    convert.set_defaults(func=_run_convert)

    diff = subparsers.add_parser(
        "diff",
        help="per-component / per-tensor weight differences of two checkpoints",
        description="Compare two HF folders or training checkpoints tensor by tensor.",
    )
    diff.add_argument("a", type=Path)
    diff.add_argument("b", type=Path)
    diff.add_argument("--top", type=int, default=10, help="largest per-tensor changes to list")
    diff.add_argument(TRUST_PICKLE_FLAG, dest="trust_pickle", action="store_true")
    diff.set_defaults(func=_run_diff)


def _run_convert(args: argparse.Namespace) -> int:
    from vesselnb.convert.converter import convert_checkpoint

    report = convert_checkpoint(
        args.checkpoint,
        args.base,
        args.out,
        training_config=args.config,
        pretrained_pth=args.pretrained_pth,
        lora_r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_target_modules=args.lora_targets,
        dtype=args.dtype,
        shard_size=args.shard_size,
        allow_shape_mismatch=args.allow_shape_mismatch,
        allow_missing=args.allow_missing,
        trust_pickle=args.trust_pickle,
        check_free_space=args.check_free_space,
        allow_missing_components=args.allow_missing_components,
        allow_frozen_mismatch=args.allow_frozen_mismatch,
        allow_other_base=args.allow_other_base,
        overwrite=args.overwrite,
    )
    print(json.dumps(report.conversion_json(), indent=2) if args.json else str(report))
    return 0


def _run_diff(args: argparse.Namespace) -> int:
    from vesselnb.convert.diff import diff_weights

    result = diff_weights(args.a, args.b, trust_pickle=args.trust_pickle)
    print(result)
    if args.top:
        print(result.tensor_table.head(args.top).to_string(index=False))
    return 0
