"""Wrong inputs conversion must refuse before writing: absent trained parts, another base, an occupied --out, a disk
too small (a real tmpfs). Each gives one clear error naming the keys and the fix, exits non-zero and leaves nothing
at the target; the explicit flag allows it with a red banner. Checkpoints are written by mmengine's save_checkpoint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _convert_fixtures import LOSSES, _save, make_base_folder, make_training_checkpoint, write_training_config

from vesselnb.convert import convert_checkpoint
from vesselnb.convert.writer import FREE_BYTES_ENV
from vesselnb.errors import ConversionError
from vesselnb.fingerprint import weights_fingerprint

SHARD = "20KB"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("refusals")
    base = make_base_folder(root / "base")
    other_base = make_base_folder(root / "other_base", seed=7)  # same shapes, other weights
    config = write_training_config(root / "sa2va_tiny.py", base)
    ckpt = make_training_checkpoint(base, root / "work_dirs" / "iter_10.pth", seed=1)
    return {"root": root, "base": base, "other_base": other_base, "config": config, "ckpt": ckpt}


def _without(world: dict, tmp_path: Path, drop: str) -> Path:
    state = {k: v for k, v in world["ckpt"].state_dict.items() if drop not in k}
    assert len(state) < len(world["ckpt"].state_dict)
    path = tmp_path / f"iter_without_{drop.strip('.')}.pth"
    _save(state, path, "mmengine")
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vesselnb.cli", *args], capture_output=True, text=True, timeout=300)


def test_report_shows_meta_and_message_hub(world: dict, tmp_path: Path) -> None:
    report = convert_checkpoint(
        world["ckpt"].path, world["base"], tmp_path / "hf", training_config=world["config"], shard_size=SHARD
    )
    info = report.training_info
    assert info["iter"] == len(LOSSES) and info["epoch"] == 0 and info["time"] == "20250101_120000"
    assert report.loss_history == pytest.approx(LOSSES)
    table = report.training_table
    assert {"iter", "time", "seed", "train/loss"} <= set(table["field"])
    assert "message_hub" in report._repr_html_() and "training: iter=10" in str(report)
    assert report.config_fingerprint and report.config_fingerprint in report._repr_html_()


@pytest.mark.parametrize(
    ("drop", "named"),
    [
        ("sam_mask_decoder", "SAM2 mask decoder"),
        ("text_hidden_fcs", "text_hidden_fcs"),
        ("mlp1", "projector mlp1"),
        ("lora_", "LLM LoRA pairs"),
    ],
)
def test_absent_trained_component_refused_then_allowed(world: dict, tmp_path: Path, drop: str, named: str) -> None:
    path = _without(world, tmp_path, drop)
    out = tmp_path / "hf"
    with pytest.raises(ConversionError, match=re.escape(named)) as refused:
        convert_checkpoint(path, world["base"], out, training_config=world["config"], shard_size=SHARD)
    assert "--allow-missing-components" in str(refused.value)
    assert not out.exists() and not list(tmp_path.glob(".hf.partial-*"))
    allowed = convert_checkpoint(
        path, world["base"], out, training_config=world["config"], shard_size=SHARD, allow_missing_components=True
    )
    assert any(w.startswith("ALLOWED missing trained components") and named in w for w in allowed.warnings)
    assert "#b00020" in allowed._repr_html_()


def test_absent_component_cli_is_one_line_nonzero(world: dict, tmp_path: Path) -> None:
    path = _without(world, tmp_path, "sam_mask_decoder")
    out = tmp_path / "hf"
    result = _cli("convert", str(path), "--base", str(world["base"]), "--config", str(world["config"]),
                  "--out", str(out))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "sam_mask_decoder" in result.stderr and "--allow-missing-components" in result.stderr
    assert not out.exists()


def test_wrong_base_refused_by_frozen_copies_and_by_config(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    # Without a config: the checkpoint's original_module copies (lm_head, embed_tokens) are not the other base's.
    with pytest.raises(ConversionError, match="frozen copies") as frozen:
        convert_checkpoint(world["ckpt"].path, world["other_base"], out, lora_r=4, lora_alpha=8, shard_size=SHARD)
    assert "original_module" in str(frozen.value) and "--allow-frozen-mismatch" in str(frozen.value)
    # With the config: it names another base folder.
    with pytest.raises(ConversionError, match="names the base") as other:
        convert_checkpoint(world["ckpt"].path, world["other_base"], out, training_config=world["config"])
    assert "--allow-other-base" in str(other.value)
    assert not out.exists()
    allowed = convert_checkpoint(
        world["ckpt"].path, world["other_base"], out, training_config=world["config"], shard_size=SHARD,
        allow_other_base=True, allow_frozen_mismatch=True,
    )
    prefixes = {w.split(":")[0] for w in allowed.warnings}
    assert prefixes >= {"ALLOWED other base", "ALLOWED frozen copies differing from the base"}


def test_right_base_under_another_name_vouched_by_frozen_copies(world: dict, tmp_path: Path) -> None:
    """The config names its base by one path; the user gives the same weights under another name (as with the
    Sa2VA HF release of the InternVL base): the frozen copies equal it, so conversion goes on with a warning."""
    renamed = tmp_path / "Sa2VA-release-copy"
    shutil.copytree(world["base"], renamed)
    out = tmp_path / "hf"
    report = convert_checkpoint(world["ckpt"].path, renamed, out, training_config=world["config"], shard_size=SHARD)
    vouched = [w for w in report.warnings if "frozen copies in the checkpoint equal its tensors" in w]
    assert len(vouched) == 1 and "names the base" in vouched[0]
    assert (out / "config.json").is_file()


def test_out_over_existing_folder_needs_overwrite_checked_first(world: dict, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    first = convert_checkpoint(
        world["ckpt"].path, world["base"], out, training_config=world["config"], shard_size=SHARD
    )
    second_ckpt = make_training_checkpoint(world["base"], tmp_path / "iter_20.pth", seed=2)
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_checkpoint(second_ckpt.path, world["base"], out, training_config=world["config"], shard_size=SHARD)
    assert weights_fingerprint(out) == first.fingerprint
    replaced = convert_checkpoint(
        second_ckpt.path, world["base"], out, training_config=world["config"], shard_size=SHARD, overwrite=True
    )
    assert replaced.fingerprint != first.fingerprint
    assert weights_fingerprint(out) == replaced.fingerprint
    # A folder vesselnb did not write: refused before the checkpoint is even read (this one is garbage).
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConversionError, match="not written by vesselnb"):
        convert_checkpoint(garbage, world["base"], foreign, training_config=world["config"], overwrite=True)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def _mount_tmpfs(point: Path, size: int) -> None:
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()})")


def _estimate(world: dict, out: Path, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv(FREE_BYTES_ENV, "1")
    with pytest.raises(ConversionError, match="needs at most") as refused:
        convert_checkpoint(world["ckpt"].path, world["base"], out, training_config=world["config"], shard_size=SHARD)
    monkeypatch.delenv(FREE_BYTES_ENV)
    return int(re.search(r"needs at most ([\d,]+) bytes", str(refused.value)).group(1).replace(",", ""))


def test_preflight_is_an_upper_bound_on_a_real_tmpfs(world: dict, tmp_path: Path, monkeypatch) -> None:
    point = tmp_path / "exact"
    needed = _estimate(world, point / "hf", monkeypatch)
    _mount_tmpfs(point, -(-needed // 4096) * 4096)  # a filesystem exactly as large as the estimate
    try:
        report = convert_checkpoint(
            world["ckpt"].path, world["base"], point / "hf", training_config=world["config"], shard_size=SHARD
        )
        used = shutil.disk_usage(point).used
        assert used <= needed and report.output_bytes <= needed
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_disk_full_mid_write_one_line_and_no_partial_folder(world: dict, tmp_path: Path, monkeypatch) -> None:
    point = tmp_path / "small"
    needed = _estimate(world, point / "hf", monkeypatch)
    _mount_tmpfs(point, needed // 3 // 4096 * 4096)
    try:
        with pytest.raises(ConversionError, match="disk filled up") as full:
            convert_checkpoint(
                world["ckpt"].path, world["base"], point / "hf", training_config=world["config"], shard_size=SHARD,
                check_free_space=False,
            )
        assert "\n" not in str(full.value)
        assert list(point.iterdir()) == []
        result = _cli("convert", str(world["ckpt"].path), "--base", str(world["base"]), "--config",
                      str(world["config"]), "--out", str(point / "hf"), "--shard-size", SHARD, "--no-free-space-check")
        assert result.returncode != 0 and "disk filled up" in result.stderr and "Traceback" not in result.stderr
        assert list(point.iterdir()) == []
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_frozen_copy_check_samples_large_tensors() -> None:
    from vesselnb.convert.checks import frozen_mismatches

    base = torch.randn(3000, 2000)
    shapes = {"language_model.lm_head.weight": (3000, 2000)}
    same = {"mllm.model.language_model.base_model.model.lm_head.original_module.weight": base.clone()}
    compared, bad = frozen_mismatches(same, shapes, lambda key: base)
    assert compared == 1 and bad == []
    other = {next(iter(same)): torch.randn(3000, 2000)}
    _, bad = frozen_mismatches(other, shapes, lambda key: base)
    assert [m.hf_key for m in bad] == ["language_model.lm_head.weight"] and bad[0].rel_diff > 0.5


def test_last_checkpoint_outside_the_work_dir_is_not_followed(world: dict, tmp_path: Path) -> None:
    from vesselnb.convert.checkpoint import resolve_checkpoint
    from vesselnb.errors import CheckpointError

    work = tmp_path / "copied_work_dir"
    work.mkdir()
    (work / "last_checkpoint").write_text(str(world["ckpt"].path))  # another run's file, by absolute path
    with pytest.raises(CheckpointError, match="outside this work dir"):
        resolve_checkpoint(work)
    shutil.copy(world["ckpt"].path, work / world["ckpt"].path.name)
    assert resolve_checkpoint(work) == work / world["ckpt"].path.name


def test_given_hf_model_with_a_missing_shard_refused_at_stage_01(world: dict, tmp_path: Path) -> None:
    from vesselnb.convert import convert_stage
    from vesselnb.params import RunParams

    folder = tmp_path / "given"
    shutil.copytree(world["base"], folder)
    next(folder.glob("model-*.safetensors")).unlink()
    with pytest.raises(ConversionError, match="shards named in .* are missing"):
        convert_stage(RunParams(hf_model=folder), tmp_path / "run")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_non_finite_check_exact_even_when_the_fast_sum_overflows(dtype: torch.dtype) -> None:
    from vesselnb.convert.checks import has_non_finite

    big = torch.full((1000,), torch.finfo(dtype).max / 2, dtype=dtype)  # finite values whose sum overflows
    assert not has_non_finite(big)
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensor = torch.zeros(3 << 23, dtype=dtype)  # more than one chunk; the bad value in the second
        tensor[(1 << 24) + 5] = bad
        assert has_non_finite(tensor)
    assert not has_non_finite(torch.zeros(3 << 23, dtype=dtype))
