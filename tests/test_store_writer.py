"""The store writers: the writer process (and the thread fallback) store every sample handed over, in order, refuse
bad input at once, raise failed writes, survive the caller's death and report their own."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from _store_fixtures import IDENTITY
from _store_fixtures import make_record as _record
from _store_fixtures import random_mask as _mask

from vesselnb import store_writer
from vesselnb.errors import StoreError
from vesselnb.store import PredictionStore
from vesselnb.store_writer import ProcessWriter, ThreadWriter

WRITERS = [ProcessWriter, ThreadWriter]


def _prob(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (5, 7), dtype=np.uint8)


@pytest.mark.parametrize("writer_class", WRITERS)
def test_writer_stores_every_sample_as_store_write_would(writer_class, tmp_path: Path) -> None:
    store = PredictionStore.create_or_open(tmp_path / "bg", **IDENTITY)
    direct = PredictionStore.create_or_open(tmp_path / "direct", **IDENTITY)
    with writer_class(store, max_pending=2) as writer:
        for index in range(9):
            writer.put(_record(f"s{index}"), _mask(index), _prob(index) if index % 2 else None)
            direct.write(_record(f"s{index}"), _mask(index), _prob(index) if index % 2 else None)
    assert store.sample_ids() == [f"s{i}" for i in range(9)]  # all stored once the writer is closed
    assert store.predictions_hash() == direct.predictions_hash()  # same bytes as writing in this process
    np.testing.assert_array_equal(store.probability("s3"), _prob(3))
    assert store.probability("s2") is None


@pytest.mark.parametrize("writer_class", WRITERS)
def test_bad_input_is_refused_in_put_and_nothing_is_written(writer_class, tmp_path: Path) -> None:
    store = PredictionStore.create_or_open(tmp_path, **IDENTITY)
    with writer_class(store) as writer:
        with pytest.raises(StoreError, match="wrong_size.*frame size"):
            writer.put(_record("wrong_size"), _mask(9, height=4))
        with pytest.raises(StoreError, match="uint8"):
            writer.put(_record("float_map"), _mask(1), np.zeros((5, 7), np.float32))
        writer.put(_record("fine"), _mask(2))
    assert store.sample_ids() == ["fine"]


@pytest.mark.parametrize("writer_class", WRITERS)
def test_a_write_that_fails_is_raised_with_the_sample_named(writer_class, tmp_path: Path) -> None:
    store = PredictionStore.create_or_open(tmp_path / "predictions", **IDENTITY)
    (store.path / "masks").rmdir()
    (store.path / "masks").write_text("a file where the masks folder should be")  # every mask write now fails
    writer = writer_class(store)
    writer.put(_record("doomed"), _mask(1))
    with pytest.raises(StoreError, match="doomed"):
        writer.close()
    assert "doomed" not in store


def test_the_writer_process_is_reused_by_the_next_run_and_survives_a_failed_one(tmp_path: Path) -> None:
    good = PredictionStore.create_or_open(tmp_path / "good", **IDENTITY)
    with ProcessWriter(good) as writer:
        writer.put(_record("a"), _mask(1))
    first_pid = store_writer._shared.process.pid

    bad = PredictionStore.create_or_open(tmp_path / "bad", **IDENTITY)
    (bad.path / "records").rmdir()  # records cannot be written
    with pytest.raises(StoreError, match="storing sample 'x'"):
        with ProcessWriter(bad) as writer:
            for sample_id in ("x", "y", "z"):
                writer.put(_record(sample_id), _mask(2))
            writer.close()
    with ProcessWriter(good) as writer:  # the answers of the failed run do not leak into this one
        writer.put(_record("b"), _mask(3))
    assert store_writer._shared.process.pid == first_pid
    assert good.sample_ids() == ["a", "b"]


def test_a_second_writer_at_the_same_time_gets_its_own_process(tmp_path: Path) -> None:
    one = PredictionStore.create_or_open(tmp_path / "one", **IDENTITY)
    two = PredictionStore.create_or_open(tmp_path / "two", **IDENTITY)
    with ProcessWriter(one) as first, ProcessWriter(two) as second:
        assert first._process is not second._process
        first.put(_record("a"), _mask(1))
        second.put(_record("b"), _mask(2))
    assert one.sample_ids() == ["a"] and two.sample_ids() == ["b"]
    assert second._process.process.poll() is not None  # the private one has exited


def test_a_dead_writer_process_is_reported_and_replaced(tmp_path: Path) -> None:
    store = PredictionStore.create_or_open(tmp_path, **IDENTITY)
    writer = ProcessWriter(store)
    victim = writer._process.process
    victim.kill()
    victim.wait()
    with pytest.raises(StoreError, match=f"writer process \\(pid {victim.pid}\\) stopped.*predicted again"):
        for index in range(8):  # the pipe may take a few before the death shows
            writer.put(_record(f"s{index}"), _mask(index))
        writer.close()
    with ProcessWriter(store) as fresh:
        assert fresh._process.process.pid != victim.pid
        fresh.put(_record("after"), _mask(1))
    assert "after" in store


def test_the_caller_killed_leaves_every_handed_over_sample_stored_and_the_child_exits(tmp_path: Path) -> None:
    """kill -9 of the caller: the child stores the complete samples it was sent, sees end-of-file and exits."""
    store_dir = tmp_path / "predictions"
    pid_file = tmp_path / "child.pid"
    script = textwrap.dedent(f"""
        import os, signal, numpy as np
        from pathlib import Path
        from vesselnb.store import PredictionStore
        from vesselnb.store_writer import ProcessWriter
        store = PredictionStore.create_or_open({str(store_dir)!r}, **{IDENTITY!r})
        writer = ProcessWriter(store, max_pending=50)
        Path({str(pid_file)!r}).write_text(str(writer._process.process.pid))
        for index in range(30):
            record = {_record("X")!r}
            record["sample_id"] = f"s{{index:02d}}"
            writer.put(record, np.ones((5, 7), bool), np.full((5, 7), index, np.uint8))
        os.kill(os.getpid(), signal.SIGKILL)  # with up to 30 samples handed over and unanswered
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.05)
    assert not _alive(child), "the writer process outlived its caller"
    store = PredictionStore(store_dir)
    assert store.sample_ids() == [f"s{i:02d}" for i in range(30)]
    np.testing.assert_array_equal(store.probability("s29"), np.full((5, 7), 29, np.uint8))
    assert not list(store_dir.glob("*/.*.tmp"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.is_file() and "\nState:\tZ" in status.read_text())  # a zombie has exited
