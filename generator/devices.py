"""Device names as configs and flags give them (``run.device``, ``judges.*.device``, ``--device``)."""

from __future__ import annotations

import torch

from .errors import UserError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N or mps"


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` is the first GPU when there is one, else Apple's MPS when there is one, else the CPU.
    A device that this machine does not have is a :class:`UserError` that says what to use instead."""
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use {DEVICE_NAMES}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {name!r} asked for, but CUDA is not available; use device=cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"device {name!r} asked for, but this machine has {count} CUDA device(s): cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not _mps_available():
        raise UserError(f"device {name!r} asked for, but MPS is not available; use device=cpu or auto")
    return device


__all__ = ["device_name", "DEVICE_NAMES", "resolve_device"]


def device_name(name: str | torch.device) -> str:
    """:func:`resolve_device` as a string ("cpu", "cuda:0", "mps"), for APIs that take one."""
    return str(resolve_device(name))
