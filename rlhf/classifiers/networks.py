"""Architectures of the finding classifiers: a plain conv net and a ResNet, built by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from generator.errors import UserError

from ..config import ClassifierConfig
from .layout import ROLES


class ConvNet(nn.Module):
    """Plain: a patchify stem (a ``patch`` x ``patch`` conv of stride ``patch``: every pixel seen once,
    and the later convs cost 1 / patch**2 of full-resolution ones), then per further width a 3x3
    conv-BatchNorm-ReLU and 2x2 max pooling; features are global average and max pooling side by
    side (max keeps a small bright lesion that an average would wash out)."""

    def __init__(self, n_labels: int, widths: Sequence[int], patch: int = 4):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], patch, stride=patch, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)]
        for c_in, width in zip(widths[:-1], widths[1:]):
            layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.body = nn.Sequential(*layers)
        self.feature_dim = 2 * widths[-1]
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.feature_dim, n_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        h = self.body(x)
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, L) logits
        return self.head(self.dropout(self.features(x)))


class ResidualBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(h)) + self.skip(x))


class ResNet(nn.Module):
    """Residual: a patchify stem, then ``blocks`` residual blocks per width (the first block of each
    later stage strided); features are global average pooling (``pool="avg"``) or average and max
    pooling side by side (``"avgmax"``). BatchNorm, not GroupNorm: in the few hundred steps a CPU
    budget allows, the GroupNorm version had learned nothing (cxr test AUROC 0.57 against 0.91
    with BatchNorm, same steps)."""

    def __init__(self, n_labels: int, widths: Sequence[int], blocks: int, patch: int = 4, pool: str = "avg"):
        super().__init__()
        if pool not in POOLS:
            raise UserError(f"unknown pooling {pool!r}; choose one of {', '.join(POOLS)}")
        self.stem = nn.Sequential(nn.Conv2d(3, widths[0], patch, stride=patch, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c_in = widths[0]
        for i, width in enumerate(widths):
            for b in range(blocks):
                stages.append(ResidualBlock(c_in, width, stride=2 if (i > 0 and b == 0) else 1))
                c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = pool
        self.feature_dim = c_in * (2 if pool == "avgmax" else 1)
        self.dropout = nn.Dropout(0.1)
        self.head = nn.Linear(self.feature_dim, n_labels)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, D)
        h = self.stages(self.stem(x))
        return torch.cat([h.mean((2, 3)), h.amax((2, 3))], dim=1) if self.pool == "avgmax" else h.mean((2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) -> (B, L) logits
        return self.head(self.dropout(self.features(x)))


ARCHITECTURES = ("convnet", "resnet")
POOLS = ("avg", "avgmax")  # global pooling into the features: average, or average and max side by side
DEFAULT_POOL = {"convnet": "avgmax", "resnet": "avg"}  # the convnet always pools both; a config.json without "pool" predates the choice


def build_network(arch: str, n_labels: int, widths: Sequence[int], blocks: int = 1, patch: int = 4, pool: str | None = None) -> nn.Module:
    if not widths:
        raise UserError("an architecture needs at least one width")
    if arch == "convnet":
        if pool not in (None, "avgmax"):
            raise UserError("the convnet always pools average and max (pool='avgmax')")
        return ConvNet(n_labels, widths, patch)
    if arch == "resnet":
        return ResNet(n_labels, widths, blocks, patch, pool or DEFAULT_POOL["resnet"])
    raise UserError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def role_settings(cfg: ClassifierConfig, role: str) -> dict[str, Any]:
    """Architecture, widths, blocks and seed of one role, from the config."""
    if role not in ROLES:
        raise UserError(f"unknown classifier role {role!r}; choose one of {', '.join(ROLES)}")
    arch, seed = {"reward": (cfg.reward_arch, cfg.reward_seed), "verifier": (cfg.verifier_arch, cfg.verifier_seed),
                  "evaluator": (cfg.evaluator_arch, cfg.evaluator_seed)}[role]
    widths = list(cfg.verifier_widths if role == "verifier" else cfg.convnet_widths if arch == "convnet" else cfg.resnet_widths)
    return {"arch": arch, "seed": seed, "widths": widths, "blocks": cfg.resnet_blocks if arch == "resnet" else 1, "patch": cfg.stem_patch,
            "pool": cfg.resnet_pool if arch == "resnet" else DEFAULT_POOL["convnet"]}
