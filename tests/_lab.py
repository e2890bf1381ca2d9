"""A real JupyterLab server for a test: started on a free local port with its own config, stopped by its pid.

The server runs this interpreter's JupyterLab (the ``lab`` and ``test`` extras) with ``PYTHONPATH`` set to this
checkout, so the kernels it starts import the vesselnb under test. Settings, workspaces and runtime files live in a
temp folder: the test never reads or writes the user's ``~/.jupyter``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LabServer:
    """A running server: its base URL (ending in '/') and the token every request needs."""

    base_url: str
    token: str
    log: Path

    def api(self, method: str, path: str, body: dict | None = None) -> object:
        """One REST call to the server's API (``path`` without the leading '/')."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.base_url + path, data=data, method=method,
                                         headers={"Authorization": f"token {self.token}",
                                                  "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload else None

    def lab_url(self, path: str) -> str:
        """The JupyterLab page that opens ``path`` (relative to the server's root)."""
        return f"{self.base_url}lab/tree/{path}?token={self.token}"

    def start_session(self, path: str, kernel_name: str) -> dict:
        """Start ``kernel_name`` for the notebook at ``path``; JupyterLab attaches to it when it opens the file."""
        name = Path(path).name
        return self.api("POST", "api/sessions", {"path": path, "name": name, "type": "notebook",
                                                 "kernel": {"name": kernel_name}})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_tail(log: Path, limit: int = 4000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-limit:] if log.is_file() else ""


@contextlib.contextmanager
def jupyter_lab(root: Path, state: Path, startup_timeout: float = 120.0) -> Iterator[LabServer]:
    """Serve ``root`` with JupyterLab (the app exposed to the page as ``window.jupyterapp``); stop it afterwards."""
    state.mkdir(parents=True, exist_ok=True)
    port, token = _free_port(), secrets.token_hex(16)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for variable, folder in (("JUPYTER_CONFIG_DIR", "config"), ("JUPYTER_RUNTIME_DIR", "runtime"),
                             ("JUPYTERLAB_SETTINGS_DIR", "settings"), ("JUPYTERLAB_WORKSPACES_DIR", "workspaces")):
        env[variable] = str(state / folder)
    # no "get notified about Jupyter news?" toast over the page, no update check (the test runs offline)
    notification = state / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    notification.parent.mkdir(parents=True, exist_ok=True)
    notification.write_text(json.dumps({"fetchNews": "false", "checkForUpdates": False}), encoding="utf-8")
    env.pop("VESSELNB_WIDGETS", None)  # the widget browser must find the frontend the way a user's session does
    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={port}", "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}",
               f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
               "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
               "--LabApp.extension_manager=readonly", "--ServerApp.allow_root=True"]
    log = state / "jupyterlab.log"
    with log.open("w", encoding="utf-8") as stream:
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=root,
                                   start_new_session=True)
    server = LabServer(f"http://127.0.0.1:{port}/", token, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {process.returncode}:\n{_log_tail(log)}")
            try:
                server.api("GET", "api/status")
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise AssertionError(f"jupyter lab silent for {startup_timeout} s:\n{_log_tail(log)}") from None
                time.sleep(0.5)
        yield server
    finally:
        if process.poll() is None:
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                server.api("POST", "api/shutdown")  # shuts its kernels down too
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # its own session: the server and the kernels it started
                process.wait(timeout=30)
