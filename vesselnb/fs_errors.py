"""Filesystem errors as one line naming the path and the fix; the traceback goes to a log file instead.

Why: ``OSError: [Errno 30] Read-only file system`` at the end of forty lines of papermill internals tells a user
neither which of the run's folders is the problem nor what to do. Every ``OSError`` that reaches the command line
is turned into one line by :func:`describe_os_error`, and :func:`log_traceback` keeps the details for a bug report.
"""

from __future__ import annotations

import errno
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

LOG_DIR_ENV = "VESSELNB_LOG_DIR"

_FIXES = {
    errno.EROFS: "the filesystem is read-only: choose a writable outputs folder (--outputs DIR) or remount it "
                 "read-write",
    errno.ENOSPC: "no space left on the device: free space there (df -h) or choose another outputs folder "
                  "(--outputs DIR); a rerun resumes where this stopped",
    errno.EDQUOT: "disk quota exceeded: free space in your quota or choose another outputs folder (--outputs DIR)",
    errno.EACCES: "permission denied: fix the permissions (ls -ld, chmod/chown) or choose a folder you can write",
    errno.EPERM: "operation not permitted: fix the permissions or choose a folder you own",
    errno.ENOENT: "a folder on the path does not exist: create the parent folder or fix the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder: fix the path",
    errno.EISDIR: "the path is a folder where a file was expected: fix the path",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and run again",
    errno.ENAMETOOLONG: "the path is too long: use a shorter outputs folder or run name",
}


def describe_os_error(exc: OSError, doing: str = "") -> str:
    """``<path>: <what went wrong> while <doing>; <fix>`` — one line, no traceback."""
    path = exc.filename if exc.filename is not None else "(unknown path)"
    if exc.filename2 is not None:
        path = f"{path} -> {exc.filename2}"
    reason = exc.strerror or type(exc).__name__
    fix = _FIXES.get(exc.errno or -1, "check the path, the disk and the permissions, then run again")
    while_doing = f" while {doing}" if doing else ""
    return f"{path}: {reason}{while_doing}; {fix}"


def log_dir() -> Path:
    """Where tracebacks of user errors go: ``$VESSELNB_LOG_DIR``, else ``~/.cache/vesselnb/logs``, else the temp dir.

    Not the outputs folder: the error may be that the outputs folder is full or read-only.
    """
    given = os.environ.get(LOG_DIR_ENV)
    if given:
        return Path(given)
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "vesselnb" / "logs"


def log_traceback(exc: BaseException) -> Path | None:
    """Write ``exc``'s traceback (and the command line) to a new log file; None if no folder can take it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\n\n" + "".join(
        traceback.format_exception(type(exc), exc, exc.__traceback__))
    for folder in (log_dir(), Path(tempfile.gettempdir()) / "vesselnb-logs"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"vesselnb-{stamp}-{os.getpid()}.log"
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None
