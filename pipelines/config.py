"""The whole configuration tree: YAML profiles, dotted overrides, one clear error per bad field.

    cfg = load_config("tiny", ["--train.lr=1e-4", "--data.image_size", "128"])

A profile is a YAML file in ``configs/`` (or any path) holding only what differs from the
defaults in code; it may name another profile to start from with ``extends: other``. Overrides
are applied last. The resolved config is what a run records (``save_config``).
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError

from generator.config import DataConfig, LoraConfig, ModelConfig, PhantomConfig, SampleConfig, Section, TrainConfig
from generator.errors import UserError
from generator.fileio import write_text_atomic
from knowledge.config import KnowledgeConfig
from rlhf.config import ImproveConfig, JudgesConfig
from agents.config import AgentsConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PROFILE = "tiny"


def configs_dir() -> Path:
    """Where named profiles live: $SYNTHMED_CONFIGS, else the repository's configs/."""
    return Path(os.environ.get("SYNTHMED_CONFIGS", REPO_ROOT / "configs"))


class RunConfig(Section):
    name: str = "run"  # prefix of the run id: runs/<name>-<timestamp>
    runs_dir: str = "runs"  # parent folder of run directories, relative to the working directory
    seed: int = Field(0, ge=0)  # global seed for Python, NumPy and torch
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"


class SynthesizeConfig(Section):
    """`synthmed synthesize`: a spec (CSV or YAML mix) drawn into a synthetic data set with a memorisation gate."""

    seed: int = Field(0, ge=0)  # seed of image 0's first draw; image i of N draws try t with seed + t * N + i
    batch_size: int | None = Field(None, ge=1)  # images per sampler call; None: sample.batch_size
    format: Literal["png", "dicom"] = "png"  # image files: PNG with text chunks, or DICOM Secondary Capture
    max_tries: int = Field(4, ge=1)  # draws per image in all (first draw and redraws); after that the image is left out and reported
    memorisation_threshold: float | None = Field(None, gt=0, le=1)  # pixel SSIM to the nearest training image above which a draw is rejected; None: judges.eval.memorisation_pixel_threshold
    memorisation_size: int | None = Field(None, ge=8)  # pixels per side both images are reduced to for the gate; None: judges.eval.memorisation_pixel_size
    training_limit: int | None = Field(None, ge=1)  # training images per modality the gate compares with; None: all of them
    require_training_images: bool = True  # no training images to compare with is an error (False: draws pass the gate unchecked, reported)
    verifier: bool = True  # run the verifier (its finding classifiers: agents.verifier.role; alignment, quality) on every draw and report its verdict
    require_verifier_pass: bool = False  # a draw the verifier fails is redrawn like a memorised one; False: the verdict is reported only
    # > 0: each image is drawn with reward guidance at this scale (rlhf.guidance, DDIM eta 0: every step's predicted image
    # moves towards the request's structured expectation by the reward-role classifiers' gradient; the verifier judges with
    # its own, agents.verifier.role, and with role "reward" its verdict is then not independent; the evaluator's
    # probabilities in checks.jsonl stay so). 0: the plain sampler.
    # With --through-graph the graph's agents.reward_guidance applies instead.
    reward_guidance: float = Field(0.0, ge=0)
    reward_guidance_views: int = Field(4, ge=1)  # jittered views the guiding likelihood is averaged over


class SynthmedConfig(Section):
    profile: str = DEFAULT_PROFILE  # the profile this config was loaded from (recorded, not read back)
    run: RunConfig = Field(default_factory=RunConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    phantoms: PhantomConfig = Field(default_factory=PhantomConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)  # the UNet (and LoRA) trainer
    vae_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(lr=5e-4, batch_size=32, max_steps=3000, warmup_steps=100, ema_decay=0.0)
    )  # the VAE trainer
    model: ModelConfig = Field(default_factory=ModelConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    knowledge: KnowledgeConfig = Field(default_factory=KnowledgeConfig)
    judges: JudgesConfig = Field(default_factory=JudgesConfig)  # finding classifiers, alignment model, selector, eval
    agents: AgentsConfig = Field(default_factory=AgentsConfig)  # the agent graph: reasoning backend, rounds, verifier, traces
    improve: ImproveConfig = Field(default_factory=ImproveConfig)  # the self-improvement loop: prompts, reward, DDPO, selection, held-out eval
    synthesize: SynthesizeConfig = Field(default_factory=SynthesizeConfig)  # `synthmed synthesize`: spec to data set, memorisation gate, output format


class ConfigError(UserError):
    """A bad profile or override; the message names the field and says how to fix it."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. YAML 1.1 would read `mixed_precision: no` as False."""


_Loader.yaml_implicit_resolvers = {
    key: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def parse_value(text: str) -> Any:
    """A command-line value as YAML would read it (numbers, true/false, null, [lists], {maps})."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError(f"cannot parse value {_clip(text)}: {exc}") from None
    except RecursionError:  # "[[[[..." thousands deep
        raise ConfigError(f"cannot parse value {_clip(text)}: nested too deeply") from None


def _clip(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-1]} ({len(str(value)):,} characters)"


def resolve_profile(profile: str | os.PathLike) -> Path:
    path = Path(profile)
    if path.suffix in (".yaml", ".yml") or path.exists():
        candidates = [path]
    else:
        candidates = [configs_dir() / f"{profile}.yaml", configs_dir() / f"{profile}.yml"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    names = sorted(p.stem for p in configs_dir().glob("*.yaml"))
    raise ConfigError(f"config profile {str(profile)!r} not found; profiles in {configs_dir()}: {', '.join(names)}")


def _read_profile(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"profiles extend each other in a cycle: {chain}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_Loader) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the profile as UTF-8") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to read; a profile is sections of fields, a few levels deep") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a profile must be a mapping of sections, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str) or not parent.strip():
        raise ConfigError(f"{path}: 'extends' names the profile this one builds on (a name like tiny, or a YAML path), "
                          f"got {_clip(parent)}")
    base = _read_profile(resolve_profile(parent), (*seen, path.resolve()))
    return merge(base, data)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, anything else replaces."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_overrides(args: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Split ``--a.b=v`` / ``--a.b v`` overrides (dotted keys) from the other arguments."""
    overrides: dict[str, Any] = {}
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        key = arg[2:].split("=", 1)[0] if arg.startswith("--") else ""
        if "." in key and re.fullmatch(r"[A-Za-z_][\w]*(\.[\w-]+)+", key):
            if "=" in arg:
                value = arg.split("=", 1)[1]
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"override --{key} has no value; write --{key}=VALUE")
            overrides[key] = parse_value(value)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _known_fields(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the section at ``loc`` (for "did you mean" hints)."""
    for part in loc:
        if model is None:
            return []
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return list(model.model_fields) if model else []


def _origin(dotted: str, overrides: dict[str, str], profile: str) -> str:
    """The override that set (or created the section of) a field, else the profile."""
    for key, flag in overrides.items():
        parent = key.rsplit(".", 1)[0]
        if dotted == key or dotted.startswith(key + ".") or key.startswith(dotted + ".") or dotted.startswith(parent + "."):
            return flag
    return profile


def _explain(exc: ValidationError, overrides: dict[str, str], profile: str) -> ConfigError:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        where = f" (from {_origin(dotted, overrides, profile)})"
        if err["type"] == "extra_forbidden":
            known = _known_fields(SynthmedConfig, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"; did you mean {'.'.join([*map(str, loc[:-1]), close[0]])!r}?" if close else ""
            lines.append(f"{dotted}: unknown field{where}; known fields here: {', '.join(known)}{hint}")
        else:
            lines.append(f"{dotted}: {err['msg']}, got {err.get('input')!r}{where}")
    return ConfigError("invalid configuration:\n  " + "\n  ".join(lines))


def load_config(
    profile: str | os.PathLike | None = None, overrides: list[str] | dict[str, Any] | None = None
) -> SynthmedConfig:
    """Defaults, then the profile (and what it extends), then the dotted overrides."""
    name = str(profile) if profile is not None else DEFAULT_PROFILE
    path = resolve_profile(name)
    # Profiles merge onto the defaults, so a new modality adds to the built-in ones.
    tree = merge(SynthmedConfig().model_dump(mode="json"), _read_profile(path))
    origins: dict[str, str] = {}
    if isinstance(overrides, list):
        overrides, unused = parse_overrides(overrides)
        if unused:
            raise ConfigError(f"not a dotted override: {' '.join(unused)}; write --section.field=VALUE")
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
        origins[key] = f"--{key}"
    tree["profile"] = path.stem if path.parent == configs_dir() else str(path)
    try:
        return SynthmedConfig.model_validate(tree)
    except ValidationError as exc:
        raise _explain(exc, origins, str(path)) from None


def config_to_dict(cfg: SynthmedConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")


def save_config(cfg: SynthmedConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML, atomically (a crash never leaves half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
