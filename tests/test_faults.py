"""Faults a user meets, each reproduced for real: a second process on the same folder (a real flock), Ctrl-C and
SIGTERM (real signals to a real ``vesselnb`` subprocess), a holder killed with ``kill -9``, a read-only and a full
filesystem (real tmpfs mounts when the machine allows it, else skipped), bad params files.

Every case asserts the one line the user sees, the exit code, and that nothing already done was lost.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from _infer_fixtures import REPO, cli_command, copy_frames, demo_model_dir, subprocess_env, write_params

from vesselnb.locks import LOCK_DIR, read_holders

N_FRAMES = 6
WAIT = 120.0  # seconds any single wait may take on a busy 2-core machine before the test gives up


# --- helpers ---------------------------------------------------------------------------------------------------------
def wait_until(condition: Callable[[], bool], proc: subprocess.Popen | None = None, timeout: float = WAIT) -> None:
    """Poll ``condition``; fail with the process's stderr if it ends first or the wait runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended (rc {proc.returncode}) before the condition held: {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail("condition not reached in time")
        time.sleep(0.05)


def records(run_dir: Path) -> list[Path]:
    """Stored samples of the run's store (merged store and shard parts)."""
    found = list((run_dir / "predictions" / "records").glob("*.json"))
    found += list((run_dir / "predictions" / "parts").glob("*/records/*.json"))
    return found


def start(command: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(command, env=subprocess_env(**env), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def run(command: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=subprocess_env(**env), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def vesselnb(*args: str) -> list[str]:
    return [sys.executable, "-m", "vesselnb.cli", *args]


def one_line(stderr: str) -> str:
    """The user-facing error: exactly one ``vesselnb:`` line and no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("vesselnb:")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``path`` (root only); the test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def frames(demo_assets, tmp_path_factory) -> Path:
    return copy_frames(demo_assets, tmp_path_factory.mktemp("fault_frames") / "images", N_FRAMES)


@pytest.fixture()
def params(demo_assets, frames, tmp_path) -> Path:
    return write_params(tmp_path / "faults.yaml", demo_model_dir(demo_assets), frames)


# --- locks and signals -----------------------------------------------------------------------------------------------
def test_second_writer_refused_then_sigint_stops_after_a_frame_and_rerun_resumes(params, frames, tmp_path) -> None:
    run_dir = tmp_path / "run"
    first = start(cli_command(params, run_dir), VESSELNB_TEST_SAMPLE_DELAY="1.5")
    wait_until(lambda: len(records(run_dir)) >= 1, first)
    first.send_signal(signal.SIGSTOP)  # paused mid-run, locks held, however slowly the second one starts
    try:
        second = run(cli_command(params, run_dir))
    finally:
        first.send_signal(signal.SIGCONT)
    first.send_signal(signal.SIGINT)
    line = one_line(second.stderr)
    assert second.returncode == 2
    assert f"pid {first.pid} on {socket.gethostname()} since " in line and "in use by" in line
    assert f"kill -INT {first.pid}" in line and str(run_dir) in line

    time.sleep(0.5)  # the signal is handled; now let the cell in progress finish
    (run_dir / "go").touch()
    _, stderr = first.communicate(timeout=WAIT)
    assert first.returncode == 130, stderr[-3000:]
    line = one_line(stderr.replace("vesselnb: SIGINT received", "(note) SIGINT received"))
    stopped = re.search(r"stopped by SIGINT after (\d+) of 6 frames", line)
    assert stopped, line
    done = int(stopped.group(1))
    assert 1 <= done < N_FRAMES
    assert len(records(run_dir)) == done  # every frame counted as done is stored, and nothing half-written
    assert read_holders(run_dir / "predictions" / LOCK_DIR) == []  # the lock was released with its note

    rerun = run(cli_command(params, run_dir))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    stored = [json.loads(p.read_text()) for p in records(run_dir)]
    assert sorted(r["sample_id"] for r in stored) == sorted(p.stem for p in frames.glob("*.jpg"))
    assert {r["status"] for r in stored} == {"ok"}


def test_sigterm_stops_after_the_current_frame_with_143(params, tmp_path) -> None:
    run_dir = tmp_path / "run"
    proc = start(cli_command(params, run_dir), VESSELNB_TEST_SAMPLE_DELAY="1.0")
    wait_until(lambda: len(records(run_dir)) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 143, stderr[-3000:]
    line = one_line(stderr.replace("vesselnb: SIGTERM received", "(note) SIGTERM received"))
    done = int(re.search(r"stopped by SIGTERM after (\d+) of 6 frames", line).group(1))
    assert len(records(run_dir)) == done


def test_lock_of_a_killed_holder_is_taken_over_with_a_note(params, tmp_path) -> None:
    run_dir = tmp_path / "run"
    holder = start([sys.executable, "-c",
                    "import sys, time; from vesselnb.run_folder import RunFolder\n"
                    f"lock = RunFolder({str(run_dir)!r}).store_locks()[0].acquire(); print('held', flush=True)\n"
                    "time.sleep(600)"])
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=WAIT)
    notes = read_holders(run_dir / "predictions" / LOCK_DIR)
    assert [n.pid for n in notes] == [holder.pid]  # the dead holder's note is still there; its flock is not

    proc = run(cli_command(params, run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"took over the prediction store lock of {run_dir / 'predictions'} left by pid {holder.pid}" in proc.stderr
    assert "no longer running" in proc.stderr
    assert len(records(run_dir)) == N_FRAMES
    assert read_holders(run_dir / "predictions" / LOCK_DIR) == []


def test_shards_of_one_infer_share_the_store_and_exclude_other_writers(params, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shards = [start(cli_command(params, run_dir, "--shard", f"{k}/2"), VESSELNB_TEST_SAMPLE_DELAY="0.5")
              for k in range(2)]
    for proc in shards:
        wait_until(lambda: len(read_holders(run_dir / "predictions" / LOCK_DIR)) == 2 and len(records(run_dir)) >= 1,
                   proc)
    for proc in shards:  # paused mid-run (SIGSTOP keeps their locks): the intruders meet two live writers
        proc.send_signal(signal.SIGSTOP)
    try:
        unsharded = start(cli_command(params, run_dir))
        same_shard = start(cli_command(params, run_dir, "--shard", "0/2"))
        unsharded_err, same_shard_err = (proc.communicate(timeout=WAIT)[1] for proc in (unsharded, same_shard))
    finally:
        for proc in shards:
            proc.send_signal(signal.SIGCONT)
    assert unsharded.returncode == 2 and same_shard.returncode == 2
    line = one_line(unsharded_err)
    assert "prediction store is in use by" in line and all(f"pid {p.pid}" in line for p in shards)
    assert f"shard 0/2 is in use by pid {shards[0].pid}" in one_line(same_shard_err)

    for proc in shards:
        _, stderr = proc.communicate(timeout=WAIT)
        assert proc.returncode == 0, stderr[-3000:]
    stored = list((run_dir / "predictions" / "records").glob("*.json"))
    assert len(stored) == N_FRAMES and not (run_dir / "predictions" / "parts").exists()


# --- params ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("edit", "expected"),
    [(lambda text: text + "run_name: again\n", r"key 'run_name' is given twice \(lines \d+ and \d+\)"),
     (lambda text: text.replace("device: cpu", "device: cpu\n  max_memory_per_gpu: lots"),
      r"key 'inference.max_memory_per_gpu' must be a size such as 70GiB")],
)
def test_bad_params_refused_before_anything_is_written(params, tmp_path, edit, expected) -> None:
    params.write_text(edit(params.read_text()))
    run_dir = tmp_path / "run"
    proc = run(cli_command(params, run_dir))
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert re.search(expected, line) and str(params) in line
    assert not run_dir.exists()


def test_image_glob_matching_nothing_refused_before_any_stage(params, tmp_path) -> None:
    params.write_text(params.read_text().replace("data:\n", "data:\n  image_glob: '*.png'\n"))
    run_dir = tmp_path / "run"
    proc = run(cli_command(params, run_dir))
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert "'data.image_glob' '*.png' matches no file" in line and "'*.jpg' files" in line
    assert not run_dir.exists()


# --- filesystems -----------------------------------------------------------------------------------------------------
def test_read_only_outputs_one_line_with_path_and_fix(params, tmp_path) -> None:
    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        proc = run(cli_command(params, mount / "run"))
        assert proc.returncode == 2
        line = one_line(proc.stderr)
        assert str(mount / "run") in line and "Read-only file system" in line and "--outputs" in line

        logs = tmp_path / "logs"
        proc = run(vesselnb("index", "--outputs", str(mount)), VESSELNB_LOG_DIR=str(logs))
        assert proc.returncode == 2
        line = one_line(proc.stderr)
        assert str(mount) in line and "read-only" in line
        log = Path(re.search(r"\(details: (\S+)\)", line).group(1))
        assert log.parent == logs and "Traceback" in log.read_text()


def test_full_disk_mid_run_loses_nothing_and_rerun_completes(params, tmp_path) -> None:
    with tmpfs(tmp_path / "small", "256k") as mount:
        filler = mount / "filler"
        run_dir = mount / "run"
        filler.write_bytes(b"\0" * (150 * 1024))  # room for a few frames only
        proc = run(cli_command(params, run_dir))
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = one_line(proc.stderr)
        assert "No space left on device" in line and str(run_dir / "predictions") in line
        assert "stored samples are kept" in line
        kept = records(run_dir)
        assert len(kept) < N_FRAMES
        for path in kept:  # whatever was stored is whole: its record parses and its mask exists
            record = json.loads(path.read_text())
            assert (run_dir / "predictions" / "masks" / f"{record['sample_id']}.png").stat().st_size > 0
        filler.unlink()
        rerun = run(cli_command(params, run_dir))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert len(records(run_dir)) == N_FRAMES
        shutil.rmtree(run_dir)


# --- `vesselnb run`: stand-in notebooks (real papermill kernels, no model) -------------------------------------------
# 01 has a cell that waits for a 'go' file (with STUB_WAIT set) followed by another: a stop must let the first
# finish and skip the second.
# 02 stores "frames" one by one and calls the real check_stop between them, as the inference loop does.
_STUB_CELLS = {
    "01_convert.ipynb": [
        "import os, pathlib, time\nrun = pathlib.Path(run_dir); run.mkdir(parents=True, exist_ok=True)\n"
        "(run / 'cell_a_started').touch()\n"
        "while os.environ.get('STUB_WAIT') and not (run / 'go').exists(): time.sleep(0.05)\n"
        "(run / 'cell_a_done').touch()",
        "(run / 'cell_b_done').touch()",
    ],
    "02_inference.ipynb": [
        "import os, pathlib, time\nfrom vesselnb.interrupts import check_stop\n"
        "records = pathlib.Path(run_dir) / 'predictions' / 'records'; records.mkdir(parents=True, exist_ok=True)\n"
        "n = int(os.environ.get('STUB_FRAMES', '3'))\n"
        "for i in range(n):\n"
        "    check_stop(f'after {len(list(records.glob(\"*.json\")))} of {n} frames (all stored)')\n"
        "    if (records / f'f{i}.json').exists(): continue\n"
        "    time.sleep(float(os.environ.get('STUB_FRAME_SECONDS', '0')))\n"
        "    (records / f'f{i}.json').write_text('{}')",
    ],
    "03_error_analysis.ipynb": [
        "import json, pathlib\nrun = pathlib.Path(run_dir); (run / 'analysis').mkdir(parents=True, exist_ok=True)\n"
        "(run / 'analysis' / 'summary.json').write_text(json.dumps({'n_samples': 3, 'status_counts': {'ok': 3},\n"
        "    'headline': {'dice': 0.8123, 'cldice': 0.7711, 'hd95': 4.5, 'ciou': 0.69}}))",
    ],
}


@pytest.fixture()
def stub_run(tmp_path) -> tuple[Path, Path, Path]:
    """(params file, notebooks folder, outputs folder) for `vesselnb run` on stand-in notebooks."""
    import nbformat
    from _spine_fixtures import write_params as write_stub_params

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    for name, cells in _STUB_CELLS.items():
        parameters = nbformat.v4.new_code_cell('params_path = "../params/demo.yaml"\nrun_dir = "../outputs/demo"')
        parameters.metadata["tags"] = ["parameters"]
        notebook = nbformat.v4.new_notebook(cells=[parameters, *(nbformat.v4.new_code_cell(c) for c in cells)])
        nbformat.write(notebook, str(notebooks / name))
    params = write_stub_params(tmp_path / "params" / "stub.yaml", "stub")
    return params, notebooks, tmp_path / "outputs"


def run_command(stub: tuple[Path, Path, Path]) -> list[str]:
    params, notebooks, outputs = stub
    return vesselnb("run", str(params), "--outputs", str(outputs), "--notebooks", str(notebooks), "--no-progress")


def manifest_of(run_dir: Path) -> dict:
    from vesselnb.run_folder import RunFolder

    return RunFolder(run_dir).manifest()


def test_run_second_refused_sigint_stops_after_the_cell_and_index_stays_honest(stub_run) -> None:
    run_dir = stub_run[2] / "stub"
    good = run(run_command(stub_run))
    assert good.returncode == 0, good.stderr[-3000:]
    index = (stub_run[2] / "index.html").read_text()
    assert "0.812" in index  # the good run's Dice, as current

    for marker in ("cell_a_started", "cell_a_done", "cell_b_done"):
        (run_dir / marker).unlink()
    first = start(run_command(stub_run), STUB_WAIT="1")
    wait_until(lambda: (run_dir / "cell_a_started").exists(), first)
    second = run(run_command(stub_run))
    assert second.returncode == 2
    line = one_line(second.stderr)
    assert f"{run_dir}: this run folder is in use by pid {first.pid} on {socket.gethostname()} since" in line
    assert "vesselnb run" in line and f"kill -INT {first.pid}" in line

    first.send_signal(signal.SIGINT)
    time.sleep(0.5)  # the signal is handled; now let the cell in progress finish
    (run_dir / "go").touch()
    _, stderr = first.communicate(timeout=WAIT)
    assert first.returncode == 130, stderr[-3000:]
    line = one_line(stderr.replace("vesselnb: SIGINT received", "(note) SIGINT received"))
    assert "stopped by SIGINT during stage 'convert' of 'stub'" in line and "01_convert.html" in line
    assert (run_dir / "cell_a_done").exists() and not (run_dir / "cell_b_done").exists()  # the cell finished, no more
    assert (run_dir / "01_convert.ipynb").is_file() and (run_dir / "01_convert.html").is_file()
    manifest = manifest_of(run_dir)
    assert manifest["status"] == "interrupted" and manifest["stages"]["convert"]["status"] == "interrupted"
    assert manifest["stages"]["infer"]["status"] == "pending"
    index = (stub_run[2] / "index.html").read_text()
    assert "interrupted" in index and "last good" in index
    row = index[index.index('id="run-stub"'):]
    row = row[:row.index("</tr>")]
    assert re.search(r'<td class="num">0\.812', row) is None  # the old Dice is never shown as current

    (run_dir / "go").unlink()
    rerun = run(run_command(stub_run))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert manifest_of(run_dir)["status"] == "ok" and (run_dir / "cell_b_done").exists()


def test_run_sigterm_stops_after_the_current_frame_and_rerun_resumes(stub_run) -> None:
    run_dir = stub_run[2] / "stub"
    proc = start(run_command(stub_run), STUB_FRAMES="6", STUB_FRAME_SECONDS="1")
    wait_until(lambda: len(list((run_dir / "predictions" / "records").glob("*.json"))) >= 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=WAIT)
    assert proc.returncode == 143, stderr[-3000:]
    line = one_line(stderr.replace("vesselnb: SIGTERM received", "(note) SIGTERM received"))
    done = int(re.search(r"during stage 'infer' of 'stub' after (\d+) of 6 frames \(all stored\)", line).group(1))
    assert 1 <= done < 6 and len(list((run_dir / "predictions" / "records").glob("*.json"))) == done
    assert (run_dir / "02_inference.ipynb").is_file() and (run_dir / "02_inference.html").is_file()
    assert manifest_of(run_dir)["stages"]["infer"]["status"] == "interrupted"

    rerun = run(run_command(stub_run), STUB_FRAMES="6")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert len(list((run_dir / "predictions" / "records").glob("*.json"))) == 6


def test_kill_9_leaves_running_which_the_next_command_reports_as_interrupted(stub_run) -> None:
    run_dir = stub_run[2] / "stub"
    proc = start(run_command(stub_run), STUB_WAIT="1")
    wait_until(lambda: (run_dir / "cell_a_started").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=WAIT)
    on_disk = json.loads((run_dir / "manifest.json").read_text())
    assert on_disk["stages"]["convert"]["status"] == "running" and on_disk["stages"]["convert"]["pid"] == proc.pid

    index = run(vesselnb("index", "--outputs", str(stub_run[2])))
    assert index.returncode == 0, index.stderr[-3000:]
    manifest = manifest_of(run_dir)
    assert manifest["stages"]["convert"]["status"] == "interrupted" and manifest["status"] == "interrupted"
    assert f"pid {proc.pid}" in manifest["stages"]["convert"]["error"]["evalue"]
    assert "interrupted" in (stub_run[2] / "index.html").read_text()

    rerun = run(run_command(stub_run))  # the lock died with its holder: no refusal, no manual cleanup
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"left by pid {proc.pid}" in rerun.stderr and "no longer running" in rerun.stderr
    assert manifest_of(run_dir)["status"] == "ok"


# --- names in other scripts ----------------------------------------------------------------------------------------
def test_cjk_names_render_without_tofu_or_glyph_warnings() -> None:
    import warnings

    import numpy as np

    from vesselnb import fonts, viz

    name = "张伟_0000103366__1-4_frame_000034"
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    covering = [f for f in fonts.configure_matplotlib_fonts() if f != fonts.BASE_FAMILY]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viz.figure_png(viz.four_panel(image, None, None, title=name))
    glyph_warnings = [str(w.message) for w in caught if "missing from font" in str(w.message)]
    if covering:  # a CJK font is installed (fonts-noto-cjk here): the name is drawn as is
        assert glyph_warnings == [] and fonts.displayable(name) == name
    # with Latin fonts only, the name is spelled out, never drawn as empty boxes
    latin_only = fonts.displayable(name, [fonts.BASE_FAMILY])
    assert latin_only == "U+5F20U+4F1F_0000103366__1-4_frame_000034"


def test_nfd_file_name_meets_its_nfc_annotation(tmp_path) -> None:
    import unicodedata

    from PIL import Image

    from vesselnb.data import list_samples, load_ground_truth

    nfc = unicodedata.normalize("NFC", "Zoë_Lefèvre_0001__s1_frame_000001")
    nfd = unicodedata.normalize("NFD", nfc)
    assert nfc != nfd
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (16, 16), (40, 40, 40)).save(images / f"{nfd}.jpg")  # as macOS writes it
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps([{"image": f"{nfc}.jpg", "mask": [[2, 2, 12, 2, 12, 12, 2, 12]],
                                        "text": "blood vessel"}], ensure_ascii=False), encoding="utf-8")
    samples = list_samples(images)
    truth = load_ground_truth(annotations, samples, annotation_format="sa2va")
    assert truth.report.missing == [] and truth.report.unmatched == []
    assert truth.mask(samples[0].sample_id).sum() > 0


# --- filesystems under `vesselnb run` -------------------------------------------------------------------------------
def test_run_on_read_only_full_or_file_in_path_outputs_is_one_line(stub_run, tmp_path) -> None:
    params, notebooks, _ = stub_run

    def run_into(outputs: Path) -> subprocess.CompletedProcess:
        return run(vesselnb("run", str(params), "--outputs", str(outputs), "--notebooks", str(notebooks),
                            "--no-progress"), VESSELNB_LOG_DIR=str(tmp_path / "logs"))

    (tmp_path / "a_file").write_text("")
    proc = run_into(tmp_path / "a_file" / "outputs")  # a parent that is a file, not a folder
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert str(tmp_path / "a_file") in line and "not a folder" in line

    with tmpfs(tmp_path / "ro", "1m", read_only=True) as mount:
        proc = run_into(mount)
        assert proc.returncode == 2
        line = one_line(proc.stderr)
        assert str(mount / "stub") in line and "read-only" in line and "--outputs" in line

    with tmpfs(tmp_path / "full", "4m") as mount:
        filler = mount / "filler"
        filler.write_bytes(b"\0" * (4 * 1024 - 40) * 1024)  # 40 kB left: the run fills it in its first stage
        proc = run_into(mount)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("vesselnb: error: ") and str(mount / "stub") in last
        assert "No space left on device" in last and "free space" in last
        log = Path(re.search(r"\(details: (\S+)\)", last).group(1))
        assert "Traceback" in log.read_text()
        filler.unlink()
        rerun = run_into(mount)
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert manifest_of(mount / "stub")["status"] == "ok"
        assert (mount / "stub" / "03_error_analysis.html").is_file()
