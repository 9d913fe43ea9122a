"""LoRA adapters on the diffusion UNet, through peft only.

The UNet is the DDPO policy; reinforcement learning trains low-rank adapters on its attention
projections and leaves the base weights frozen. Everything here goes through diffusers'
`PeftAdapterMixin` (`add_adapter`, `set_adapters`, ...) and peft's state-dict helpers, as in
diffusers' `train_text_to_image_lora.py`:

- `add_lora` injects a named adapter on an explicit list of module names (`target_modules`), freezes
  the base and keeps the adapter in float32 even when the base runs in fp16/bf16;
- the KL reference of DDPO is the *same* UNet with the adapters switched off (`adapters_disabled`),
  as in flow_grpo, never a second copy of the weights;
- `save_lora`/`load_lora` write and read one adapter-only safetensors file whose metadata carries the
  `LoraSpec`, so a file is enough to rebuild the adapter on a fresh base.

Several named adapters (e.g. one per modality) can live on one UNet: `set_active_adapters` switches
between them or mixes them with weights. peft's rule applies throughout: the *active* adapters are
the trainable ones, inactive ones are frozen.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError
from .fileio import atomic_write

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections of every transformer block
OUT_TARGETS = ("proj_out", "conv_out")  # output projections added by `include_out`

# peft init schemes that leave B = 0 and the base weights untouched; others (pissa, olora, loftq, ...)
# rewrite the base weights, which would break "adapters disabled == base model" and adapter-only saves.
_INITS: dict[str, bool | str] = {"gaussian": "gaussian", "default": True}

# safetensors metadata keys written by `save_lora`; caller metadata may not reuse them.
_META_SPEC = "lora_spec"
_META_RESERVED = (
    "format",
    _META_SPEC,
    "lora_rank",
    "lora_alpha",
    "lora_targets",
    "adapter_name",
    "peft_version",
    "diffusers_version",
)

_SPECS_ATTR = "_synthmed_lora_specs"  # {adapter name: LoraSpec}, set on the unet by add_lora


@dataclass
class LoraSpec:
    """What to adapt and how; mirrors the `lora` section of the run config."""

    rank: int = 8  # r, the inner dimension of each low-rank update
    alpha: float = 8.0  # the update is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the LoRA branch input, training only
    include_mid_block: bool = True  # adapt the mid block's attention projections too (its resnets never)
    include_out: bool = False  # also adapt proj_out of every transformer block and the UNet's conv_out
    init: str = "gaussian"  # peft init_lora_weights: "gaussian" or "default" (kaiming); B = 0 either way

    def __post_init__(self) -> None:
        if int(self.rank) != self.rank or self.rank < 1:
            raise UserError(f"LoraSpec.rank must be a positive integer, got {self.rank!r}")
        if not self.alpha > 0:
            raise UserError(f"LoraSpec.alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoraSpec.dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in _INITS:
            raise UserError(f"LoraSpec.init must be one of {sorted(_INITS)}, got {self.init!r}")
        self.rank = int(self.rank)
        self.alpha = float(self.alpha)
        self.dropout = float(self.dropout)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> LoraSpec:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown LoraSpec field(s) in LoRA file metadata: {unknown}")
        return cls(**data)


# --------------------------------------------------------------------------------------------------
# Targets


def _unwrap(unet: torch.nn.Module) -> torch.nn.Module:
    """The bare UNet under DDP/accelerate (`.module`) or torch.compile (`._orig_mod`) wrappers.

    Adapter keys must be the UNet's own module paths, never "module.<...>".
    """
    while True:
        children = unet._modules
        if "_orig_mod" in children:  # checked first: a compiled module forwards attribute lookups
            unet = children["_orig_mod"]
        elif "module" in children and not hasattr(unet, "add_adapter"):
            unet = children["module"]
        else:
            break
    if not hasattr(unet, "add_adapter"):
        raise TypeError(f"expected a diffusers model with PeftAdapterMixin, got {type(unet).__name__}")
    return unet


def _base_layer(module: torch.nn.Module) -> torch.nn.Module:
    # once adapted, a targeted Linear is a peft wrapper; its original layer sits under it
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _matches(name: str, suffixes: tuple[str, ...]) -> bool:
    return any(name == s or name.endswith("." + s) for s in suffixes)


def target_modules(unet: torch.nn.Module, spec: LoraSpec) -> list[str]:
    """Full names of the modules of `unet` that `spec` adapts, in module order.

    - always: `to_q`, `to_k`, `to_v`, `to_out.0` Linears of every attention in the down and up blocks;
    - `include_mid_block`: the same projections in `mid_block` (never its resnets). When False,
      nothing in `mid_block` is adapted, its `proj_out` included;
    - `include_out`: also `proj_out` of each transformer block (a 1x1 conv or a Linear, depending on
      `use_linear_projection`) and the UNet's final `conv_out`.

    Names are explicit rather than bare suffixes so that what gets adapted is exact and testable.
    Works on a UNet that already carries adapters (the peft wrappers count as their base layer).
    """
    unet = _unwrap(unet)
    suffixes = LORA_TARGETS + (OUT_TARGETS if spec.include_out else ())
    names = []
    for name, module in unet.named_modules():
        if not _matches(name, suffixes):
            continue
        if name.startswith("mid_block.") and not spec.include_mid_block:
            continue
        if not isinstance(_base_layer(module), (torch.nn.Linear, torch.nn.Conv2d)):
            continue  # peft adapts Linear and Conv2d here; anything else under these names is not a projection
        names.append(name)
    if not names:
        raise UserError(f"no LoRA target found in {type(unet).__name__} for {spec}")
    return names


# --------------------------------------------------------------------------------------------------
# Adding adapters and finding their parameters


def _tuner_layers(unet: torch.nn.Module) -> Iterator[tuple[str, BaseTunerLayer]]:
    for name, module in _unwrap(unet).named_modules():
        if isinstance(module, BaseTunerLayer):
            yield name, module


def adapter_names(unet: torch.nn.Module) -> list[str]:
    """Names of the adapters on `unet`, in the order they were added."""
    return list(getattr(_unwrap(unet), "peft_config", {}) or {})


def _check_adapter(unet: torch.nn.Module, name: str) -> None:
    if name not in adapter_names(unet):
        raise KeyError(f"no LoRA adapter named {name!r} on the UNet; adapters: {adapter_names(unet)}")


def add_lora(unet: torch.nn.Module, spec: LoraSpec, name: str = "default") -> None:
    """Add a LoRA adapter `name` to `unet` on `target_modules(unet, spec)` and make it the active one.

    Afterwards only LoRA parameters require grad (the base is frozen; a previously added adapter
    is frozen too, since peft trains the active adapters only), and the new adapter's parameters are
    float32 whatever the base dtype, so that fp16/bf16 mixed precision updates them without
    underflow. A fresh adapter has B = 0 and changes no output.
    """
    if not name or "." in name:
        raise UserError(f"adapter name must be non-empty and contain no '.', got {name!r}")
    if name in adapter_names(unet):
        raise ValueError(f"the UNet already has a LoRA adapter named {name!r}")
    model = _unwrap(unet)
    targets = target_modules(model, spec)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        init_lora_weights=_INITS[spec.init],
        target_modules=targets,
    )
    with warnings.catch_warnings():
        # peft warns whenever a second adapter joins; several named adapters are intended here
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        model.add_adapter(config, adapter_name=name)  # also makes `name` the only active adapter
    if not hasattr(model, _SPECS_ATTR):
        setattr(model, _SPECS_ATTR, {})
    getattr(model, _SPECS_ATTR)[name] = spec

    model.requires_grad_(False)
    for param in lora_parameters(model, name):
        # upcast only the trainable adapter (diffusers' cast_training_params); .data keeps the Parameter object
        if param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
        param.requires_grad_(True)


def lora_parameters(unet: torch.nn.Module, name: str | None = None) -> list[torch.nn.Parameter]:
    """LoRA parameters of adapter `name` (all adapters if None), in module order.

    Returned whatever their `requires_grad`, so this is also the list to hand to an optimiser.
    """
    if name is not None:
        _check_adapter(unet, name)
    params: list[torch.nn.Parameter] = []
    seen: set[int] = set()
    for _, layer in _tuner_layers(unet):
        for attr in layer.adapter_layer_names:  # lora_A, lora_B, and embedding/DoRA variants
            per_adapter = getattr(layer, attr)
            for adapter, sub in per_adapter.items():
                if name is not None and adapter != name:
                    continue
                for p in sub.parameters() if isinstance(sub, torch.nn.Module) else [sub]:
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append(p)
    return params


# --------------------------------------------------------------------------------------------------
# Saving and loading


def read_lora_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The safetensors metadata of a LoRA file (spec, targets, versions and caller metadata)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _adapter_state_dict(unet: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    # peft strips the adapter name: "...to_q.lora_A.weight", loadable under any adapter name
    return get_peft_model_state_dict(_unwrap(unet), adapter_name=name)


def save_lora(
    unet: torch.nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write adapter `name` alone to the safetensors file `path` and return the path.

    Keys are the UNet module paths with neither a "module." wrapper prefix nor the adapter name
    (e.g. "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"). The metadata
    holds the spec (`lora_spec`, JSON), rank, alpha, the adapted module names and `metadata` (values
    that are not strings are JSON-encoded). Only this one file is written.
    """
    _check_adapter(unet, name)
    model = _unwrap(unet)
    spec = getattr(model, _SPECS_ATTR, {}).get(name)
    if spec is None:
        raise ValueError(f"adapter {name!r} was not added by add_lora/load_lora, so its LoraSpec is unknown")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"save_lora writes one file; {path} is a directory")

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _adapter_state_dict(model, name).items()}
    wrapped = sorted(
        k for k in tensors if k.startswith("module.") or f".lora_A.{name}." in k or f".lora_B.{name}." in k
    )
    if wrapped:  # would make the file unloadable into a bare UNet
        raise RuntimeError(f"unexpected wrapper prefix or adapter name in LoRA keys: {wrapped[:5]}")

    import diffusers
    import peft

    meta = {
        "format": "pt",
        _META_SPEC: spec.to_json(),
        "lora_rank": str(spec.rank),
        "lora_alpha": repr(spec.alpha),
        "lora_targets": json.dumps(target_modules(model, spec)),
        "adapter_name": name,
        "peft_version": peft.__version__,
        "diffusers_version": diffusers.__version__,
    }
    for key, value in (metadata or {}).items():
        if key in _META_RESERVED:
            raise ValueError(f"metadata key {key!r} is reserved by save_lora; reserved: {list(_META_RESERVED)}")
        meta[str(key)] = value if isinstance(value, str) else json.dumps(value)

    path.parent.mkdir(parents=True, exist_ok=True)
    # a crash mid-write never leaves a truncated checkpoint under `path`
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def _describe(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_lora(unet: torch.nn.Module, path: str | os.PathLike, name: str = "default") -> LoraSpec:
    """Load the LoRA file `path` into adapter `name` of `unet` and return its spec.

    The adapter is created from the spec in the file's metadata if `unet` lacks it (and then becomes
    the active one); an existing adapter must have the same spec. Loading is strict: a key missing
    from the file, a key the UNet has no place for, or a shape mismatch (a UNet of another
    architecture) raises a ValueError that names the keys, and an adapter created here is removed
    again.
    """
    meta = read_lora_metadata(path)
    if _META_SPEC not in meta:
        raise UserError(f"{path} is not a synthmed LoRA file: no {_META_SPEC!r} in its metadata")
    spec = LoraSpec.from_json(meta[_META_SPEC])
    model = _unwrap(unet)

    created = name not in adapter_names(model)
    if created:
        add_lora(model, spec, name)
    else:
        current = getattr(model, _SPECS_ATTR, {}).get(name)
        if current != spec:
            raise UserError(f"adapter {name!r} exists with spec {current}, but {path} holds {spec}")

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
        expected = {k: v.shape for k, v in _adapter_state_dict(model, name).items()}
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        mismatched = sorted(
            f"{k}: file {tuple(tensors[k].shape)} vs UNet {tuple(expected[k])}"
            for k in set(expected) & set(tensors)
            if tensors[k].shape != expected[k]
        )
        if missing or unexpected or mismatched:
            problems = []
            if missing:
                problems.append(f"missing from the file ({len(missing)}): {_describe(missing)}")
            if unexpected:
                problems.append(f"not in this UNet ({len(unexpected)}): {_describe(unexpected)}")
            if mismatched:
                problems.append(f"shape mismatch ({len(mismatched)}): {_describe(mismatched)}")
            raise UserError(
                f"LoRA file {path} does not fit this UNet (different architecture?); " + "; ".join(problems)
            )
        result = set_peft_model_state_dict(model, tensors, adapter_name=name)
        if result.unexpected_keys:  # peft loads non-strictly (the base keys are "missing"); guard its remap
            raise ValueError(f"peft did not place LoRA keys: {_describe(sorted(result.unexpected_keys))}")
    except Exception:
        if created:
            _delete_adapter(model, name)
        raise
    return spec


def _delete_adapter(unet: torch.nn.Module, name: str) -> None:
    unet.delete_adapters(name)
    getattr(unet, _SPECS_ATTR, {}).pop(name, None)


# --------------------------------------------------------------------------------------------------
# Switching, disabling, merging


def set_active_adapters(unet: torch.nn.Module, names: list[str], weights: list[float] | None = None) -> None:
    """Make exactly `names` active, each scaled by its weight (1.0 if `weights` is None).

    Outputs then add `weight * alpha/rank * B A x` of every named adapter; the active adapters become
    trainable and the others frozen (peft's rule). Use `adapters_disabled` for the base model.
    """
    if isinstance(names, str):
        names = [names]
    if not names:
        raise ValueError("set_active_adapters needs at least one adapter; use adapters_disabled() for the base UNet")
    for n in names:
        _check_adapter(unet, n)
    if weights is not None and len(weights) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
    model = _unwrap(unet)
    if any(layer.merged for _, layer in _tuner_layers(model)):
        raise RuntimeError("adapters are merged into the base weights; call unmerge_lora() before switching")
    model.set_adapters(list(names), [float(w) for w in weights] if weights is not None else None)


def active_adapters(unet: torch.nn.Module) -> list[str]:
    """Names of the adapters in use (empty if there are none)."""
    for _, layer in _tuner_layers(unet):
        return list(layer.active_adapters)
    return []


@contextmanager
def adapters_disabled(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, `unet` computes exactly the base model's outputs: the DDPO/GRPO KL reference.

    The same weights serve policy and reference, so no second UNet is kept in memory. On exit the
    previous state is restored whatever happened inside: active set, per-adapter scales, the enabled
    flag and every LoRA parameter's `requires_grad` (peft freezes adapters while disabled).
    """
    model = _unwrap(unet)
    layers = [layer for _, layer in _tuner_layers(model)]
    if any(layer.merged for layer in layers):
        # peft would silently unmerge on the first disabled forward and leave the UNet unmerged
        raise RuntimeError("adapters are merged into the base weights; call unmerge_lora() before adapters_disabled()")
    saved = [(list(layer.active_adapters), layer.disable_adapters, dict(layer.scaling)) for layer in layers]
    grads = [(p, p.requires_grad) for p in lora_parameters(model)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield unet
    finally:
        for layer, (active, was_disabled, scaling) in zip(layers, saved):
            layer.set_adapter(active)
            layer.enable_adapters(not was_disabled)
            layer.scaling.clear()
            layer.scaling.update(scaling)
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


@contextmanager
def merged_for_sampling(unet: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Inside, the active adapters are folded into the base weights: a forward without the LoRA branches
    (~9% faster sampling on a CPU), for drawing only (no gradient reaches the adapters while merged). On exit
    the base weights are *restored* bit for bit rather than unmerged, so repeated use leaves no rounding
    drift and a resumed run stays identical to an uninterrupted one."""
    layers = [layer for _, layer in _tuner_layers(unet)]
    if any(layer.merged for layer in layers):
        raise RuntimeError("adapters are already merged into the base weights")
    saved = [(layer.get_base_layer(), layer.get_base_layer().weight.detach().clone()) for layer in layers]
    try:
        for layer in layers:
            layer.merge()
        yield unet
    finally:
        with torch.no_grad():
            for base, weight in saved:
                base.weight.copy_(weight)
        for layer in layers:
            layer.merged_adapters.clear()


def merge_lora(unet: torch.nn.Module, names: list[str] | None = None) -> None:
    """Fold adapters `names` (the active ones if None), at their current weights, into the base weights.

    For inference and export: the merged forward equals the unmerged one up to rounding (in the base
    dtype), but no gradient reaches the LoRA parameters while merged. Undo with `unmerge_lora`.
    """
    if names is not None:
        for n in names:
            _check_adapter(unet, n)
    for _, layer in _tuner_layers(unet):
        layer.merge(adapter_names=list(names) if names is not None else None)


def unmerge_lora(unet: torch.nn.Module) -> None:
    """Subtract every merged adapter from the base weights again (exact up to rounding)."""
    for _, layer in _tuner_layers(unet):
        if layer.merged:
            layer.unmerge()


# --------------------------------------------------------------------------------------------------
# Adapters named by users: files, or the folders `synthmed improve` writes


def resolve_lora_path(path: str | os.PathLike) -> Path:
    """A LoRA file, or a folder holding one: an adapter folder (final/, best/: ``lora.safetensors``), or a
    ``synthmed improve`` run folder (its best/, else final/)."""
    p = Path(path)
    if p.is_file():
        return p
    for candidate in (p / "lora.safetensors", p / "best" / "lora.safetensors", p / "final" / "lora.safetensors"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"no LoRA adapter at {p}: give a .safetensors file, a run's final/ or best/ folder, or a run folder")


def apply_adapters(unet: torch.nn.Module, paths: list[str] | tuple[str, ...]) -> list[str]:
    """Load each adapter (file or folder, see `resolve_lora_path`) and make them all active; their names."""
    names = []
    for i, path in enumerate(paths):
        name = f"adapter{i}"
        load_lora(unet, resolve_lora_path(path), name)
        names.append(name)
    if names:
        set_active_adapters(unet, names)
    return names
