"""vesselnb's own exception types.

Every error a user can cause (a bad params file, a checkpoint that does not fit, a store from another model) is a
:class:`VesselnbError` whose message names the file and the fix, so the notebooks and the CLI can show it without a
traceback from deep inside a library.
"""

from __future__ import annotations


class VesselnbError(Exception):
    """Base class: a problem with the user's input or environment, explained in the message."""


class ParamsError(VesselnbError):
    """A params YAML file is invalid (unknown key, wrong type, missing path)."""


class DataError(VesselnbError):
    """Images or annotations cannot be read or do not match."""


class CheckpointError(VesselnbError):
    """A training checkpoint cannot be read safely (unknown layout, truncated, untrusted pickle)."""


class ConversionError(VesselnbError):
    """Conversion refused: keys or shapes do not fit, disk too small, output inconsistent."""


class InferenceError(VesselnbError):
    """The model cannot be loaded or run as asked (missing GPU, bad prompt in strict mode, ...)."""


class StoreError(VesselnbError):
    """The prediction store is inconsistent or belongs to another model."""


class StageError(VesselnbError):
    """A notebook stage failed; the executed notebook and its HTML still hold the error."""
