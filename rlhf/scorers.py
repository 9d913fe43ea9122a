"""The scorer contract shared by every judge, and weighted composites of scorers.

A scorer is anything with ``name`` and ``score(images, prompts, modalities) -> (scores, details)``:

- ``images``: a float tensor ``(B, 3, H, W)`` in ``[-1, 1]`` (what ``generator.sampling.sample``
  returns), or a list of uint8 arrays ``(H, W)`` / ``(H, W, 3)`` as written to PNG;
  :func:`as_image_batch` turns either into the tensor form;
- ``prompts``: the text each image was drawn from (``B`` strings);
- ``modalities``: the modality id of each image (``B`` strings);
- ``scores``: ``np.ndarray (B,)`` of float, higher is better;
- ``details``: ``dict[str, np.ndarray (B,)]``, the components behind the score, logged by name.

A reward is a :class:`CompositeScorer`: a weighted dict of scorers whose total is the weighted sum
and whose details carry every component under ``"<name>"`` and ``"<name>/<detail>"``. Factories are
registered by name (``@register_scorer("selector")``), so a config can say which scorers to build.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from generator.errors import UserError

ScoreResult = tuple[np.ndarray, dict[str, np.ndarray]]


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, images: Any, prompts: Sequence[str], modalities: Sequence[str]) -> ScoreResult: ...


def as_image_batch(images: Any) -> torch.Tensor:
    """``(B, 3, H, W)`` float32 in ``[-1, 1]`` from a tensor of that form or a list of uint8 arrays.

    Grey images become three equal channels; every image in a list must have the same size."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"images tensor must be (B, 1 or 3, H, W), got {tuple(images.shape)}")
        out = images.detach().float().cpu()
        return out.expand(-1, 3, -1, -1).contiguous() if out.shape[1] == 1 else out
    arrays = [np.asarray(im) for im in images]
    if not arrays:
        raise ValueError("no images")
    tensors = []
    for i, a in enumerate(arrays):
        if a.dtype != np.uint8:
            raise ValueError(f"image {i}: expected uint8 pixels (0-255), got {a.dtype}; pass a [-1, 1] float tensor instead")
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (1, 3):
            raise ValueError(f"image {i}: expected (H, W) or (H, W, 3), got {a.shape}")
        if a.shape[2] == 1:
            a = np.repeat(a, 3, axis=2)
        tensors.append(torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1))
    sizes = {tuple(t.shape) for t in tensors}
    if len(sizes) > 1:
        raise UserError(f"images differ in size ({sorted(sizes)}); resize them to one size first")
    return torch.stack(tensors).float().div(127.5).sub(1.0)


def check_inputs(images: torch.Tensor, prompts: Sequence[str], modalities: Sequence[str]) -> None:
    n = images.shape[0]
    if len(prompts) != n or len(modalities) != n:
        raise ValueError(f"{n} images but {len(prompts)} prompts and {len(modalities)} modalities; give one of each per image")


def check_result(result: ScoreResult, n: int, name: str = "scorer") -> ScoreResult:
    """Raise unless ``result`` honours the contract for a batch of ``n``."""
    scores, details = result
    if not isinstance(scores, np.ndarray) or scores.shape != (n,):
        raise TypeError(f"{name}: scores must be an np.ndarray of shape ({n},), got {type(scores).__name__} {getattr(scores, 'shape', None)}")
    if not isinstance(details, dict):
        raise TypeError(f"{name}: details must be a dict of arrays")
    for key, value in details.items():
        if not isinstance(value, np.ndarray) or value.shape != (n,):
            raise TypeError(f"{name}: details[{key!r}] must be an np.ndarray of shape ({n},), got {getattr(value, 'shape', None)}")
    return result


class CompositeScorer:
    """A weighted sum of named scorers; every component is kept in the details."""

    def __init__(self, components: dict[str, tuple[float, Scorer]], name: str = "reward"):
        if not components:
            raise ValueError("a composite scorer needs at least one component")
        self.components = components
        self.name = name

    def score(self, images: Any, prompts: Sequence[str], modalities: Sequence[str]) -> ScoreResult:
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities)
        n = batch.shape[0]
        total = np.zeros(n, dtype=np.float64)
        details: dict[str, np.ndarray] = {}
        for key, (weight, scorer) in self.components.items():
            scores, extra = check_result(scorer.score(batch, prompts, modalities), n, key)
            total += weight * scores
            details[key] = scores.astype(np.float64)
            for sub, value in extra.items():
                details[f"{key}/{sub}"] = np.asarray(value, dtype=np.float64)
        return total, details


SCORER_FACTORIES: dict[str, Callable[..., Scorer]] = {}


def register_scorer(name: str):
    """Decorator: ``@register_scorer("selector")`` on a factory ``(**kwargs) -> Scorer``."""

    def wrap(factory: Callable[..., Scorer]) -> Callable[..., Scorer]:
        if name in SCORER_FACTORIES and SCORER_FACTORIES[name] is not factory:
            raise ValueError(f"scorer {name!r} is already registered")
        SCORER_FACTORIES[name] = factory
        return factory

    return wrap


# the project's own scorers, registered when their module is imported; build_scorer imports them on demand
BUILTIN_SCORER_MODULES = ("rlhf.classifiers", "rlhf.alignment", "rlhf.selector")


def load_builtin_scorers() -> None:
    import importlib

    for module in BUILTIN_SCORER_MODULES:
        importlib.import_module(module)


def build_scorer(name: str, **kwargs) -> Scorer:
    if name not in SCORER_FACTORIES:
        load_builtin_scorers()
    if name not in SCORER_FACTORIES:
        known = ", ".join(sorted(SCORER_FACTORIES)) or "none"
        raise UserError(f"unknown scorer {name!r}; registered scorers: {known}")
    return SCORER_FACTORIES[name](**kwargs)


def build_composite(weights: dict[str, float], factories_kwargs: dict[str, dict] | None = None, name: str = "reward") -> CompositeScorer:
    """``{"selector": 0.3, "verifier": 0.5, "alignment": 0.2}`` -> a composite of registered scorers."""
    factories_kwargs = factories_kwargs or {}
    return CompositeScorer({k: (float(w), build_scorer(k, **factories_kwargs.get(k, {}))) for k, w in weights.items()}, name)


__all__ = [
    "CompositeScorer", "SCORER_FACTORIES", "ScoreResult", "Scorer", "as_image_batch", "build_composite", "build_scorer",
    "check_inputs", "check_result", "load_builtin_scorers", "register_scorer",
]
