"""Shipped weights are package data: a config names them relative to the packages (``generator/weights/default``,
``rlhf/weights/classifiers``), and they are found from any working folder, in a checkout and in an installed wheel."""

from __future__ import annotations

import os
from pathlib import Path

PACKAGES_ROOT = Path(__file__).resolve().parent.parent  # the folder holding generator/, rlhf/, ... (repository or site-packages)


def shipped(path: str | os.PathLike) -> Path:
    """``path`` itself when it exists (or is absolute); else the same relative path under the installed packages
    when that exists there; else ``path`` unchanged (so the caller's "not found" message names what was asked for)."""
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    candidate = PACKAGES_ROOT / p
    return candidate if candidate.exists() else p
