"""Graceful stops: SIGINT/SIGTERM end a run after the current frame or cell, never in the middle of one.

Why not just let ``KeyboardInterrupt`` fly: it lands anywhere (inside a safetensors write, between a record and its
mask), papermill then loses the executed notebook of the stage in progress, and the manifest keeps saying ``running``.

How a stop travels:

* the process that owns the run (``vesselnb run`` / ``vesselnb infer``) enters :func:`graceful_stop`; the first
  signal only *records* the request (and touches a stop file whose path is in ``$VESSELNB_STOP_FILE``, inherited by
  the notebook kernels it starts — jupyter puts kernels in their own session, so they never see the terminal's
  Ctrl-C themselves);
* loops that can stop cleanly (the inference loop, after each stored frame) call :func:`check_stop`, which raises
  :class:`Interrupted`; papermill records it as the failing cell and still writes the executed notebook;
* between cells, :func:`stop_before_cell` (papermill's ``on_cell_start`` hook) raises :class:`Interrupted` before a
  new cell starts;
* a second signal stops at once: the kernels started under :func:`tracked_kernel_manager` get SIGINT, and the owning
  process raises :class:`Interrupted` where it is.

The caller marks the stage ``interrupted`` and exits ``128 + signal`` (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import tempfile
import threading
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STOP_FILE_ENV = "VESSELNB_STOP_FILE"
_OWNER_ENV = "VESSELNB_STOP_OWNER"  # pid of the process whose graceful_stop is active (nested blocks are no-ops)
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A requested stop (signal ``signum``) reached a point where stopping loses nothing.

    A ``KeyboardInterrupt`` so that ``except Exception`` blocks (per-frame error capture) never swallow it.
    """

    def __init__(self, signum: int = signal.SIGINT, where: str = "") -> None:
        self.signum = int(signum)
        self.where = where
        super().__init__(f"stopped by {signal_name(self.signum)}" + (f" {where}" if where else ""))

    @property
    def exit_code(self) -> int:
        """The shell's convention for death by a signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


# --- the request ---------------------------------------------------------------------------------------------------
_requested: int | None = None  # signal number of the first stop request in this process
_kernels: weakref.WeakSet[Any] = weakref.WeakSet()  # jupyter_client KernelManagers of the running stages


def stop_requested() -> int | None:
    """The signal number of a pending stop request (this process, or the run that started this kernel), or None."""
    if _requested is not None:
        return _requested
    path = os.environ.get(STOP_FILE_ENV)
    if not path:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8").strip()
    except OSError:  # absent = no request; unreadable = cannot tell, keep running
        return None
    return int(text) if text.isdigit() else int(signal.SIGINT)


def check_stop(where: str = "") -> None:
    """Raise :class:`Interrupted` if a stop was requested; call it where stopping loses nothing."""
    signum = stop_requested()
    if signum is not None:
        raise Interrupted(signum, where)


def stop_before_cell(cell: Any = None, cell_index: int = 0, **_: Any) -> None:
    """papermill/nbclient ``on_cell_start`` hook: do not start another cell once a stop was requested."""
    signum = stop_requested()
    if signum is not None:
        raise Interrupted(signum, f"before cell {cell_index}")


def reset() -> None:
    """Forget a handled request (a long-lived process, e.g. a test, that runs again)."""
    global _requested
    _requested = None


@functools.cache
def tracked_kernel_manager() -> type:
    """The kernel manager class papermill uses for our stages: each instance is remembered, so a second signal can
    interrupt its kernel at once. Built on first use: jupyter_client (zmq, tornado) is paid when a notebook runs,
    not by ``vesselnb --help``."""
    from jupyter_client.manager import KernelManager

    class TrackedKernelManager(KernelManager):
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            _kernels.add(self)

    return TrackedKernelManager


def papermill_kwargs() -> dict[str, Any]:
    """Extra ``papermill.execute_notebook`` arguments wiring a notebook run into graceful stops."""
    return {"on_cell_start": stop_before_cell, "kernel_manager_class": tracked_kernel_manager()}


def _interrupt_kernels() -> None:
    """SIGINT to each live kernel's process group (the kernel leads its own session, so pgid = pid)."""
    for manager in list(_kernels):
        provisioner = getattr(manager, "provisioner", None)
        pid = getattr(provisioner, "pid", None) or getattr(getattr(provisioner, "process", None), "pid", None)
        if pid:
            with contextlib.suppress(OSError):
                os.killpg(int(pid), signal.SIGINT)


# --- the owner of a run ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def graceful_stop(what: str = "the current frame or cell", announce: bool = True) -> Iterator[None]:
    """Turn SIGINT/SIGTERM into a stop request for the duration of the block (main thread only; else a no-op).

    Nested use keeps the outer handlers. On exit the handlers and ``$VESSELNB_STOP_FILE`` are restored.
    """
    global _requested
    if threading.current_thread() is not threading.main_thread() or os.environ.get(_OWNER_ENV) == str(os.getpid()):
        yield
        return
    inherited = os.environ.get(STOP_FILE_ENV)  # started by a run that owns the stop file: keep listening to it
    if inherited:
        stop_file = inherited
    else:
        fd, stop_file = tempfile.mkstemp(prefix="vesselnb-stop-", suffix=".signal")
        os.close(fd)
        os.unlink(stop_file)  # exists only once a stop is requested
    previous_env = {k: os.environ.get(k) for k in (STOP_FILE_ENV, _OWNER_ENV)}
    os.environ[STOP_FILE_ENV] = stop_file
    os.environ[_OWNER_ENV] = str(os.getpid())
    _requested = None

    def handler(signum: int, frame: Any) -> None:
        global _requested
        if _requested is None:
            _requested = signum
            if not inherited:
                with contextlib.suppress(OSError):
                    Path(stop_file).write_text(str(signum), encoding="utf-8")
            if announce:
                print(f"\nvesselnb: {signal_name(signum)} received: stopping after {what} "
                      "(send it again to stop at once)", file=sys.stderr, flush=True)
            return
        _interrupt_kernels()
        raise Interrupted(_requested, "at once (second signal)")

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
        if not inherited:
            with contextlib.suppress(OSError):
                os.unlink(stop_file)
        for key, value in previous_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
