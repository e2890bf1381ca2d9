"""Command-line flag names the conversion's error messages quote: importable without torch (``vesselnb --help``)."""

TRUST_PICKLE_FLAG = "--trust-pickle-runs-code"
