"""Helpers shared by command modules: config loading with flag precedence, tables."""

from __future__ import annotations

import argparse
from typing import Any

from generator.errors import UserError

from ..config import SynthmedConfig, load_config, parse_overrides


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="profile name in configs/ or a YAML path (default: tiny)")
    parser.set_defaults(accepts_overrides=True)
    parser.epilog = (parser.epilog or "") + "\nAny config field can be overridden with a dotted flag, e.g. --train.lr=1e-4."


def resolve_config(args: argparse.Namespace, extra: list[str], flags: dict[str, Any] | None = None) -> SynthmedConfig:
    """Profile, then dotted overrides, then the command's own flags that were given."""
    overrides, rest = parse_overrides(extra)
    if rest:
        raise UserError(f"unrecognised arguments: {' '.join(rest)}")
    overrides.update({k: v for k, v in (flags or {}).items() if v is not None})
    return load_config(args.config, overrides)


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table that reads well in a terminal and pastes into markdown."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def resolve_device(name: str) -> str:
    """``run.device`` as a string (see :func:`generator.devices.resolve_device`)."""
    from generator import devices  # imports torch: not at CLI start-up

    return str(devices.resolve_device(name))


def phantom_manifest(phantoms, size: int, progress: bool = True, per_finding: int | None = None, seed: int | None = None,
                     suffix: str = "") -> str:
    """The phantom set drawn at ``size`` pixels beside ``phantoms.out`` (``<out>_<size>px<suffix>``), drawn
    first when it is not on disk (seeded: the same bytes every time); returns its manifest path.

    ``per_finding`` and ``seed`` default to the ``phantoms`` section's; a set drawn with other values
    needs its own ``suffix`` (a folder on disk is used as it is, whatever it was drawn with)."""
    from pathlib import Path

    from generator.phantoms.dataset import write_phantoms

    per_finding = phantoms.per_finding if per_finding is None else per_finding
    seed = phantoms.seed if seed is None else seed
    folder = Path(f"{phantoms.out}_{size}px{suffix}")
    if not (folder / "manifest.csv").is_file():
        summary = write_phantoms(folder, phantoms.modalities, per_finding, size, seed, phantoms.negatives, progress)
        print(f"{summary.images} phantoms -> {folder} ({summary.seconds:.0f} s)")
    return str(folder / "manifest.csv")
