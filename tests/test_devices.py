"""One device resolution for run.device, the judges and --device: auto picks what exists, an absent device is a UserError."""

import pytest
import torch

from generator.devices import resolve_device
from generator.errors import UserError
from pipelines.commands.common import resolve_device as resolve_device_name


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch, cpu_only):
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device_name("auto") == "cuda"  # the CLI's string form


def test_explicit_devices(monkeypatch, cpu_only):
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device(torch.device("cpu")) == torch.device("cpu")
    assert resolve_device_name("cpu") == "cpu"
    with pytest.raises(UserError, match="CUDA is not available; use device=cpu or auto"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="MPS is not available"):
        resolve_device("mps")
    with pytest.raises(UserError, match="unknown device 'gpu0'; use auto, cpu, cuda, cuda:N or mps"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="has 2 CUDA device"):
        resolve_device("cuda:2")
