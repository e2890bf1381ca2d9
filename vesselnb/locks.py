"""Folder locks: one writer per run folder and per prediction store, held with an OS file lock.

Why ``fcntl.flock``: the kernel releases it when the holding process ends, however it ends (``kill -9``, a crash, a
power cut of the process), so a lock can never outlive its holder; what a dead holder can leave behind is only its
*note* (who held it), which the next taker recognises as stale and replaces, saying so.

Layout: ``<folder>/.vesselnb-lock/lock`` is the flocked file; each holder writes ``holder-<host>-<pid>.json``
(``{"pid", "host", "started", "command", "mode"}``) beside it and deletes it on release, so a refusal can name every
holder. An exclusive lock (``vesselnb run``, one unsharded ``infer``) excludes everyone; shared locks (the shards of one
``infer`` on one store) coexist with each other and exclude an exclusive taker.

This module knows nothing of a run folder's layout: :class:`vesselnb.run_folder.RunFolder` says which folders are
locked how (``RunFolder.lock()``, ``RunFolder.store_locks(shard)``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shlex
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

try:
    import fcntl
except ImportError:  # not POSIX: folders are not locked there (vesselnb's runs target Linux GPU machines)
    fcntl = None  # type: ignore[assignment]

from vesselnb.errors import VesselnbError
from vesselnb.fs_errors import describe_os_error
from vesselnb.stages import now_iso

LOCK_DIR = ".vesselnb-lock"
Mode = Literal["exclusive", "shared"]


class LockError(VesselnbError):
    """Another live process is writing this folder; the message names it and what to do."""


@dataclass(frozen=True)
class Holder:
    """Who holds (or held) a lock: enough to find the process and judge whether it still runs."""

    pid: int
    host: str
    started: str
    command: str
    mode: str

    @classmethod
    def me(cls, mode: str) -> Holder:
        return cls(os.getpid(), socket.gethostname(), now_iso(), _command_line(), mode)

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} since {self.started} ({self.command})"


def _command_line() -> str:
    """``vesselnb run params/x.yaml`` rather than the interpreter's path: what the user typed, shortened."""
    program = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if program in ("cli.py", "__main__.py"):  # python -m vesselnb.cli ...
        program = "vesselnb"
    argv = [program, *sys.argv[1:]]
    text = shlex.join(argv)
    return text if len(text) <= 160 else text[:157] + "..."


def process_alive(pid: int, host: str | None = None) -> bool | None:
    """True/False for a process on this host; None when ``host`` is another machine (cannot tell from here)."""
    if host is not None and host != socket.gethostname():
        return None
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class FolderLock:
    """An OS lock on ``folder`` (see the module docstring). Use as a context manager or acquire()/release().

    ``what`` names the folder in messages ("run folder", "prediction store"); ``hint`` is the fix shown on refusal.
    """

    def __init__(self, folder: str | Path, mode: Mode = "exclusive", what: str = "folder", hint: str = "") -> None:
        self.folder = Path(folder)
        self.mode = mode
        self.what = what
        self.hint = hint
        self.notes: list[str] = []  # e.g. a stale holder note that was taken over
        self._fd: int | None = None
        self._note: Path | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> FolderLock:
        """Take the lock at once or raise :class:`LockError` naming the holder(s); never waits."""
        if self._fd is not None or fcntl is None:
            return self
        lock_dir = self.folder / LOCK_DIR
        try:
            lock_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_dir / "lock", os.O_RDWR | os.O_CREAT, 0o664)
        except OSError as exc:
            raise LockError(describe_os_error(exc, f"locking the {self.what}")) from None
        flag = fcntl.LOCK_EX if self.mode == "exclusive" else fcntl.LOCK_SH
        try:
            fcntl.flock(fd, flag | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise LockError(f"{lock_dir / 'lock'}: cannot lock ({exc}); the filesystem may not support "
                                "locks (e.g. some network mounts): use a local outputs folder") from None
            raise LockError(self._refusal(lock_dir)) from None
        self._fd = fd
        self._take_over_stale(lock_dir)
        me = Holder.me(self.mode)
        note = lock_dir / f"holder-{me.host}-{me.pid}.json"
        try:
            tmp = note.with_suffix(".tmp")
            tmp.write_text(json.dumps(me.__dict__), encoding="utf-8")
            os.replace(tmp, note)
        except OSError:
            note = None  # the lock itself holds; only the courtesy note is missing
        self._note = note
        return self

    def release(self) -> None:
        """Delete our note and drop the lock (also dropped by the OS if we never get here)."""
        if self._fd is None:
            return
        if self._note is not None:
            with contextlib.suppress(OSError):
                self._note.unlink()
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:  # a lock object dropped without release (an exception path) must not pin the folder
        self.release()

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # --- holders ---------------------------------------------------------------------------------------------------
    def _refusal(self, lock_dir: Path) -> str:
        holders = [h for h in read_holders(lock_dir) if process_alive(h.pid, h.host) is not False]
        if holders:
            who = "; ".join(h.describe() for h in holders[:3]) + (f" and {len(holders) - 3} more"
                                                                   if len(holders) > 3 else "")
            first = holders[0]
            stop = f"kill -INT {first.pid}" if first.host == socket.gethostname() else f"stop it on {first.host}"
        else:
            who, stop = "another process (it left no note)", "stop it"
        fix = (self.hint or f"wait for it to finish, or stop it ({stop}) and run again").replace(
            "<pid>", str(holders[0].pid) if holders else "<pid>")
        return f"{self.folder}: this {self.what} is in use by {who}. {fix[0].upper() + fix[1:]}."

    def _take_over_stale(self, lock_dir: Path) -> None:
        """Notes of holders that are gone (we hold the lock now, so an exclusive note cannot be live)."""
        for path, holder in _holder_files(lock_dir):
            if holder.pid == os.getpid() and holder.host == socket.gethostname():
                continue
            gone = self.mode == "exclusive" or holder.mode == "exclusive" \
                or process_alive(holder.pid, holder.host) is False
            if not gone:
                continue
            with contextlib.suppress(OSError):
                path.unlink()
            self.notes.append(f"took over the {self.what} lock of {self.folder} left by {holder.describe()}, "
                              "which is no longer running")


def _holder_files(lock_dir: Path) -> list[tuple[Path, Holder]]:
    found = []
    try:
        paths = sorted(lock_dir.glob("holder-*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            found.append((path, Holder(int(data["pid"]), str(data["host"]), str(data.get("started", "?")),
                                       str(data.get("command", "?")), str(data.get("mode", "?")))))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return found


def read_holders(lock_dir: str | Path) -> list[Holder]:
    """The notes in ``<folder>/.vesselnb-lock`` (live or stale), oldest first."""
    return sorted((h for _, h in _holder_files(Path(lock_dir))), key=lambda h: h.started)


@contextlib.contextmanager
def hold_all(locks: list[FolderLock], announce: bool = True) -> Iterator[list[FolderLock]]:
    """Acquire ``locks`` in order (releasing what was taken if one is refused) and release them in reverse."""
    taken: list[FolderLock] = []
    try:
        for lock in locks:
            taken.append(lock.acquire())
            if announce:
                for note in lock.notes:
                    print(f"vesselnb: note: {note}", file=sys.stderr, flush=True)
        yield taken
    finally:
        for lock in reversed(taken):
            lock.release()
