"""Helpers shared by command modules: config loading with flag precedence, tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
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


def reward_guidance_flag(value: float | None) -> float | None:
    """A command's ``--reward-guidance SCALE``, checked: None (the config's), 0 (off) or a positive scale."""
    if value is not None and not value >= 0:
        raise UserError(f"--reward-guidance must be a scale >= 0 (0.1 is the measured setting; 0: off), got {value}")
    return value


def calibrated_guidance_note(lora: Sequence[str] | None, scale: float | None) -> str | None:
    """A note for a command drawing with an adapter of a run that calibrated reward guidance (its ``guidance.json``,
    improve.eval.guidance_scales) while it draws without guidance (``scale`` None or 0); None otherwise. ``lora``: the
    adapters as given (a run folder, its best/ or final/, or a file in one)."""
    from ..runs import GUIDANCE_FILE, read_guidance

    if scale:
        return None
    for given in lora or []:
        path = Path(given)
        for folder in (path, path.parent, path.parent.parent):
            try:
                saved = read_guidance(folder)
            except (OSError, ValueError):
                return None
            if saved is None:
                continue
            calibrated = saved.get("reward_guidance") if isinstance(saved, dict) else None
            if calibrated is None:
                return None
            return (f"note: {folder} calibrated reward guidance on its base model's held-out draws ({folder / GUIDANCE_FILE}: "
                    f"scale {calibrated:g}); add --reward-guidance {calibrated:g} to draw with it")
    return None


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain-text table that reads well in a terminal and pastes into markdown."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def resolve_device(name: str) -> str:
    """``run.device`` as a string (see :func:`generator.devices.resolve_device`)."""
    from generator.devices import device_name  # imports torch: not at CLI start-up

    return device_name(name)


def phantom_manifest(phantoms, size: int, progress: bool = True, **kwargs) -> str:
    """:func:`generator.phantoms.dataset.phantom_manifest`, imported when called (numpy and PIL: not at CLI start-up)."""
    from generator.phantoms.dataset import phantom_manifest as draw

    return draw(phantoms, size, progress, **kwargs)


def classifier_phantoms(cfg, progress: bool = True) -> str:
    """The finding classifiers' own phantom set (``judges.classifier.phantoms_per_finding`` per finding and
    ``phantoms_per_pair`` per pair of findings drawn together, at ``phantoms_seed``), drawn when absent."""
    cc = cfg.judges.classifier
    suffix = f"_seed{cc.phantoms_seed}_{cc.phantoms_per_finding}pf" + (f"_{cc.phantoms_per_pair}pp" if cc.phantoms_per_pair else "")
    return phantom_manifest(cfg.phantoms, cc.image_size, progress, per_finding=cc.phantoms_per_finding, seed=cc.phantoms_seed,
                            suffix=suffix, per_pair=cc.phantoms_per_pair)
