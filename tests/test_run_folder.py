"""The run folder owner: layout, atomic JSON, one read error, the fingerprint rule, params round trip, manifest."""

from __future__ import annotations

import datetime
import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from vesselnb.errors import ParamsError, StoreError, VesselnbError
from vesselnb.fingerprint import weights_fingerprint
from vesselnb.params import RunParams, load_params
from vesselnb.run_folder import (
    RunFolder,
    atomic_write_bytes,
    now_iso,
    output_folders,
    read_json,
    temp_owner_pid,
    write_json,
)
from vesselnb.stages import RUN_STAGES


def _params_file(folder: Path, name: str = "r1", **extra: object) -> Path:
    (folder / "images").mkdir(parents=True, exist_ok=True)
    content = {"run_name": name, "checkpoint": {"path": "ckpt/iter_120.pth"}, "data": {"images": "images"}, **extra}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content), encoding="utf-8")
    return path


def _hf_folder(path: Path, value: float = 1.0) -> Path:
    """A finished HF-style weights folder (one real safetensors file)."""
    path.mkdir(parents=True, exist_ok=True)
    save_file({"w": np.full((4, 4), value, dtype=np.float32)}, str(path / "model.safetensors"))
    (path / "config.json").write_text("{}", encoding="utf-8")
    return path


def test_now_iso_is_utc_iso8601() -> None:
    stamp = datetime.datetime.fromisoformat(now_iso())
    assert stamp.utcoffset() == datetime.timedelta(0)
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 5


def test_write_json_round_trips_and_leaves_no_temporary(tmp_path: Path) -> None:
    path = write_json(tmp_path / "deep" / "x.json", {"a": 1, "p": Path("/x")})
    assert read_json(path) == {"a": 1, "p": "/x"}
    write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]


def test_atomic_write_needs_its_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write_bytes(tmp_path / "gone" / "x.json", b"{}")
    assert not (tmp_path / "gone").exists()


def test_a_writer_killed_mid_write_keeps_the_old_file(tmp_path: Path) -> None:
    """SIGKILL after the temporary is written but before the rename: readers still see the old, whole file."""
    target = write_json(tmp_path / "conversion.json", {"fingerprint": "old"})
    script = textwrap.dedent(f"""
        import os, signal
        import vesselnb.run_folder as rf
        def die(src, dst):
            os.kill(os.getpid(), signal.SIGKILL)
        rf.os.replace = die
        rf.write_json({str(target)!r}, {{"fingerprint": "new"}})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, stderr.decode()
    assert read_json(target) == {"fingerprint": "old"}
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert [temp_owner_pid(p) for p in leftovers] == [proc.pid]  # its pid lets a later writer clean it up


def test_read_json_names_the_file_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(VesselnbError, match=r"missing\.json: file not found; rerun"):
        read_json(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(StoreError, match=r"bad\.json: cannot read this JSON file .*; delete it"):
        read_json(tmp_path / "bad.json", error=StoreError, fix="delete it")


def test_folder_reads_are_none_before_the_stage_and_errors_when_damaged(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run").create()
    assert folder.conversion() is None and folder.summary() is None and folder.store_meta() is None
    folder.conversion_path.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(VesselnbError, match="conversion.json: expected a JSON object"):
        folder.conversion()
    folder.summary_path.parent.mkdir(parents=True)
    folder.summary_path.write_text("{", encoding="utf-8")
    with pytest.raises(VesselnbError, match="summary.json: cannot read"):
        folder.summary()


def test_params_round_trip(tmp_path: Path) -> None:
    params = load_params(_params_file(tmp_path, analysis={"compare_to": ["other"]}), check_paths=False)
    again = RunParams.from_dict(json.loads(json.dumps(params.to_dict())))
    assert again == params
    with pytest.raises(ParamsError, match="manifest.json: unknown key 'data.imgs'"):
        RunParams.from_dict({"data": {"imgs": "x"}}, source=tmp_path / "manifest.json")


def test_manifest_records_params_and_stages(tmp_path: Path) -> None:
    params = load_params(_params_file(tmp_path), check_paths=False)
    folder = RunFolder(tmp_path / "outputs" / params.run_name)
    outcomes = folder.begin_run(params, RUN_STAGES[:2])
    first = folder.manifest()
    assert first["status"] == "incomplete" and first["stages"]["convert"]["status"] == "pending"
    assert first["stages"]["analyze"]["status"] == "not_run"
    folder.begin_stage(params, outcomes["convert"])
    assert folder.manifest()["status"] == "running"
    outcomes["convert"].status = "ok"
    outcomes["convert"].finished = now_iso()
    folder.write_conversion({"fingerprint": "f" * 16, "source": {"path": "/c/iter_7.pth", "bytes": 1}})
    folder.end_stage(params, outcomes["convert"])
    manifest = folder.manifest()
    assert manifest["created"] == first["created"]
    assert manifest["stages"]["convert"]["status"] == "ok"
    assert manifest["weights_fingerprint"] == "f" * 16
    assert manifest["source_checkpoint"]["path"] == "/c/iter_7.pth"
    for key in ("created", "updated"):
        assert datetime.datetime.fromisoformat(manifest[key]).utcoffset() == datetime.timedelta(0)
    assert folder.params() == params
    assert folder.iteration() == 7  # the checkpoint stage 01 recorded, not the params' guess
    assert manifest["iteration"] == 7


def test_hf_folder_rule(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path / "run")
    params = load_params(_params_file(tmp_path), check_paths=False)
    assert folder.hf_dir(params) == folder.path / "hf_model"
    params.checkpoint.hf_output = tmp_path / "out"
    assert folder.hf_dir(params) == tmp_path / "out"
    params.hf_model = tmp_path / "given"
    assert folder.hf_dir(params) == tmp_path / "given"
    hf = _hf_folder(tmp_path / "elsewhere")
    folder.create().write_conversion({"output_dir": str(hf)})
    assert folder.hf_dir() == hf  # no manifest: where conversion wrote


def test_fingerprint_rule(tmp_path: Path) -> None:
    params = load_params(_params_file(tmp_path), check_paths=False)
    folder = RunFolder(tmp_path / "run").create()
    assert folder.fingerprint(params).value is None
    folder.predictions_dir.mkdir()
    write_json(folder.store_meta_path, {"format": 1, "fingerprint": "s" * 16})
    assert folder.fingerprint(params).source == "predictions/store.json"
    folder.write_conversion({"fingerprint": "c" * 16, "output_dir": str(folder.default_hf_dir)})
    assert folder.weights_fingerprint(params) == "c" * 16
    hf = _hf_folder(folder.default_hf_dir)
    computed = folder.fingerprint(params)
    assert computed.value == weights_fingerprint(hf) != "c" * 16 and computed.source.startswith("computed from")
    assert folder.weights_fingerprint(params, compute=False) == "c" * 16
    folder.write_conversion({"fingerprint": "c" * 16, "output_dir": str(tmp_path / "another")})
    assert folder.weights_fingerprint(params, compute=False) == "s" * 16  # a record of other weights is not ours
    (hf / "model.safetensors").unlink()
    with pytest.raises(VesselnbError, match="not a finished HF folder"):
        folder.weights_fingerprint(params)


def test_iteration_rule(tmp_path: Path) -> None:
    params = load_params(_params_file(tmp_path), check_paths=False)
    assert RunFolder(tmp_path / "run").iteration(params) == 120
    params.iteration = 5
    assert RunFolder(tmp_path / "run").iteration(params) == 5
    params.iteration, params.checkpoint.path = None, None
    assert RunFolder(tmp_path / "sa2va_iter_300").iteration(params) == 300
    assert RunFolder(tmp_path / "plain").iteration(params) is None


def test_neighbours_are_sibling_runs_and_extra_folders(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    for name in ("a", "b", "_demo_assets", ".hidden", "compare_a_vs_b"):
        (outputs / name).mkdir(parents=True)
    (outputs / "index.html").write_text("", encoding="utf-8")
    (tmp_path / "far").mkdir()
    names = [f.name for f in RunFolder(outputs / "a").neighbours(extra=[tmp_path / "far", outputs / "b"])]
    assert sorted(names) == ["b", "far"]
    assert RunFolder(outputs / "a").neighbours() == [RunFolder(outputs / "b")]


def test_output_folders_lists_runs_and_comparisons(tmp_path: Path) -> None:
    for name in ("a", "compare_a_vs_b", "_demo_assets", "nomanifest"):
        (tmp_path / name).mkdir()
        if name != "nomanifest":
            write_json(tmp_path / name / "manifest.json", {})
    runs, comparisons = output_folders(tmp_path)
    assert [r.name for r in runs] == ["a"] and [c.name for c in comparisons] == ["compare_a_vs_b"]


def test_load_params_builds_nothing_and_names_the_demo_command(tmp_path: Path) -> None:
    path = _params_file(tmp_path, demo_root="assets", checkpoint={"path": "assets/work/iter_50.pth"})
    with pytest.raises(ParamsError, match=r"does not exist\. Build the demo assets under .*assets first \(`vesselnb"):
        load_params(path)
    assert not (tmp_path / "assets").exists()
