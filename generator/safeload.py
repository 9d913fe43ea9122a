"""Loading files that anyone could have put in a run folder, without running their code.

synthmed writes weights as safetensors and settings as JSON. The few ``torch.save`` files it
reads (the DDPO trainer state, accelerate's optimizer, scheduler, RNG and EMA states of a training
checkpoint) are read with ``weights_only=True``: tensors, numbers, strings, containers and numpy
arrays, never arbitrary Python objects. A pickle that names anything else is refused with a
:class:`UnsafeFileError`; a damaged file gives a :class:`UserError`. Both say how to recover.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

from .errors import UserError

TORCH_SUFFIXES = (".bin", ".pkl", ".pt", ".pth")


class UnsafeFileError(UserError):
    """A file that would have to be unpickled as arbitrary Python objects (and could run code)."""


def _reason(exc: BaseException) -> str:
    """The informative line of a (long, multi-line) torch.load error."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or line.startswith("Unsupported"):
            return line.rstrip(".")
    return (lines[0] if lines else type(exc).__name__).rstrip(".")


def load_torch_file(path: str | os.PathLike, what: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU (numpy arrays allowed, as accelerate's
    RNG states hold them); ``what`` names the file and ``fix`` says how to recover in the errors."""
    from accelerate.utils import load

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} is missing; {fix}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol 4": the refusal below says more
            return load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"refusing to load {what} {path}: it is not a weights-only file ({_reason(exc)}) and unpickling "
                              f"it could run code; {fix}") from None
    except Exception as exc:  # noqa: BLE001  (any failure to parse an untrusted file is a bad file)
        raise UserError(f"{what} {path} is damaged ({_reason(exc)}); {fix}") from None


def check_safetensors(path: str | os.PathLike, what: str, fix: str) -> None:
    """Open the header of a safetensors file: a truncated or foreign file raises a :class:`UserError`."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # noqa: BLE001  (SafetensorError, OSError, ...)
        raise UserError(f"{what} {path} is damaged ({_reason(exc)}); {fix}") from None


def check_checkpoint_folder(folder: str | os.PathLike, fix: str) -> None:
    """Load every torch file of an accelerate checkpoint with ``weights_only=True`` and open every
    safetensors header, before ``accelerator.load_state``: accelerate unpickles a registered custom
    state (the EMA) with ``weights_only=False`` and skips a broken RNG state silently."""
    folder = Path(folder)
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.suffix in TORCH_SUFFIXES:
            load_torch_file(path, "checkpoint file", fix)
        elif path.suffix == ".safetensors":
            check_safetensors(path, "checkpoint file", fix)


__all__ = ["TORCH_SUFFIXES", "UnsafeFileError", "check_checkpoint_folder", "check_safetensors", "load_torch_file"]
