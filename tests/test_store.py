"""The prediction store: atomic per-sample files, identity checks, resume bookkeeping and merging of shard parts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from _store_fixtures import IDENTITY
from _store_fixtures import make_record as _record
from _store_fixtures import random_mask as _mask

from vesselnb.errors import StoreError
from vesselnb.store import (
    PredictionStore,
    merge_parts,
    part_name,
)


def test_round_trip_of_records_masks_and_probabilities(tmp_path: Path) -> None:
    store = PredictionStore.create_or_open(tmp_path / "predictions", **IDENTITY)
    prob = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    store.write(_record("b"), _mask(1), prob)
    store.write(_record("a", status="no_seg"), np.zeros((5, 7), bool))

    reread = PredictionStore(tmp_path / "predictions")
    assert reread.fingerprint == IDENTITY["fingerprint"]
    assert reread.sample_ids() == ["a", "b"]
    assert [r["sample_id"] for r in reread.records()] == ["a", "b"]
    np.testing.assert_array_equal(reread.mask("b"), _mask(1))
    assert reread.mask("b").dtype == bool
    np.testing.assert_array_equal(reread.probability("b"), prob)
    assert reread.probability("a") is None
    assert reread.record("b")["has_probability"] is True
    assert reread.status_counts() == {"ok": 1, "no_seg": 1, "error": 0}
    frame = reread.records_frame()
    assert list(frame["sample_id"]) == ["a", "b"] and "mask_resized_from" in frame.columns


def test_probability_png_reads_back_as_the_same_grey_levels_in_any_reader(tmp_path: Path) -> None:
    from PIL import Image

    store = PredictionStore.create_or_open(tmp_path, **IDENTITY)
    prob = np.arange(35, dtype=np.uint8).reshape(5, 7) * 7
    store.write(_record("p"), _mask(2), prob)
    with Image.open(tmp_path / "probs" / "p.png") as image:
        np.testing.assert_array_equal(np.array(image.convert("L")), prob)  # what a viewer shows
    np.testing.assert_array_equal(store.probability("p"), prob)


def test_mask_png_is_one_bit(tmp_path: Path) -> None:
    from PIL import Image

    store = PredictionStore.create_or_open(tmp_path, **IDENTITY)
    store.write(_record("x"), _mask(3))
    with Image.open(tmp_path / "masks" / "x.png") as image:
        assert image.mode == "1"


def test_reopening_with_another_fingerprint_prompt_or_mode_is_refused(tmp_path: Path) -> None:
    PredictionStore.create_or_open(tmp_path, **IDENTITY).write(_record("a"), _mask(0))
    for key, other in (("fingerprint", "fedcba9876543210"), ("model_config", "11bb11bb11bb11bb"),
                       ("prompt", "<image>Other."), ("mode", "video")):
        with pytest.raises(StoreError, match=key):
            PredictionStore.create_or_open(tmp_path, **{**IDENTITY, key: other})
    # The same identity reopens and keeps what was there.
    assert PredictionStore.create_or_open(tmp_path, **IDENTITY).sample_ids() == ["a"]


def test_malformed_writes_are_refused(tmp_path: Path) -> None:
    store = PredictionStore.create_or_open(tmp_path, **IDENTITY)
    with pytest.raises(StoreError, match="shape"):
        store.write(_record("a"), np.zeros((4, 4), bool))
    with pytest.raises(StoreError, match="malformed"):
        store.write({**_record("a"), "status": "great"}, _mask(0))
    with pytest.raises(StoreError, match="uint8"):
        store.write(_record("a"), _mask(0), np.zeros((5, 7), np.float32))
    assert store.sample_ids() == []


def test_missing_store_and_missing_sample_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="run the inference stage"):
        PredictionStore(tmp_path)
    store = PredictionStore.create_or_open(tmp_path, **IDENTITY)
    with pytest.raises(StoreError, match="rerun inference"):
        store.mask("nope")


def test_predictions_hash_depends_on_masks_and_ids_only(tmp_path: Path) -> None:
    first = PredictionStore.create_or_open(tmp_path / "one", **IDENTITY)
    second = PredictionStore.create_or_open(tmp_path / "two", **{**IDENTITY, "fingerprint": "ffffffffffffffff"})
    for store in (first, second):
        store.write(_record("a"), _mask(1))
        store.write(_record("b"), _mask(2))
    assert first.predictions_hash() == second.predictions_hash()
    second.write(_record("b"), _mask(3))
    assert first.predictions_hash() != second.predictions_hash()


def test_a_writer_killed_mid_file_leaves_no_record(tmp_path: Path) -> None:
    """A real process is SIGKILLed while its record is half written: the sample has no record, a rerun redoes it."""
    store_dir = tmp_path / "predictions"
    PredictionStore.create_or_open(store_dir, **IDENTITY).write(_record("done"), _mask(1))
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        import vesselnb.store as st
        def half_then_die(path, data, *, durable=False):
            tmp = path.with_name(f".{{path.name}}.{{os.getpid()}}.tmp")
            tmp.write_bytes(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        st.atomic_write_bytes = half_then_die
        store = st.PredictionStore.create_or_open({str(store_dir)!r}, **{IDENTITY!r})
        store.write({_record("inflight")!r}, np.ones((5, 7), bool))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr.decode()
    assert list((store_dir / "records").glob(".*.tmp")), "the killed writer should have left a half-written record"

    store = PredictionStore.create_or_open(store_dir, **IDENTITY)  # reopening cleans the dead writer's temporaries
    assert store.sample_ids() == ["done"]
    assert not list((store_dir / "records").glob(".*.tmp"))
    store.write(_record("inflight"), _mask(5))  # redoing the sample replaces its orphaned mask
    np.testing.assert_array_equal(store.mask("inflight"), _mask(5))


def _write_part(root: Path, shard: tuple[int, int], ids: list[str], complete: bool = True, **identity) -> None:
    part = PredictionStore.create_or_open(root / "parts" / part_name(shard), **{**IDENTITY, **identity})
    for sample_id in ids:
        part.write(_record(sample_id), _mask(ord(sample_id[0])))
    if complete:
        part.mark_part_complete(len(ids))


def test_merge_of_two_parts_equals_a_single_store(tmp_path: Path) -> None:
    single = PredictionStore.create_or_open(tmp_path / "single", **IDENTITY)
    for sample_id in "abcd":
        single.write(_record(sample_id), _mask(ord(sample_id)))
    merged_dir = tmp_path / "merged"
    _write_part(merged_dir, (0, 2), ["a", "c"])
    _write_part(merged_dir, (1, 2), ["b", "d"])
    with pytest.raises(StoreError, match="merge-predictions"):
        PredictionStore(merged_dir)

    report = merge_parts(merged_dir)
    assert report.copied == 4 and sorted(report.parts) == ["0-of-2", "1-of-2"]
    merged = PredictionStore(merged_dir)
    assert merged.predictions_hash() == single.predictions_hash()
    assert not (merged_dir / "parts").exists()
    assert merge_parts(merged_dir).copied == 0  # idempotent


def test_merge_leaves_unfinished_parts_and_refuses_other_models(tmp_path: Path) -> None:
    _write_part(tmp_path, (0, 2), ["a"])
    _write_part(tmp_path, (1, 2), ["b"], complete=False)
    report = merge_parts(tmp_path)
    assert report.incomplete_parts == ["1-of-2"] and report.copied == 1
    with pytest.warns(UserWarning, match="unmerged"):
        assert PredictionStore(tmp_path).sample_ids() == ["a"]

    other = tmp_path / "other"
    _write_part(other, (0, 2), ["a"])
    _write_part(other, (1, 2), ["b"], fingerprint="ffffffffffffffff")
    with pytest.raises(StoreError, match="fingerprint"):
        merge_parts(other)


def test_merge_refuses_a_sample_stored_twice_with_different_masks(tmp_path: Path) -> None:
    PredictionStore.create_or_open(tmp_path, **IDENTITY).write(_record("a"), _mask(1))
    part = PredictionStore.create_or_open(tmp_path / "parts" / "0-of-1", **IDENTITY)
    part.write(_record("a"), _mask(2))
    part.mark_part_complete(1)
    with pytest.raises(StoreError, match="different mask"):
        merge_parts(tmp_path)


def test_store_json_follows_the_contract(tmp_path: Path) -> None:
    PredictionStore.create_or_open(tmp_path, **IDENTITY)
    meta = json.loads((tmp_path / "store.json").read_text())
    assert {"format", "fingerprint", "model_dir", "prompt", "mode", "created", "probability_maps"} <= set(meta)
    assert meta["format"] == 1
    assert os.listdir(tmp_path / "records") == []


def test_merge_predictions_cli_reports_unfinished_shards(tmp_path: Path, capsys) -> None:
    from vesselnb.cli import main

    _write_part(tmp_path / "predictions", (0, 2), ["a"])
    _write_part(tmp_path / "predictions", (1, 2), ["b"], complete=False)
    assert main(["merge-predictions", str(tmp_path)]) == 1  # the run folder is accepted as well
    captured = capsys.readouterr()
    assert "1 samples copied" in captured.out and "1-of-2" in captured.err
    assert main(["merge-predictions", str(tmp_path / "predictions"), "--allow-incomplete"]) == 0
    assert PredictionStore(tmp_path / "predictions").sample_ids() == ["a", "b"]


def test_parts_are_complete_only_when_every_shard_has_finished(tmp_path: Path) -> None:
    from vesselnb.store import all_parts_complete

    _write_part(tmp_path, (0, 3), ["a"])
    _write_part(tmp_path, (1, 3), ["b"])
    assert not all_parts_complete(tmp_path, 3)  # shard 2 has not even started
    _write_part(tmp_path, (2, 3), ["c"], complete=False)
    assert not all_parts_complete(tmp_path, 3)
    PredictionStore.create_or_open(tmp_path / "parts" / "2-of-3", **IDENTITY).mark_part_complete(1)
    assert all_parts_complete(tmp_path, 3)
