"""Every model folder is checked when loaded and by ``vesselnb doctor``: an edited config, a missing shard, NaN
weights or a removed auto_map refuse with one clear line naming the keys; the config edit changes the identity the
store trusts. Real transformers trust_remote_code loading of the demo model folder."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vesselnb.doctor import diagnose
from vesselnb.errors import InferenceError
from vesselnb.fingerprint import INDEX_NAME, config_fingerprint
from vesselnb.infer import load_model


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def _first_shard(folder: Path) -> Path:
    index = json.loads((folder / INDEX_NAME).read_text())
    return folder / sorted(set(index["weight_map"].values()))[0]


def _poison(folder: Path) -> str:
    shard = _first_shard(folder)
    tensors = load_file(shard)
    key = next(k for k, v in tensors.items() if v.is_floating_point() and v.numel() > 1)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[1] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    return key


CASES = {
    "num_hidden_layers 2->3": (
        lambda d: _edit_config(d, lambda c: c["llm_config"].update(num_hidden_layers=3)),
        ["missing", "language_model.model.layers.2."],
    ),
    "num_hidden_layers 2->1": (
        lambda d: _edit_config(d, lambda c: c["llm_config"].update(num_hidden_layers=1)),
        ["unexpected", "language_model.model.layers.1."],
    ),
    "hidden_size": (
        lambda d: _edit_config(d, lambda c: c["llm_config"].update(hidden_size=128)),
        ["of another shape", "stored [117, 64] vs config [117, 128]"],
    ),
    "auto_map removed": (lambda d: _edit_config(d, lambda c: c.pop("auto_map")), ["no 'auto_map'", "remote code"]),
    "missing shard": (lambda d: _first_shard(d).unlink(), ["names shards that are missing", "model-00001-of"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_folder_refused_at_load_and_by_doctor(demo_model_dir: Path, tmp_path: Path, case: str) -> None:
    damage, expected = CASES[case]
    folder = _copy(demo_model_dir, tmp_path / "model")
    damage(folder)
    with pytest.raises(InferenceError) as refused:
        load_model(folder, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and "Traceback" not in message
    for fragment in expected:
        assert fragment in message, message
    report = diagnose(folder, device="cpu")
    assert report.failed and any(expected[-1] in c.detail for c in report.failed)


def test_nan_weight_refused_at_load_naming_the_tensor(demo_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(demo_model_dir, tmp_path / "model")
    key = _poison(folder)
    with pytest.raises(InferenceError, match="NaN or inf") as refused:
        load_model(folder, device="cpu")
    assert key in str(refused.value)
    report = diagnose(folder, device="cpu")
    assert [c.name for c in report.failed] == ["weights finite"] and key in report.failed[0].detail


def test_config_edit_changes_the_model_identity(demo_model_dir: Path, tmp_path: Path) -> None:
    folder = _copy(demo_model_dir, tmp_path / "model")
    before = config_fingerprint(folder)
    _edit_config(folder, lambda c: c.update(template="internlm2_chat"))
    assert config_fingerprint(folder) != before


def test_intact_folder_passes_every_check(demo_model_dir: Path) -> None:
    report = diagnose(demo_model_dir, device="cpu")
    assert not report.failed, str(report)
    names = {c.name for c in report.checks}
    assert {"remote code importable", "weights complete", "weights finite", "tokenizer tokens",
            "vocab_size vs tokenizer", "transformers version", "device plan and memory", "dtype"} <= names
    assert "Model folder check" in report._repr_html_()
    files = next(c for c in report.checks if c.name == "remote code files").detail
    assert "AutoModel → modeling_sa2va_demo." in files and "{" not in files  # read as text, not a Python dict
    loaded = load_model(demo_model_dir, device="cpu")
    assert all(torch.isfinite(p).all() for p in loaded.model.parameters())


def test_doctor_warns_when_config_dtype_is_not_what_is_stored(demo_model_dir: Path, tmp_path: Path) -> None:
    """``torch_dtype="auto"`` loads weights in the dtype config.json states: a config saying another dtype than the
    shards hold (an edit, or a converter rewriting only one of "dtype" / "torch_dtype") is named with the fix."""
    intact = next(c for c in diagnose(demo_model_dir, device="cpu").checks if c.name == "dtype")
    assert intact.status == "ok", intact.detail
    edited = _copy(demo_model_dir, tmp_path / "model")
    stored = {t.dtype for t in load_file(_first_shard(edited)).values()}
    claimed = "float16" if torch.float16 not in stored else "bfloat16"
    _edit_config(edited, lambda c: c.update(dtype=claimed))
    check = next(c for c in diagnose(edited, device="cpu").checks if c.name == "dtype")
    assert check.status == "warn"
    assert f"loads these weights as {claimed}" in check.detail and "Set every one of dtype" in check.detail


def test_doctor_cli_exit_codes(demo_model_dir: Path, tmp_path: Path) -> None:
    ok = subprocess.run([sys.executable, "-m", "vesselnb.cli", "doctor", str(demo_model_dir), "--device", "cpu"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and "weights complete" in ok.stdout, ok.stderr
    broken = _copy(demo_model_dir, tmp_path / "model")
    _first_shard(broken).unlink()
    bad = subprocess.run([sys.executable, "-m", "vesselnb.cli", "doctor", str(broken), "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "FAILED" in bad.stdout and "names shards that are missing" in bad.stdout
