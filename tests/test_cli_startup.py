"""``vesselnb --help`` answers without importing the scientific stack (torch alone takes seconds to import)."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "pandas", "skimage", "transformers", "scipy", "matplotlib", "papermill")


def _imported_modules(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` output (``import time: self | cumulative | name``)."""
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name and not name.startswith("["):
                names.add(name)
    return names


def test_help_imports_no_heavy_package() -> None:
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vesselnb.cli", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    for command in ("run", "compare", "demo", "index", "convert", "diff", "infer", "merge-predictions"):
        assert command in done.stdout
    imported = _imported_modules(done.stderr)
    assert {"vesselnb.runner", "vesselnb.infer_cli"} <= imported  # the probe sees our own imports
    loaded = sorted(name for name in imported if name.split(".")[0] in HEAVY)
    assert not loaded, f"`vesselnb --help` imported {loaded[:10]}"


def test_subcommand_help_is_light_too() -> None:
    for command in ("infer", "convert", "run"):
        done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vesselnb.cli", command, "--help"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        loaded = sorted(n for n in _imported_modules(done.stderr) if n.split(".")[0] in HEAVY)
        assert not loaded, f"`vesselnb {command} --help` imported {loaded[:10]}"
