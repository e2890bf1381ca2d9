"""Remote-code files of the tiny demo model.

Every ``*.py`` here except this ``__init__`` is copied into each demo HF folder (``auto_map`` in ``config.json``
points at them), exactly as Sa2VA ships ``modeling_sa2va_chat.py`` and friends beside its weights. They import
each other with relative imports only, so the same files work in-package (for training) and as transformers'
dynamic module (for ``AutoModel.from_pretrained(dir, trust_remote_code=True)``).
"""

from pathlib import Path

REMOTE_CODE_DIR = Path(__file__).resolve().parent


def remote_code_files() -> list[Path]:
    """The files to copy into an HF folder, sorted so folder contents are deterministic."""
    return sorted(p for p in REMOTE_CODE_DIR.glob("*.py") if p.name != "__init__.py")
