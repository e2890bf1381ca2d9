"""Storing predictions off the model's thread: a writer process (POSIX) or, elsewhere, a writer thread.

Why a process and not a thread: ``predict_forward`` is Python-heavy (tokenising, a generate loop, many small torch
ops), and a writer thread in the same interpreter competes with it for the GIL. Measured on the demo model (22
ms/frame on one core, probability maps stored): a writer thread made the loop 1.05-1.07x a bare ``predict_forward``
loop, the model call itself running 1.4-1.8 ms slower; the same writes from a separate process made it 1.01-1.02x.

The process is started once per Python process (``python -m vesselnb.store_writer``, about 0.15 s) and reused by
every later run, so a notebook kernel or a test session pays that once; :func:`prestart` lets the inference stage
start it while the model loads. It speaks over two pipes (:class:`multiprocessing.connection.Connection`): the
caller sends checked samples, the child writes them with :func:`vesselnb.store.write_sample_files` and answers
each one. Crash semantics are the store's: a sample counts only once its record exists. If the caller dies (even
``kill -9``), the child reads the samples already sent, stores them (they are complete), sees end-of-file and exits;
samples not yet sent are predicted again on resume. If the child dies, the caller gets a :class:`StoreError`.
"""

from __future__ import annotations

import atexit
import collections
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from vesselnb.errors import StoreError
from vesselnb.locks import fcntl  # the POSIX module, or None elsewhere
from vesselnb.store import PredictionStore, write_sample_files

# Room in the request pipe for a few samples (a 512x512 frame's mask and map are ~0.5 MB pickled), so handing one
# over never waits for the child; Linux lets an unprivileged process raise a pipe to 1 MB.
_PIPE_BYTES = 1 << 20
_EXIT_WAIT_SECONDS = 30.0


class SampleWriter(Protocol):
    """What the inference loop needs from a writer: queue a sample, and wait for all of them at the end."""

    def put(self, record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None = None) -> None: ...

    def close(self) -> None: ...


# --- the child ------------------------------------------------------------------------------------------------------
def serve(requests: Connection, replies: Connection) -> None:
    """The child's loop: store each sample sent, answer ``("stored", id)`` or ``("failed", id, why)``, stop at EOF."""
    while True:
        try:
            root, durable, record, mask, probability = requests.recv()
        except EOFError:
            return
        sample_id = str(record["sample_id"])
        try:
            write_sample_files(Path(root), record, mask, probability, durable)
            reply: tuple[str, ...] = ("stored", sample_id)
        except Exception as exc:  # noqa: BLE001 - sent back, raised in the caller as StoreError
            reply = ("failed", sample_id, f"{type(exc).__name__}: {exc}")
        try:
            replies.send(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the caller is gone; keep storing what it sent, then stop at EOF


def main(argv: list[str] | None = None) -> int:
    """Entry point of the child: ``python -m vesselnb.store_writer REQUEST_FD REPLY_FD``."""
    args = sys.argv[1:] if argv is None else argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the caller, which decides what to do with us
    serve(Connection(int(args[0]), writable=False), Connection(int(args[1]), readable=False))
    return 0


# --- the caller's handle on a child ---------------------------------------------------------------------------------
class WriterProcess:
    """One running child: send samples, read answers. Owned by the process that started it (never shared by fork)."""

    def __init__(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        _enlarge_pipe(request_write)
        package_parent = str(Path(__file__).resolve().parents[1])
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vesselnb.store_writer", str(request_read), str(reply_write)],
                pass_fds=(request_read, reply_write), stdin=subprocess.DEVNULL, env=env,
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self.requests = Connection(request_write, readable=False)
        self.replies = Connection(reply_read, writable=False)
        self.owner_pid = os.getpid()
        self.in_use = False

    @property
    def usable(self) -> bool:
        return self.owner_pid == os.getpid() and self.process.poll() is None and not self.requests.closed

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self.requests.send(message)
        except OSError as exc:  # a broken or reset pipe: the child is gone
            raise self._died(exc) from None

    def reply_ready(self) -> bool:
        return self.replies.poll()

    def receive(self) -> tuple[str, ...]:
        try:
            return self.replies.recv()
        except (EOFError, OSError) as exc:
            raise self._died(exc) from None

    def _died(self, exc: BaseException) -> StoreError:
        self.close()
        return StoreError(
            f"the prediction store's writer process (pid {self.process.pid}) stopped ({type(exc).__name__}, exit "
            f"code {self.process.returncode}); samples not yet stored are predicted again when you rerun the stage"
        )

    def close(self) -> None:
        """Let the child finish what it was sent and exit (end-of-file on its pipe); kill it if it hangs."""
        for connection in (self.requests, self.replies):
            if not connection.closed:
                connection.close()
        try:
            self.process.wait(timeout=_EXIT_WAIT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _enlarge_pipe(fd: int) -> None:
    if fcntl is None:
        return
    try:
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (AttributeError, OSError):
        pass  # not Linux, or over the system's limit: the default pipe still works, the caller may wait a little


_shared: WriterProcess | None = None
_shared_lock = threading.Lock()


def _shared_process() -> WriterProcess:
    """The shared child, started (or restarted, after a death or in a forked process) if needed. Hold the lock."""
    global _shared
    if _shared is None or not _shared.usable:
        if _shared is not None and _shared.owner_pid == os.getpid():
            _shared.close()
        _shared = WriterProcess()
    return _shared


def _claim_process() -> tuple[WriterProcess, bool]:
    """The shared child and True, or a private one and False when a writer already uses the shared one."""
    with _shared_lock:
        shared = _shared_process()
        if shared.in_use:
            return WriterProcess(), False
        shared.in_use = True
        return shared, True


def prestart() -> None:
    """Start the shared writer process now (e.g. while a model loads) instead of at the first sample."""
    if os.name == "posix":
        with _shared_lock:
            _shared_process()


@atexit.register
def _close_shared() -> None:
    if _shared is not None and _shared.owner_pid == os.getpid():
        _shared.close()


# --- writers --------------------------------------------------------------------------------------------------------
def _failed(store: PredictionStore, sample_id: str, why: str) -> StoreError:
    return StoreError(f"{store.path}: storing sample {sample_id!r} failed: {why}; fix that and rerun the stage "
                      "(stored samples are kept)")


class ProcessWriter:
    """Stores samples through the writer process; at most ``max_pending`` samples are sent but not yet answered.

    Bad input is refused in :meth:`put` itself (:meth:`PredictionStore.check_sample`); a write that fails in the
    child is raised by the next :meth:`put` or by :meth:`close`, never swallowed.
    """

    def __init__(self, store: PredictionStore, max_pending: int = 4) -> None:
        self.store = store
        self.max_pending = max(1, max_pending)
        self._pending: collections.deque[str] = collections.deque()
        self._in_step = True  # False while a message is half sent or half read (an interrupt there desyncs the pipe)
        self._process, self._shared = _claim_process()

    def put(self, record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None = None) -> None:
        """Queue one finished sample (same contract as :meth:`PredictionStore.write`)."""
        mask, probability = self.store.check_sample(record, mask, probability)
        self._collect(wait_until=self.max_pending - 1)
        self._in_step = False
        self._process.send((str(self.store.path), self.store.durable, record, mask, probability))
        self._in_step = True
        self._pending.append(str(record["sample_id"]))

    def _collect(self, wait_until: int) -> None:
        """Read the answers that are in; wait until at most ``wait_until`` samples are unanswered."""
        while self._pending and (len(self._pending) > wait_until or self._process.reply_ready()):
            answer = self._receive()
            if answer[0] == "failed":
                self._drain()
                raise _failed(self.store, answer[1], answer[2])

    def _drain(self) -> None:
        """Wait out the answers still due, so the next run on this process reads only its own."""
        while self._pending:
            self._receive()

    def _receive(self) -> tuple[str, ...]:
        self._in_step = False
        answer = self._process.receive()
        self._in_step = True
        self._pending.popleft()
        return answer

    def close(self) -> None:
        """Wait until every queued sample is stored; re-raises the first failure. The process stays for reuse."""
        try:
            self._collect(wait_until=0)
        finally:
            self._release()

    def _release(self) -> None:
        if self._pending or not self._in_step or not self._shared:
            self._process.close()  # a private process, or one whose answers are out of step: let it finish, exit
        self._process.in_use = False

    def __enter__(self) -> ProcessWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # the run failed (or was interrupted): still store what was handed over, but do not mask the error
            self.close()
        except Exception:  # noqa: BLE001 - the run's own exception is the one to see
            pass


class ThreadWriter:
    """Stores samples from one background thread: the fallback where the writer process is not available.

    PIL's PNG encoder, zlib and file writes release the GIL, but the Python around them competes with the model's
    (see the module docstring), which is why :class:`ProcessWriter` is preferred.
    """

    def __init__(self, store: PredictionStore, max_pending: int = 4) -> None:
        self.store = store
        self.max_pending = max(1, max_pending)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vesselnb-store")
        self._pending: collections.deque[Future[None]] = collections.deque()

    def put(self, record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None = None) -> None:
        """Queue one finished sample (same contract as :meth:`PredictionStore.write`)."""
        mask, probability = self.store.check_sample(record, mask, probability)
        while self._pending and (self._pending[0].done() or len(self._pending) >= self.max_pending):
            self._pending.popleft().result()
        self._pending.append(self._pool.submit(self._write, record, mask, probability))

    def _write(self, record: dict[str, Any], mask: np.ndarray, probability: np.ndarray | None) -> None:
        try:
            write_sample_files(self.store.path, record, mask, probability, self.store.durable)
        except Exception as exc:
            raise _failed(self.store, str(record["sample_id"]), f"{type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        """Wait for every queued sample to be stored; re-raises the first failure."""
        try:
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True)

    def __enter__(self) -> ThreadWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_writer(store: PredictionStore, max_pending: int = 4) -> ProcessWriter | ThreadWriter:
    """The writer for this platform: a :class:`ProcessWriter` on POSIX, a :class:`ThreadWriter` elsewhere."""
    if os.name == "posix":
        return ProcessWriter(store, max_pending)
    return ThreadWriter(store, max_pending)


if __name__ == "__main__":
    raise SystemExit(main())
