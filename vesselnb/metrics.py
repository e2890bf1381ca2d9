"""Placeholder: see docs/contracts.md. Being written."""

from __future__ import annotations


def add_cli(subparsers) -> None:  # noqa: D103 - placeholder until the owner fills it in
    return None
