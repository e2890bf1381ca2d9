"""Stage 01 for the notebook and the runner: convert (or fingerprint) and write ``run_dir/conversion.json``."""

from __future__ import annotations

import json
from pathlib import Path

from vesselnb.convert.converter import convert_checkpoint, read_record
from vesselnb.convert.coverage import ConversionReport, expected_training, tokenizer_summary
from vesselnb.convert.hf_folder import BaseFolder
from vesselnb.convert.training_config import read_training_config
from vesselnb.errors import VesselnbError
from vesselnb.fingerprint import config_fingerprint, weights_fingerprint
from vesselnb.params import RunParams
from vesselnb.run_folder import RunFolder


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _given_folder_report(hf_dir: Path) -> ConversionReport:
    """``hf_model`` set: nothing to convert; record the fingerprint (and vesselnb's record if the folder has one)."""
    BaseFolder(hf_dir).close()  # every shard the index names exists and holds its keys (else one clear error)
    fingerprint = weights_fingerprint(hf_dir)
    report = read_record(hf_dir)
    reason = "params.hf_model names an already converted folder: conversion not run, fingerprint recorded only"
    if report is None:
        config = (
            json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
            if (hf_dir / "config.json").is_file()
            else {}
        )
        report = ConversionReport(
            output_dir=str(hf_dir),
            fingerprint=fingerprint,
            dtype=str(config.get("torch_dtype", "unknown")),
            source={"path": str(hf_dir), "bytes": _folder_bytes(hf_dir)},
        )
    report.fingerprint = fingerprint
    report.config_fingerprint = config_fingerprint(hf_dir)
    report.output_dir = str(hf_dir)
    report.output_bytes = _folder_bytes(hf_dir)
    report.skipped = reason
    return report


def _same_weights_elsewhere(report: ConversionReport, folder: RunFolder) -> None:
    """Warn loudly when another run folder beside this one recorded the same fingerprint from another source."""
    for other in folder.neighbours():
        try:
            data = other.conversion()
        except VesselnbError as exc:
            report.notes.append(f"run {other.name} not checked for identical weights: {exc}")
            continue
        if data is None or data.get("fingerprint") != report.fingerprint:
            continue
        other_source = (data.get("source") or {}).get("path")
        if other_source and other_source == report.source.get("path"):
            report.notes.append(f"run {other.name} converted the same source to the same weights")
            continue
        report.warnings.append(
            f"IDENTICAL WEIGHTS: run '{other.name}' ({other_source}) has the same weights fingerprint "
            f"{report.fingerprint} as this run ({report.source.get('path')}). Two different checkpoints converted to "
            "the same weights: check that each run converts its own checkpoint (see `vesselnb diff`)."
        )


def convert_stage(params: RunParams, run_dir: str | Path) -> ConversionReport:
    """Convert ``params.checkpoint`` into the run's HF folder (or fingerprint ``params.hf_model``)."""
    folder = RunFolder(run_dir).create()
    if params.hf_model is not None:
        report = _given_folder_report(Path(params.hf_model))
    else:
        ckpt = params.checkpoint
        report = convert_checkpoint(
            ckpt.path,
            ckpt.base_model,
            folder.hf_dir(params),
            training_config=ckpt.training_config,
            pretrained_pth=ckpt.pretrained_pth,
            lora_r=ckpt.lora.r,
            lora_alpha=ckpt.lora.alpha,
            lora_target_modules=ckpt.lora.target_modules,
            dtype=ckpt.dtype,
            shard_size=ckpt.shard_size,
            allow_shape_mismatch=ckpt.allow_shape_mismatch,
            allow_missing=ckpt.allow_missing,
            trust_pickle=ckpt.trust_pickle,
            check_free_space=ckpt.check_free_space,
            allow_missing_components=ckpt.allow_missing_components,
            allow_frozen_mismatch=ckpt.allow_frozen_mismatch,
            allow_other_base=ckpt.allow_other_base,
            # The run's own hf_model folder belongs to the run: a rerun with new inputs replaces it. An explicit
            # hf_output elsewhere is the user's folder and needs checkpoint.overwrite.
            overwrite=ckpt.overwrite or ckpt.hf_output is None,
        )
        config = params.checkpoint.training_config
        report.expected = expected_training(read_training_config(config) if config else None)
    report.tokenizer = tokenizer_summary(report.output_dir)  # the report shows [SEG]'s id and the added tokens
    _same_weights_elsewhere(report, folder)
    folder.write_conversion(report.conversion_json())
    return report
