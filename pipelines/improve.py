"""`synthmed improve`: the self-improvement loop, its run directory and resume.

One epoch: draw prompts -> roll out K images each (DDIM, eta > 0, guidance, log probabilities) ->
reward (reward-role judges against each prompt's structured expectation) -> group advantages ->
PPO-clip update of the UNet's LoRA (stage 1) -> reward-weighted update on the samples the selector
and the verifier keep (stage 2; its candidates are the rollouts, or with ``improve.selection.source=guided`` one
reward-guided draw per rollout) -> held-out evaluation every ``improve.eval.every`` epochs (and at
epoch 0, the base model) -> the reward-hacking guard -> an atomic checkpoint.

The run directory ``runs/<id>/``::

    config.yaml  metadata.json  heldout_prompts.jsonl  combinations.json
    metrics.jsonl   append-only; per optimiser step, per epoch (reward components overall and per
                    modality, seconds), per evaluation (the held-out table), guard and end lines
    samples.jsonl   every rollout: prompt, modality, expected findings, seed, components, advantage, selected (with
                    improve.selection.source=guided: its guided draft's reward and components, and "selected" is the draft's)
    grids/epoch_NNNN.png (epoch_NNNN_guided.png: the guided drafts)   heldout/epoch_NNNN.png   plots/*.png
    checkpoints/epoch_NNNN/   lora.safetensors, trainer_state.pt, state.json (written to a temporary
                    folder, then renamed: complete or absent)
    final/  best/   lora.safetensors (synthmed), pytorch_lora_weights.safetensors (diffusers), metadata.json

Logs are written once per epoch, after the epoch finished and before its checkpoint; the checkpoint
records the log sizes. A run killed between the two leaves lines of an epoch without a checkpoint:
``--resume`` moves them to ``<log>.orphaned`` and repeats the epoch, so no line is lost or doubled.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from generator.errors import UserError
from generator.fileio import append_whole, atomic_folder, json_default, write_json_atomic
from generator.paths import shipped
from generator.runlock import RunFolderInUseError, RunLock
from rlhf.trainer import NonFiniteError, UpdateStats, sample_seed

from .config import SynthmedConfig, config_to_dict, load_config, save_config
from .run_plots import draw_plots
from .runs import GUIDANCE_FILE, OFFSET_TABLE_FILE, SCALED_ADAPTER, STEERED_ADAPTER, outside_gain_terms, read_guidance

log = logging.getLogger(__name__)

RUN_KIND = "synthmed improve run"
RESUMABLE_FIELDS = ("improve.ddpo.epochs", "profile", "run.device", "improve.report_to")  # may differ on --resume


class ResumeError(UserError):
    pass


# -- run directory ------------------------------------------------------------------------------
def _clean(value):
    """JSON-safe: NaN/inf -> None, numpy -> Python, rounded floats."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        v = float(value)
        return round(v, 6) if np.isfinite(v) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        name = f"{prefix}{key}"
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_differences(va, vb, name + ".")
        elif va != vb:
            out.append(f"{name}: run has {vb!r}, now {va!r}")
    return out


def pin_lr_horizon(cfg: SynthmedConfig) -> SynthmedConfig:
    """A new run's config with a cosine learning-rate schedule's horizon written down (``improve.ddpo.lr_schedule_epochs``
    = its epochs, where unset), so a run resumed to more epochs keeps the rates it ran with and goes on at the floor."""
    ddpo = cfg.improve.ddpo
    if ddpo.lr_schedule != "cosine" or ddpo.lr_schedule_epochs is not None:
        return cfg
    improve = cfg.improve.model_copy(update={"ddpo": ddpo.model_copy(update={"lr_schedule_epochs": ddpo.epochs})})
    return cfg.model_copy(update={"improve": improve})


def resume_config(run: Path, cfg: SynthmedConfig | None) -> SynthmedConfig:
    """The run's own config, or ``cfg`` when it differs from it only in fields that may change."""
    saved_path = run / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"{run} is not a synthmed improve run (no config.yaml); list runs with `synthmed runs list`")
    saved = load_config(saved_path)
    if cfg is None:
        return saved
    diffs = [d for d in config_differences(config_to_dict(cfg), config_to_dict(saved)) if d.split(":")[0] not in RESUMABLE_FIELDS]
    if diffs:
        raise ResumeError(f"cannot resume {run}: its config differs in {len(diffs)} field(s): " + "; ".join(diffs[:8])
                          + ("; ..." if len(diffs) > 8 else "") + ". Resume with the run's own settings (`synthmed improve --resume "
                          f"{run}` without --config or overrides, or only --improve.ddpo.epochs), or start a new run")
    return cfg


def latest_checkpoint(run: Path) -> Path | None:
    done = sorted(p for p in (run / "checkpoints").glob("epoch_*") if (p / "state.json").is_file())
    return done[-1] if done else None


def _checkpoint_fix(checkpoint: Path) -> str:
    return f"delete {checkpoint} to resume from the checkpoint before it, or start a new run"


def _load_trainer_state(checkpoint: Path) -> dict:
    """trainer_state.pt of ``checkpoint`` (trainer and RNG states), read with ``weights_only=True``: a pickle is refused."""
    from generator.safeload import load_torch_file

    state = load_torch_file(checkpoint / "trainer_state.pt", "DDPO trainer state", _checkpoint_fix(checkpoint))
    if not isinstance(state, dict) or not {"trainer", "rng"} <= set(state):
        raise ResumeError(f"{checkpoint / 'trainer_state.pt'} is not a DDPO trainer state; {_checkpoint_fix(checkpoint)}")
    return state


def _read_checkpoint_state(checkpoint: Path) -> dict:
    """state.json of ``checkpoint``, after checking that its adapter file opens."""
    from generator.safeload import check_safetensors

    fix = _checkpoint_fix(checkpoint)
    try:
        state = json.loads((checkpoint / "state.json").read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ResumeError(f"{checkpoint / 'state.json'} is damaged ({exc}); {fix}") from None
    if not isinstance(state, dict) or not {"epoch", "logs", "guard"} <= set(state):
        raise ResumeError(f"{checkpoint / 'state.json'} is not a synthmed improve checkpoint state; {fix}")
    check_safetensors(checkpoint / "lora.safetensors", "checkpoint adapter", fix)
    return state


def _truncate_log(path: Path, size: int) -> int:
    """Cut ``path`` back to ``size`` bytes; what followed (lines of an epoch that never reached its
    checkpoint) is appended to ``<path>.orphaned``. Returns the number of bytes moved."""
    if not path.exists():
        if size:
            raise ResumeError(f"{path} is missing but the checkpoint says it held {size} bytes")
        return 0
    current = path.stat().st_size
    if current < size:
        raise ResumeError(f"{path} holds {current} bytes but the checkpoint recorded {size}: the log was cut; cannot resume safely")
    if current == size:
        return 0
    with open(path, "rb") as f:
        f.seek(size)
        tail = f.read()
    with open(path.with_name(path.name + ".orphaned"), "ab") as f:
        f.write(tail)
    with open(path, "r+b") as f:
        f.truncate(size)
    return len(tail)


def append_lines(path: Path, records: Sequence[dict]) -> None:
    """All of ``records`` as JSON lines, or none of them (a full disk leaves the log as it was)."""
    if not records:
        return
    text = "".join(json.dumps(_clean(r), default=json_default) + "\n" for r in records)
    append_whole(path, text.encode("utf-8"))


# -- adapters -------------------------------------------------------------------------------
def save_adapter(model, folder: Path, metadata: dict, findings: bool = False, lora: bool = True,
                 extra: Callable[[Path], object] | None = None) -> Path:
    """``folder`` with the adapter as synthmed reads it (lora.safetensors), as diffusers reads it
    (pytorch_lora_weights.safetensors: ``unet.``-prefixed peft keys, ``pipe.load_lora_weights``) and
    metadata.json, and with ``findings`` the tuned finding table (findings.safetensors, read by --lora with the
    adapter; diffusers has no place for it); written beside and renamed into place. ``lora`` False leaves the LoRA's
    files out (a steered folder that steers the base); ``extra(tmp)`` writes more into it before it is renamed."""
    from safetensors.torch import save_file

    from generator.lora import _adapter_state_dict, save_lora
    from generator.models import FINDING_TABLE_FILE, save_finding_table

    unet = model.unet
    with atomic_folder(folder, folder.with_name(folder.name + ".tmp")) as tmp:
        if lora:
            save_lora(unet, tmp / "lora.safetensors", metadata={"synthmed_run": metadata.get("run", "")})
            state = {f"unet.{k}": v.detach().cpu().contiguous() for k, v in _adapter_state_dict(unet, "default").items()}
            save_file(state, str(tmp / "pytorch_lora_weights.safetensors"))
        if findings:
            save_finding_table(model, tmp / FINDING_TABLE_FILE, {"synthmed_run": metadata.get("run", "")})
        if extra is not None:
            extra(tmp)
        write_json_atomic(tmp / "metadata.json", {**metadata, "finding_table": findings}, ensure_ascii=False)
    return folder


# -- parts ----------------------------------------------------------------------------------------
@dataclass
class Parts:
    model: Any
    sampler: Any
    reward: Any
    judges: Any
    reference: Any
    train_images: dict
    selector_threshold: float | None


def build_parts(cfg: SynthmedConfig, device: str = "cpu", progress: bool = True, load_eval: bool = True) -> Parts:
    """Policy (base model + a fresh LoRA), prompt sampler, reward and the held-out judges of ``cfg``."""
    from agents.requests import PromptSampler
    from generator.lora import add_lora
    from generator.lora_training import lora_spec
    from generator.models import LatentDiffusion
    from rlhf.reward import build_reward

    ic = cfg.improve
    unknown = [m for m in ic.prompts.modalities if m not in cfg.data.modalities]
    if unknown:
        raise UserError(f"improve.prompts.modalities: unknown modality {unknown[0]!r}; known modalities: {', '.join(cfg.data.modalities)} "
                        "(a new one is an entry in data.modalities)")
    if not ic.prompts.modalities:
        raise UserError("improve.prompts.modalities is empty; list at least one of " + ", ".join(cfg.data.modalities))
    base = ic.base_model or cfg.train.out
    model = LatentDiffusion.load(base, list(cfg.data.modalities), device=device)
    model.requires_grad_(False)
    with torch.random.fork_rng():  # the adapter's A matrices: the same on every rank and every run of this config
        torch.manual_seed(ic.ddpo.seed)
        add_lora(model.unet, lora_spec(cfg.lora), "default")
    reward = build_reward(ic.reward, cfg.judges, ic.prompts.modalities, device=device, verifier_role=cfg.agents.verifier.role)
    labels = {m: c.label_names for m, c in reward.finding_scorer.classifiers.items()}
    sampler = PromptSampler(ic.prompts, labels, *request_catalogue(cfg, base, ic.prompts.modalities))
    unknown = [m for m in ic.prompts.modalities if m not in model.modalities]
    if unknown:
        raise UserError(f"improve.prompts.modalities: the generator at {base} has no embedding for {', '.join(unknown)}; it knows "
                        f"{', '.join(model.modalities)}")
    threshold = None
    if "selector" in reward.scorers:
        threshold = float(reward.scorers["selector"].selector.threshold)
    judges = reference = None
    train_images: dict = {}
    if load_eval:
        from rlhf.evaluate import load_judges, manifest_cases, model_training_images, read_training_images
        from rlhf.heldout import ReferenceSet

        mods, size = list(ic.prompts.modalities), model.cfg.image_size
        judges = load_judges(cfg.judges, mods, device=device)
        if cfg.data.manifests:  # a profile of real images: its validation rows are the real side, its training splits memorised against
            missing = [m for m in cfg.data.manifests if not Path(m).is_file()]
            if missing:
                raise UserError(f"{missing[0]} not found: the held-out evaluation compares with the profile's real images; "
                                "build its manifests with `synthmed data meddata`")
            cases = manifest_cases(list(cfg.data.manifests), cfg.data, size, mods, 8 * ic.eval.reference_per_finding, cfg.judges.eval.seed)
            reference = ReferenceSet(judges, mods, size, ic.eval.reference_per_finding, cfg.judges.eval.seed, cases=cases)
            train_images = model_training_images(shipped(base), size, cfg, progress=progress)  # all of them: ~10 s
        else:
            reference = ReferenceSet(judges, mods, size, ic.eval.reference_per_finding, cfg.judges.eval.seed)
            present = [m for m in cfg.agents.verifier.training_data if Path(m).is_file()]
            if present:
                train_images = read_training_images(present, cfg, size, mods, limit=300, first_wins=True)
    return Parts(model, sampler, reward, judges, reference, train_images, threshold)


def request_catalogue(cfg: SynthmedConfig, base: str | Path, modalities: Sequence[str]) -> tuple[dict, dict | None]:
    """(catalogue, wording): per modality, what the loop's requests may ask for and the words prompts are composed in.
    For a generator trained on reports (its ``wording.json``, the real profile): the labels its captions word, in the
    lexicon's terms, and that wording; elsewhere ({}, None): the phantom catalogue and templates."""
    from agents.requests import wording_catalogue
    from generator.data.wording import read_wording

    wording = read_wording(shipped(base))
    if not wording:
        return {}, None
    from knowledge.open import lexicon_for

    concepts = lexicon_for(cfg)
    return {m: wording_catalogue(wording, m, concepts) for m in modalities if m in wording}, wording


# -- reward-hacking guard -------------------------------------------------------------------------
class RewardHackingGuard:
    """Stops the loop when, for ``patience`` evaluations in a row, the training reward rose while the
    held-out evaluator's share fell, or the FD is worse than the base's by more than ``fd_tolerance``, or (with
    ``modality_fd_tolerance``) one modality's FD is worse than its base's by more than that."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.history: list[dict] = []  # {"epoch", "reward", "share", "fd"}
        self.strikes = 0
        self.pending: list[float] = []  # epoch mean rewards since the last evaluation

    def state_dict(self) -> dict:
        return {"history": self.history, "strikes": self.strikes, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.history, self.strikes = list(state["history"]), int(state["strikes"])
        self.pending = list(state.get("pending", []))

    def add_reward(self, reward: float) -> None:
        """One epoch's mean training reward; an evaluation compares the mean since the previous one."""
        self.pending.append(float(reward))

    def acceptable(self, fd: float | None, ms_ssim: float | None) -> str | None:
        """Why an evaluation's images may not be best/ (FD past ``fd_tolerance`` of the base's, or MS-SSIM within a prompt
        more than ``best_ms_ssim_rise`` above it), or None when they may; call before ``observe`` records it. The base
        (no evaluation recorded yet) always may."""
        base = self.history[0] if self.history else None
        if base is None or not self.cfg.best_within_tolerance:
            return None
        return outside_gain_terms(fd, ms_ssim, base.get("fd"), base.get("ms_ssim"), self.cfg.fd_tolerance,
                                  self.cfg.best_ms_ssim_rise)

    def observe(self, epoch: int, reward: float | None, share: float | None, fd: float | None,
                fd_by_modality: dict[str, float | None] | None = None, ms_ssim: float | None = None) -> str | None:
        """Record one evaluation (``reward``: None to use the mean of the epochs added since the last one);
        the message when the loop must stop, else None."""
        if reward is None and self.pending:
            reward = float(np.mean(self.pending))
        self.pending = []
        previous = self.history[-1] if self.history else None
        base = self.history[0] if self.history else None
        self.history.append({"epoch": epoch, "reward": reward, "share": share, "fd": fd, "fd_by_modality": dict(fd_by_modality or {}),
                             "ms_ssim": ms_ssim})
        if not self.cfg.enabled or previous is None:
            return None
        signs = []
        if reward is not None and previous["reward"] is not None and share is not None and previous["share"] is not None:
            if reward > previous["reward"] and share < previous["share"] - self.cfg.min_drop:
                signs.append(f"training reward rose {previous['reward']:.4f} -> {reward:.4f} while the held-out evaluator's "
                             f"{self.cfg.metric} fell {previous['share']:.3f} -> {share:.3f}")
        if fd is not None and base is not None and base["fd"] is not None and fd > base["fd"] * (1 + self.cfg.fd_tolerance):
            signs.append(f"FD {fd:.2f} is more than {self.cfg.fd_tolerance:.0%} worse than the base model's {base['fd']:.2f}")
        tolerance = self.cfg.modality_fd_tolerance
        if tolerance is not None:
            base_fd = base.get("fd_by_modality") or {}  # absent in the guard state of a run from before this field
            for modality, value in (fd_by_modality or {}).items():
                first = base_fd.get(modality)
                if value is not None and first is not None and value > first * (1 + tolerance):
                    signs.append(f"{modality} FD {value:.2f} is more than {tolerance:.0%} worse than the base model's {first:.2f}")
        self.strikes = self.strikes + 1 if signs else 0
        if self.strikes >= self.cfg.patience:
            return (f"reward hacking suspected at epoch {epoch} ({self.strikes} evaluations in a row): " + "; ".join(signs)
                    + ". best/ keeps the adapter with the best held-out result within the FD and MS-SSIM tolerances.")
        return None


# -- the loop ---------------------------------------------------------------------------------
def _summary(values: np.ndarray) -> dict:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return {"mean": float(v.mean()) if v.size else None, "std": float(v.std()) if v.size else None}


def epoch_reward_summary(items: Sequence[Any], total: np.ndarray, components: dict[str, np.ndarray]) -> tuple[dict, dict]:
    names = [k for k in components if "/" not in k]
    overall = {"total": _summary(total), **{k: _summary(components[k]) for k in names}}
    per_modality = {}
    for m in dict.fromkeys(it.modality for it in items):
        idx = np.array([i for i, it in enumerate(items) if it.modality == m])
        per_modality[m] = {"total": _summary(total[idx]), **{k: _summary(components[k][idx]) for k in names}}
    return overall, per_modality


def _gather(accelerator, array: np.ndarray) -> np.ndarray:
    if accelerator.num_processes == 1:
        return np.asarray(array)
    tensor = torch.as_tensor(np.asarray(array, dtype=np.float64))
    return accelerator.gather(tensor).cpu().numpy()


def _trackers(report_to: str) -> list[str]:
    if report_to == "none":
        return []
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401

            return ["tensorboard"]
        except ImportError:
            return []
    import importlib.util

    package = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}[report_to]
    if importlib.util.find_spec(package) is None:
        raise UserError(f"--report-to {report_to}: the {package} package is not installed; `pip install {package}`, or use "
                        "--report-to none (metrics.jsonl is always written)")
    return [report_to]


def _rng_state() -> dict:
    """The torch, numpy and Python RNG states as tensors, numbers and lists: ``torch.load(weights_only=True)`` reads them."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):  # checkpoints before this format hold np.random.get_state()'s tuple itself
        numpy_state = (numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                       numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    if isinstance(python_state, dict):
        python_state = (python_state["version"], tuple(python_state["internal"]), python_state["gauss_next"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)


def new_run_dir(cfg: SynthmedConfig) -> Path:
    from generator.fileio import claim_new_folder

    root = claim_new_folder(Path(cfg.run.runs_dir) / f"{cfg.run.name}-improve-{time.strftime('%Y%m%d-%H%M%S')}")
    (root / "checkpoints").mkdir()
    return root


def run_improve(cfg: SynthmedConfig, run_dir: Path | None = None, resume: bool = False, progress: bool = True,
                parts: Parts | None = None, command: str | None = None, stop_after: Callable[[str, int], bool] | None = None,
                accelerator=None) -> dict:
    """Run (or with ``resume`` continue) the loop in ``run_dir``; returns the end record. The main process
    holds the run folder's lock (``generator.runlock``) until the run ends, however it ends."""
    with ExitStack() as held:
        return _run_improve(held, cfg, run_dir, resume, progress, parts, command, stop_after, accelerator)


def _lock_run_folder(held: ExitStack, root: Path) -> str | None:
    """Hold ``root``'s lock until ``held`` closes; the refusal when another process holds it."""
    try:
        held.enter_context(RunLock(root))
    except RunFolderInUseError as exc:
        return str(exc)
    return None


def _run_improve(held: ExitStack, cfg: SynthmedConfig, run_dir: Path | None, resume: bool, progress: bool, parts: Parts | None,
                 command: str | None, stop_after: Callable[[str, int], bool] | None, accelerator) -> dict:
    """Run (or with ``resume`` continue) the loop in ``run_dir``; returns the end record.

    ``stop_after(point, epoch)`` is for tests: returning True raises SystemExit at that point
    ("rollout", "update", "logs", "checkpoint"), as a kill would stop the process there."""
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list

    from agents.requests import load_prompts, save_prompts
    from generator.lora import read_lora_metadata
    from rlhf.heldout import heldout_evaluation
    from rlhf.trainer import DDPOTrainer

    from generator.devices import device_name

    if not resume:
        cfg = pin_lr_horizon(cfg)
    ic = cfg.improve
    accelerator = accelerator or Accelerator(log_with=_trackers(ic.report_to) or None,
                                             project_dir=str(run_dir) if run_dir else None,
                                             cpu=device_name(cfg.run.device) == "cpu")
    main = accelerator.is_main_process
    world = accelerator.num_processes
    if ic.num_threads:
        torch.set_num_threads(ic.num_threads)
    elif world > 1 and accelerator.device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    device = str(accelerator.device)

    # the run folder: made and locked by the main process, its path (or the lock's refusal) shared with the others
    holder = [str(run_dir) if run_dir else None, None]
    if not resume and run_dir and (Path(run_dir) / "metrics.jsonl").exists():  # every rank sees it and stops
        raise UserError(f"{run_dir} already holds a run; continue it with `synthmed improve --resume {run_dir}` or "
                        "choose another --run-dir")
    if main and not resume:
        root = Path(run_dir) if run_dir else new_run_dir(cfg)
        (root / "checkpoints").mkdir(parents=True, exist_ok=True)
        holder = [str(root), None]
    if main:
        holder[1] = _lock_run_folder(held, Path(holder[0]))
    if world > 1:
        broadcast_object_list(holder)
    if holder[1]:
        raise RunFolderInUseError(holder[1])
    root = Path(holder[0])
    progress = progress and main

    parts = parts or build_parts(cfg, device=device, progress=progress, load_eval=main)
    model, sampler, reward = parts.model, parts.sampler, parts.reward
    trainer = DDPOTrainer(model, reward, ic.ddpo, ic.selection, accelerator, parts.selector_threshold)
    if ic.eval.guidance_scales:  # refused before anything is written
        trainer.reward_scorer("improve.eval.guidance_scales (calibrating reward guidance)")
    guard = RewardHackingGuard(ic.guard)
    metrics_path, samples_path = root / "metrics.jsonl", root / "samples.jsonl"
    best: dict | None = None
    start_epoch = 0
    base_model = str(ic.base_model or cfg.train.out)

    if resume:
        if main:
            from generator.fileio import sweep_temporaries

            sweep_temporaries(root)
        checkpoint = latest_checkpoint(root)
        if checkpoint is not None:
            state = _read_checkpoint_state(checkpoint)
            meta = read_lora_metadata(checkpoint / "lora.safetensors")
            from generator.lora_training import lora_spec

            saved_spec, wanted = json.loads(meta["lora_spec"]), json.loads(lora_spec(cfg.lora).to_json())
            if saved_spec != wanted:
                raise ResumeError(f"cannot resume {root}: its adapter has LoRA settings {saved_spec}, this config asks for {wanted}")
            if state.get("base_model") != base_model:
                raise ResumeError(f"cannot resume {root}: it improves the base model {state.get('base_model')}, this config names {base_model}")
            from generator.models import FINDING_TABLE_FILE

            if trainer.trains_findings and not (checkpoint / FINDING_TABLE_FILE).is_file():
                raise ResumeError(f"{checkpoint} holds no {FINDING_TABLE_FILE} but this run tunes the finding table; "
                                  + _checkpoint_fix(checkpoint))
            load_adapter_folder(model, checkpoint)
            trainer_state = _load_trainer_state(checkpoint)
            trainer.load_state_dict(trainer_state["trainer"])
            _set_rng_state(trainer_state["rng"])
            guard.load_state_dict(state["guard"])
            best = state.get("best")
            start_epoch = int(state["epoch"]) + 1
            if main:
                moved = _truncate_log(metrics_path, state["logs"]["metrics.jsonl"]) + _truncate_log(samples_path, state["logs"]["samples.jsonl"])
                if moved:
                    log.warning("resume: %d bytes of logs from an epoch that did not reach its checkpoint moved to *.orphaned", moved)
                print(f"resuming {root} after epoch {state['epoch']} (checkpoint {checkpoint.name})")
        elif main:
            for path in (metrics_path, samples_path):
                _truncate_log(path, 0)
    heldout_path, test_path = root / "heldout_prompts.jsonl", root / "test_prompts.jsonl"
    if main and not heldout_path.is_file():
        save_prompts(sampler.heldout(), heldout_path)
        if ic.prompts.test_per_modality:
            save_prompts(sampler.test(), test_path)
        write_json_atomic(root / "combinations.json", {"train": sorted(sampler.combination_keys("train")),
                                                       "heldout": sorted(sampler.combination_keys("heldout"))}, ensure_ascii=False)
        save_config(cfg, root / "config.yaml")
    accelerator.wait_for_everyone()
    heldout = load_prompts(heldout_path)
    test = load_prompts(test_path) if test_path.is_file() else []  # a run from before the test set has none
    leaked = {p.key for p in [*heldout, *test]} & sampler.combination_keys("train")
    if leaked:
        raise UserError(f"held-out combinations {sorted(leaked)[:3]} are also training combinations; the held-out set must be disjoint")

    metadata_path = root / "metadata.json"
    if metadata_path.is_file():
        metadata = json.loads(metadata_path.read_text())
    else:
        encoder = model.conditioner.text_encoder
        cut = encoder.truncated([p.prompt for p in heldout])
        if cut and main:
            log.warning("%d of %d held-out prompts are longer than the %d tokens the generator reads (model.text_max_length); "
                        "their ends are never seen", cut, len(heldout), encoder.max_length)
        metadata = {
            "kind": RUN_KIND, "command": command or "synthmed " + " ".join(sys.argv[1:]), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "base_model": base_model, "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha},
            "trainable": ic.ddpo.trainable, "world_size": world,
            "reward_weights": ic.reward.weights, "selection": ic.selection.enabled,
            "prompt_tokens": {"limit": encoder.max_length, "heldout_truncated": cut},
        }
    metadata.update({"status": "running", "epochs_planned": ic.ddpo.epochs})
    if main:
        write_json_atomic(metadata_path, metadata, ensure_ascii=False)
        if accelerator.trackers:
            accelerator.init_trackers("synthmed-improve", config={"lr": ic.ddpo.lr, "epochs": ic.ddpo.epochs})

    k = ic.ddpo.images_per_prompt
    n_prompts = ic.ddpo.prompts_per_epoch
    end: dict = {}

    def evaluate(epoch: int, lines: list[dict]) -> str | None:
        """Held-out table, best/, the guard; runs on the main process only."""
        nonlocal best
        from generator.lora import merged_for_sampling

        with merged_for_sampling(model.unet):
            result = heldout_evaluation(model, heldout, parts.judges, parts.reference, ic.eval, cfg.judges.eval, ic.ddpo.guidance,
                                        parts.train_images, ic.ddpo.sample_batch_size, progress)
        images = result.pop("images")
        _save_grid(images, [it.modality for it in heldout for _ in range(ic.eval.images_per_prompt)], cfg,
                   root / "heldout" / f"epoch_{epoch:04d}.png", columns=ic.eval.images_per_prompt * 4)
        share = result["overall"]["all_requested_shown"]
        score = (share or 0.0, result["overall"]["finding_accuracy"] or 0.0)
        overall = result["overall"]
        refused = guard.acceptable(overall["fd"], overall["ms_ssim"])  # images past the gain's tolerances are never best/
        is_best = refused is None and (best is None or score > tuple(best["score"]))
        if is_best:
            best = {"epoch": epoch, "score": list(score), "overall": result["overall"]}
            save_adapter(model, root / "best", {"run": str(root), "epoch": epoch, "heldout": result["overall"],
                                                     "base_model": base_model, "kind": "synthmed LoRA adapter (best held-out)"},
                         findings=trainer.trains_findings)
        lines.append({"kind": "eval", "epoch": epoch, **result, "best": is_best, **({"not_best_because": refused} if refused else {})})
        message = guard.observe(epoch, None, overall[ic.guard.metric], overall["fd"],
                                {m: row.get("fd") for m, row in (result.get("per_modality") or {}).items()}, overall["ms_ssim"])
        if message:
            lines.append({"kind": "guard", "epoch": epoch, "message": message})
        return message

    def test_evaluation(epoch: int, adapter: str) -> dict:
        return {"kind": "test", "epoch": epoch, "adapter": adapter, **judge_test_set(model, test, parts, cfg, adapter, progress)}

    def finish_epoch(epoch: int, lines: list[dict], samples: list[dict]) -> None:
        if stop_after and stop_after("logs", epoch):
            raise SystemExit(f"stopped before the logs of epoch {epoch}")
        if main:
            append_lines(metrics_path, lines)
            append_lines(samples_path, samples)
        if stop_after and stop_after("checkpoint", epoch):
            raise SystemExit(f"stopped before the checkpoint of epoch {epoch}")
        if main:
            _checkpoint(root, epoch, model, trainer, guard, best, base_model, ic.keep_checkpoints)
            for record in lines:
                _track(accelerator, record)
            if any(r["kind"] == "eval" for r in lines):  # redrawn at every evaluation; the last epoch always has one
                draw_plots(root)
        accelerator.wait_for_everyone()

    stopped = None
    if start_epoch == 0:  # the base model, evaluated once
        lines: list[dict] = []
        if main:
            stopped = evaluate(0, lines)
            if ic.eval.reference_per_request:
                from rlhf.evaluate import request_cases
                from rlhf.heldout import reference_evaluation

                cases = None  # real images: every validation row whose labels hold a request, not only the FD's sample
                if parts.reference.kind == "real":
                    cases = request_cases(list(cfg.data.manifests), cfg.data, model.cfg.image_size, heldout,
                                          ic.eval.reference_per_request, ic.eval.reference_seed)
                lines.append({"kind": "reference", "epoch": 0, **reference_evaluation(
                    heldout, parts.judges, parts.reference, cfg.judges.eval, ic.eval.reference_per_request,
                    ic.eval.reference_seed, cases)})
            guided_lines = [guided_heldout(trainer, heldout, parts, cfg, progress, scale) for scale in guided_scales(ic)]
            calibrated = calibrate_guidance(guided_lines, guard) if ic.eval.guidance_scales else None
            lines.extend(guided_lines)
            # the untouched requests by the guided sampler too (nothing decides by it): at the calibrated scale, or at stage 2's
            tested_scale = guided_test_scale(ic, calibrated["scale"] if calibrated else None)
            if test:
                lines.append(test_evaluation(0, "base"))
                if tested_scale is not None:
                    lines.append({"kind": "test", "epoch": 0, "adapter": "guided",
                                  **guided_test_set(trainer, test, parts, cfg, progress, tested_scale)})
            if ic.eval.guidance_scales:
                write_guidance_file(root / GUIDANCE_FILE, lines, base_model)
        finish_epoch(0, lines, [])
        start_epoch = 1
    for epoch in range(start_epoch, ic.ddpo.epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        trainer.set_epoch_lr(epoch)
        prompts = sampler.draw(n_prompts * world, epoch, ic.ddpo.seed)  # the global batch; this rank takes its slice
        items = [p for p in prompts for _ in range(k)]
        groups = [f"{epoch}:{i // k}" for i in range(len(items))]
        mine = slice(accelerator.process_index * n_prompts * k, (accelerator.process_index + 1) * n_prompts * k)
        indices = list(range(len(items)))[mine]  # this rank's global sample indices
        rollout = trainer.rollout(items[mine], indices, epoch, progress)
        if stop_after and stop_after("rollout", epoch):
            raise SystemExit(f"stopped after the rollouts of epoch {epoch}")
        t1 = time.perf_counter()

        def judged(images: torch.Tensor, what: str) -> tuple[np.ndarray, dict[str, np.ndarray]]:
            """This rank's images judged by the reward, gathered over ranks; a non-finite reward stops the loop here."""
            result = reward(images, items[mine], progress=progress)
            total = _gather(accelerator, result.total)
            components = {name: _gather(accelerator, value) for name, value in result.components.items()}
            bad = np.flatnonzero(~np.isfinite(total))
            if len(bad):
                i = int(bad[0])
                raise NonFiniteError(f"non-finite {what} in epoch {epoch} for sample {i} (modality {items[i].modality}, prompt "
                                     f"{items[i].prompt[:80]!r}); components: "
                                     f"{ {n: float(v[i]) for n, v in components.items() if '/' not in n} }; nothing of this epoch was written")
            return total, components

        total, components = judged(rollout.images, "reward")
        t2 = time.perf_counter()
        advantages = trainer.advantages(total, groups, [it.prompt for it in items])
        if ic.ddpo.objective == "none":  # stage 2 alone trains: the rollouts are the reward logs and its candidates
            update = UpdateStats()
        elif ic.ddpo.objective == "draft":
            update = trainer.draft_update(rollout, epoch, progress)
        else:
            update = trainer.update(rollout, advantages[mine], epoch, progress)
        if stop_after and stop_after("update", epoch):
            raise SystemExit(f"stopped after the update of epoch {epoch}")
        t3 = time.perf_counter()
        guided = None  # stage 2's candidates: the rollouts, or one reward-guided draw per rollout
        table, warm = None, True  # target=table: the offset table fitted this epoch, and whether the selection fits it yet
        candidate_total, candidate_components = total, components
        if ic.selection.draws_guided:
            by_table = ic.selection.target == "table"
            # table and drafts fit the base's drafts (a fixed target, not one that moves with what the policy learnt)
            drafts = trainer.guided_drafts(items[mine], indices, epoch, progress, base=by_table or ic.selection.target == "drafts")
            candidate_total, candidate_components = judged(drafts.images, "reward of a guided draft")
            guided = {"finals": _gather_latents(accelerator, drafts.finals), "images": drafts.images}
            if ic.selection.target in ("trajectory", "drafts"):
                guided["trajectory"] = (_gather_latents(accelerator, drafts.states), _gather_latents(accelerator, drafts.targets))
                if ic.selection.target == "drafts":  # the shift guidance gave each step: the regression's per-step norm
                    guided["draft_shifts"] = _gather_latents(accelerator, drafts.shifts)
            elif by_table:  # the drafts join the table's data; the selected requests' table-steered draws are fitted
                trainer.keep_offset_drafts(items, _gather_latents(accelerator, drafts.shifts))
                table = trainer.offset_table()
                warm = len(trainer.offset_features) >= ic.selection.table_warmup  # before: the epoch only adds its drafts
                if warm:
                    steered = trainer.table_drafts(items[mine], indices, epoch, table)
                    guided["trajectory"] = (_gather_latents(accelerator, steered.states), _gather_latents(accelerator, steered.targets))
                    guided["steered_shifts"] = _gather_latents(accelerator, steered.shifts)
                guided["offset_table"] = {"drafts": len(trainer.offset_features), "features": len(table.features),
                                          "r2": [round(v, 4) for v in table.fit_r2], "fitted": warm}
        t_guided = time.perf_counter()
        selected = trainer.selected(candidate_total, candidate_components)
        if table is not None and not warm:  # target=table, still warming up: no selection this epoch
            selected[:] = False
        selection_steps: list[dict] = []
        if selected.any() and table is not None:  # the table's regression, with the replayed requests of earlier epochs
            selection_steps = _table_regression(trainer, sampler, items, selected, guided, epoch, n_prompts * world, k,
                                                ic.ddpo.seed, progress).steps
        elif selected.any():
            finals = guided["finals"] if guided else _gather_latents(accelerator, rollout.latents[:, -1])
            idx = np.flatnonzero(selected)
            path = (guided or {}).get("trajectory")
            shifts = (guided or {}).get("draft_shifts")  # target=drafts: each step's mean squared shift over the selected
            sel = trainer.selection_update(finals[torch.as_tensor(idx)], [items[i] for i in idx], candidate_total[idx], epoch, progress,
                                           tuple(x[torch.as_tensor(idx)] for x in path) if path else None,
                                           shifts[torch.as_tensor(idx)].pow(2).mean(dim=(0, 2, 3, 4)) if shifts is not None else None)
            selection_steps = sel.steps
        t4 = time.perf_counter()
        overall, per_modality = epoch_reward_summary(items, total, components)
        seconds = {"sampling": t1 - t0, "reward": t2 - t1, "update": t3 - t2, **({"guided": t_guided - t3} if guided else {}),
                   "selection": t4 - t_guided}
        lines = [*update.steps, *selection_steps]
        epoch_line = {"kind": "epoch", "epoch": epoch, "n_samples": len(items), "reward": overall, "per_modality": per_modality,
                      "selected": int(selected.sum()), "seconds": seconds}
        judged = {name: _summary(components[f"findings/verifier_{name}"])
                  for name in ("agreement", "pass") if f"findings/verifier_{name}" in components}
        if judged:  # the rollouts read by the verifier's own classifiers (agents.verifier.role): a reward that rises while they do not is fooled
            epoch_line["verifier"] = judged
        if guided:  # what guidance drew, judged by the same reward (the rollouts' figures above are the policy's)
            epoch_line["guided_reward"], epoch_line["guided_per_modality"] = epoch_reward_summary(items, candidate_total,
                                                                                                 candidate_components)
            if "offset_table" in guided:  # target=table: the drafts it is fitted to so far, and how much of their shifts it holds
                epoch_line["offset_table"] = guided["offset_table"]
        lines.append(epoch_line)
        samples = [{"epoch": epoch, "index": i, "rank": i // (n_prompts * k), "prompt": it.prompt, "negative": it.negative,
                    "request": it.request, "modality": it.modality, "key": it.key,
                    "expected": {f["name"]: {kk: v for kk, v in f.items() if kk != "name"} for f in it.findings},
                    "seed": sample_seed(ic.ddpo.seed, epoch, i),
                    "reward": float(total[i]), "components": {n: float(v[i]) for n, v in components.items()},
                    "advantage": float(advantages[i]), "selected": bool(selected[i]),
                    **({"guided": {"reward": float(candidate_total[i]),
                                   "components": {n: float(v[i]) for n, v in candidate_components.items()}}} if guided else {})}
                   for i, it in enumerate(items)]
        guard.add_reward(overall["total"]["mean"])
        if main:
            tiles = min(ic.grid_images, len(rollout.items))
            tiled, columns = [it.modality for it in rollout.items[:tiles]], k * 4 if tiles >= k * 4 else tiles
            _save_grid(rollout.images[:tiles], tiled, cfg, root / "grids" / f"epoch_{epoch:04d}.png", columns=columns)
            if guided:
                _save_grid(guided["images"][:tiles], tiled, cfg, root / "grids" / f"epoch_{epoch:04d}_guided.png", columns=columns)
            if epoch % ic.eval.every == 0 or epoch == ic.ddpo.epochs:
                te = time.perf_counter()
                stopped = evaluate(epoch, lines)
                seconds["eval"] = time.perf_counter() - te
        if world > 1:
            flag = [stopped]
            broadcast_object_list(flag)
            stopped = flag[0]
        seconds["total"] = time.perf_counter() - t0
        finish_epoch(epoch, lines, samples)
        if main and table is not None:  # the table as of this epoch's checkpoint (a resumed run refits the same one)
            table.save(root / OFFSET_TABLE_FILE)
        if main:
            guided_part = f"guided drafts {seconds['guided']:.0f}, " if guided else ""
            print(f"epoch {epoch}/{ic.ddpo.epochs}: reward {overall['total']['mean']:.4f} (findings "
                  f"{overall.get('findings', {}).get('mean') or 0:.3f}), {int(selected.sum())} selected, "
                  f"{seconds['total']:.0f} s (sampling {seconds['sampling']:.0f}, reward {seconds['reward']:.0f}, "
                  f"update {seconds['update']:.0f}, {guided_part}selection {seconds['selection']:.0f})", flush=True)

    last = latest_checkpoint(root)
    last_epoch = int(json.loads((last / "state.json").read_text())["epoch"]) if last else 0
    status = "stopped_reward_hacking" if stopped else "finished"
    end = {"kind": "end", "epoch": last_epoch, "status": status, "message": stopped or f"finished {last_epoch} epochs",
           "best": best}
    if main:
        save_adapter(model, root / "final", {"run": str(root), "epoch": last_epoch, "base_model": base_model,
                                                  "kind": "synthmed LoRA adapter (final)"}, findings=trainer.trains_findings)
        if test and last_epoch > 0:  # the untouched test set, once: final/ (the model as it stands), then best/
            tested = [test_evaluation(last_epoch, "final")]
            best_epoch = (best or {}).get("epoch", 0)
            if best_epoch == last_epoch:
                tested.append({**tested[0], "epoch": best_epoch, "adapter": "best"})
            elif best_epoch > 0:
                load_adapter_folder(model, root / "best")
                tested.append(test_evaluation(best_epoch, "best"))
            append_lines(metrics_path, tested)  # after the last checkpoint, like the end line: a resume redoes them
        append_lines(metrics_path, [end])  # after the last checkpoint: a resumed run moves it to metrics.jsonl.orphaned
        metadata.update({"status": status, "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "epochs_done": last_epoch, "best": best})
        write_json_atomic(metadata_path, metadata, ensure_ascii=False)
        if ic.eval.steer_gammas and last_epoch > 0 and (root / OFFSET_TABLE_FILE).is_file():
            # the table as the run's policy, gamma chosen on the held-out set (`synthmed runs steer`, which a kill here
            # leaves to be run again: nothing of the run's log depends on it)
            from .table_steer import calibrate_table_steering

            steer = calibrate_table_steering(root, ic.eval.steer_gammas, progress=progress, parts=parts,
                                             per_modality=ic.eval.steer_per_modality)
            end["steered"] = {k: steer.get(k) for k in ("gamma", "modality_gammas", "heldout", "test", "adapter_folder", "use")}
    accelerator.wait_for_everyone()
    accelerator.end_training()  # last: it also ends the process group of a multi-process run
    end["run"] = str(root)
    return end


def _table_regression(trainer, sampler, items: Sequence[Any], selected: np.ndarray, guided: dict, epoch: int,
                      n_prompts: int, k: int, seed: int, progress: bool) -> UpdateStats:
    """``selection.target="table"``: the selection update on the epoch's selected requests (their table-steered draws in
    ``guided``) and, with ``selection.table_replay``, the kept ones of the last epochs (their requests redrawn by the
    prompt sampler: ``n_prompts`` an epoch, ``k`` images each), mixed in a seeded order so each step's batch holds
    requests of several epochs; then keeps this epoch's for the next epochs' replay."""
    idx = torch.as_tensor(np.flatnonzero(selected))
    own = tuple(x[idx] for x in guided["trajectory"])  # this epoch's steered draws: fitted now, kept for the replay
    states, targets = own
    norm = guided["steered_shifts"][idx].pow(2).mean(dim=(0, 2, 3, 4))  # each step's share of the regression
    fitted = [items[i] for i in idx.tolist()]
    norms = [norm.expand(len(idx), -1)]
    for past in trainer.replay:
        drawn = sampler.draw(n_prompts, past["epoch"], seed)
        fitted += [drawn[i // k] for i in past["indices"]]
        states, targets = torch.cat([states, past["states"].float()]), torch.cat([targets, past["targets"].float()])
        norms.append(past["step_norm"].expand(len(past["indices"]), -1))
    step_norm = torch.cat(norms)
    if len(fitted) > len(idx):
        order = torch.as_tensor(np.random.default_rng([seed, epoch, 31]).permutation(len(fitted)))
        fitted = [fitted[i] for i in order.tolist()]
        states, targets, step_norm = states[order], targets[order], step_norm[order]
    # the rewards are not read: with a step norm every request weighs alike (the target is the table's, not a draft's)
    stats = trainer.selection_update(None, fitted, np.ones(len(fitted)), epoch, progress, (states, targets), step_norm)
    trainer.keep_replay(epoch, idx.tolist(), *own, norm)
    guided["offset_table"]["replayed"] = len(fitted) - len(idx)
    return stats


def _guided_images(trainer, items: Sequence[Any], seed: int, cfg: SynthmedConfig, progress: bool, scale: float) -> torch.Tensor:
    """``items`` drawn by the reward-guided sampler at ``scale`` on the model as it stands,
    ``improve.eval.images_per_prompt`` each, prompt-major; image i from the noise of ``seed + i``, as the held-out
    evaluation draws its own."""
    expanded = [it for it in items for _ in range(cfg.improve.eval.images_per_prompt)]
    return trainer.guided_drafts(expanded, list(range(len(expanded))), 0, progress,
                                 seeds=[seed + i for i in range(len(expanded))], scale=scale).images


def guided_scales(ic) -> list[float]:
    """The scales a run draws its held-out ``guided`` lines at, once at epoch 0: stage 2's when it draws guided drafts,
    and ``improve.eval.guidance_scales``; ascending, each once."""
    scales = set(ic.eval.guidance_scales)
    if ic.selection.draws_guided:
        scales.add(ic.selection.guidance_scale)
    return sorted(scales)


def guided_test_scale(ic, calibrated: float | None) -> float | None:
    """The scale a run's ``guided`` test line is drawn at: with a calibration, its calibrated scale (``calibrated``; None
    when every scale was refused: no line); else stage 2's when it draws guided drafts; else none."""
    if ic.eval.guidance_scales:
        return calibrated
    return ic.selection.guidance_scale if ic.selection.draws_guided else None


def guided_heldout(trainer, heldout: Sequence[Any], parts: Parts, cfg: SynthmedConfig, progress: bool, scale: float) -> dict:
    """A ``guided`` line: the held-out requests drawn by the reward-guided sampler on the base model at ``scale`` (the
    held-out seeds, the rollouts' steps and guidance), judged like every evaluation by the evaluator. At stage 2's scale
    it says what the drafts the policy distils show; at the calibration's scales, which one the run calibrates
    (:func:`calibrate_guidance`). Neither best/ nor the guard reads it."""
    from rlhf.heldout import heldout_evaluation

    ic = cfg.improve
    started = time.perf_counter()
    images = _guided_images(trainer, heldout, ic.eval.seed, cfg, progress, scale)  # the held-out evaluation's noise
    result = heldout_evaluation(trainer.model, heldout, parts.judges, parts.reference, ic.eval, cfg.judges.eval, ic.ddpo.guidance,
                                parts.train_images, progress=progress, images=images)
    result.pop("images")
    return {"kind": "guided", "epoch": 0, "scale": scale, "views": ic.selection.guidance_views,
            **result, "seconds": round(time.perf_counter() - started, 2)}


def calibrate_guidance(lines: list[dict], guard: "RewardHackingGuard", margin: bool = False, name: str = "scale") -> dict | None:
    """Marks, in place, the ``guided`` line whose scale the run calibrates: the highest held-out share of every requested
    finding shown (then finding accuracy; a tie goes to the smaller scale) among the lines whose images the gain's terms
    accept against the base's evaluation (``guard.acceptable``, as best/ is chosen; call after the base's ``observe``).
    With ``margin``, a scale is eligible only when the next larger scale tried is accepted as well: the kept strength is
    then not at the edge past which FD falls off (``synthmed runs scale``; the largest scale tried is never kept under
    it, as nothing above it shows a margin). ``name`` names the strength in the refusals (scale, gamma). Each line gets
    ``calibrated`` and, where refused, ``not_calibrated_because``. Returns the chosen line, or None when every scale was
    refused."""
    ordered = sorted(lines, key=lambda r: r["scale"])
    refusals = [guard.acceptable(line["overall"].get("fd"), line["overall"].get("ms_ssim")) for line in ordered]
    chosen = None
    for i, line in enumerate(ordered):
        overall = line["overall"]
        refused = refusals[i]
        if margin and not refused:
            if i + 1 == len(ordered):
                refused = f"no margin: the largest {name} tried (add a larger one to show its neighbour stays within the terms)"
            elif refusals[i + 1]:
                refused = f"no margin: the next {name} up, x{ordered[i + 1]['scale']:g}, is refused ({refusals[i + 1]})"
        line["calibrated"] = False
        if refused:
            line["not_calibrated_because"] = refused
            continue
        score = (overall.get("all_requested_shown") or 0.0, overall.get("finding_accuracy") or 0.0)
        if chosen is None or score > chosen[0]:
            chosen = (score, line)
    if chosen is None:
        return None
    chosen[1]["calibrated"] = True
    return chosen[1]


CALIBRATION_KEYS = ("all_requested_shown", "requested_shown", "finding_accuracy", "fd", "ms_ssim", "clip_score")


def calibration_figures(record: dict | None) -> dict | None:
    """The overall figures a calibration file (guidance.json, the adapter scale's scale.json) keeps of an evaluation
    line or result; None for none."""
    return {k: record.get("overall", {}).get(k) for k in CALIBRATION_KEYS} if record else None


def write_guidance_file(path: Path, lines: list[dict], base_model: str) -> dict:
    """``guidance.json``: the calibrated scale (None when every scale was refused), its held-out and untouched-test figures
    beside the base's, every scale's held-out figures, and the commands that use it."""
    base = next(r for r in lines if r["kind"] == "eval" and r["epoch"] == 0)
    guided = sorted((r for r in lines if r["kind"] == "guided"), key=lambda r: r["scale"])
    chosen = next((r for r in guided if r.get("calibrated")), None)
    tested = {r.get("adapter"): r for r in lines if r["kind"] == "test"}
    pick = calibration_figures
    out = {
        "kind": "synthmed reward-guidance calibration", "base_model": base_model,
        "reward_guidance": chosen["scale"] if chosen else None, "views": guided[0]["views"] if guided else None,
        "chosen_by": "the held-out evaluator's share of images showing every requested finding, among scales whose FD and "
                     "MS-SSIM stay within the gain's terms (improve.guard); confirmed once on the untouched test prompts",
        "heldout": {"base": pick(base), "guided": pick(chosen)},
        "test": {"base": pick(tested.get("base")), "guided": pick(tested.get("guided"))} if tested else None,
        "scales": [{"scale": r["scale"], **pick(r), "calibrated": r.get("calibrated", False),
                    **({"not_calibrated_because": r["not_calibrated_because"]} if r.get("not_calibrated_because") else {})}
                   for r in guided],
        "use": (f"synthmed generate ... --reward-guidance {chosen['scale']}; synthmed synthesize ... --reward-guidance "
                f"{chosen['scale']}" if chosen else "no scale kept the images within the gain's terms; try smaller scales"),
    }
    write_json_atomic(path, _clean(out), ensure_ascii=False)
    return out


def load_adapter_folder(model, folder: Path) -> None:
    """An adapter folder's (or checkpoint's) lora.safetensors onto the model's own adapter, in place, and its tuned finding
    table when it has one."""
    from generator.lora import load_lora
    from generator.models import FINDING_TABLE_FILE, load_finding_table

    load_lora(model.unet, folder / "lora.safetensors", "default")
    if (folder / FINDING_TABLE_FILE).is_file():
        load_finding_table(model, folder / FINDING_TABLE_FILE)


def judge_test_set(model, test: Sequence[Any], parts: Parts, cfg: SynthmedConfig, adapter: str, progress: bool = True,
                   images=None, seed: int | None = None) -> dict:
    """The untouched test prompts with the model as it stands (``adapter`` names it: base, best or final), judged as the
    held-out set is but with their own image seeds (``seed``, by default ``improve.eval.test_seed``); ``images``: judge
    these instead (drawn for the test prompts, ``images_per_prompt`` each). Nothing reads these figures to decide."""
    from generator.lora import merged_for_sampling
    from rlhf.heldout import heldout_evaluation

    ic = cfg.improve
    seed = ic.eval.test_seed if seed is None else seed
    with merged_for_sampling(model.unet):
        result = heldout_evaluation(model, test, parts.judges, parts.reference, ic.eval.model_copy(update={"seed": seed}),
                                    cfg.judges.eval, ic.ddpo.guidance, parts.train_images, ic.ddpo.sample_batch_size, progress,
                                    label=f"test eval ({adapter})", images=images)
    result.pop("images")
    return result


def guided_test_set(trainer, test: Sequence[Any], parts: Parts, cfg: SynthmedConfig, progress: bool, scale: float,
                    seed: int | None = None) -> dict:
    """The untouched test prompts drawn by the reward-guided sampler on the base at ``scale`` (:func:`guided_test_scale`;
    their own seeds, as the held-out set's ``guided`` lines draw their own), judged like the other test rows: the
    ``test`` line of adapter ``guided``. What a user of the guided sampler gets on requests nothing was tuned on."""
    ic = cfg.improve
    seed = ic.eval.test_seed if seed is None else seed
    started = time.perf_counter()
    result = judge_test_set(trainer.model, test, parts, cfg, "guided", progress, seed=seed,
                            images=_guided_images(trainer, test, seed, cfg, progress, scale))
    return {"scale": scale, "views": ic.selection.guidance_views, **result,
            "seconds": round(time.perf_counter() - started, 2)}


SPLIT_SEED_STRIDE = 100_000  # a test split's image seeds start this far from the test set's, per split number


def split_seed(test_seed: int, split: int) -> int:
    """The first image seed of untouched test split ``split`` (the run's test set's ``test_seed`` moved by a stride per split)."""
    return test_seed + SPLIT_SEED_STRIDE * split


def split_paths(run: Path, split: int) -> tuple[Path, Path]:
    """Where ``synthmed runs test --split N`` keeps the split's prompts and its figures."""
    return run / f"test_split{split}_prompts.jsonl", run / f"test_split{split}.json"


def evaluate_test_set(run: Path, progress: bool = True, split: int | None = None, per_modality: int | None = None) -> dict:
    """``synthmed runs test``: a run's base, best/ and final/ (and scaled/ and steered/, where ``runs scale`` and ``runs
    steer`` kept them) judged on its untouched test prompts (its test_prompts.jsonl, or for a run from before the test
    set, the ones its config draws), written to <run>/test.json (nothing else of the run changes). The figures equal the
    run's own ``test`` lines where it has them.

    ``split`` N (1, 2, ...): a further untouched split instead, which nothing in the run drew or read: ``per_modality``
    requests per modality (default: the run's test_per_modality) over the held-out combinations, worded apart from the
    run's held-out and test requests, with image seeds of their own; its prompts are saved beside its figures
    (:func:`split_paths`). For a final claim on more images than the run's own test set holds."""
    from agents.requests import load_prompts, save_prompts
    from generator.steering import is_steered_folder

    cfg = load_config(run / "config.yaml")
    ic = cfg.improve
    saved = run / "test_prompts.jsonl"
    seed = ic.eval.test_seed
    if split is None:
        if per_modality is not None:
            raise UserError("--per-modality sizes a test split: give --split N with it (the run's own test set is fixed)")
        if not saved.is_file() and not ic.prompts.test_per_modality:
            raise UserError(f"{run} has no test_prompts.jsonl and its config draws none (improve.prompts.test_per_modality 0)")
    elif split < 1:
        raise UserError(f"--split must be 1 or more (each number draws its own untouched split), got {split}")
    else:
        per_modality = per_modality if per_modality is not None else (ic.prompts.test_per_modality or 8)
        if per_modality < 1:
            raise UserError(f"--per-modality must be 1 or more, got {per_modality}")
        seed = split_seed(ic.eval.test_seed, split)
    parts = build_parts(cfg, progress=progress)
    if split is None:
        test = load_prompts(saved) if saved.is_file() else parts.sampler.test()
        drawn, out_path = ("test_prompts.jsonl" if saved.is_file() else "PromptSampler.test()"), run / "test.json"
    else:
        run_texts = [p.prompt for name in ("heldout_prompts.jsonl", "test_prompts.jsonl") if (run / name).is_file()
                     for p in load_prompts(run / name)]
        test = parts.sampler.test_split(split, per_modality, avoid=run_texts)
        prompts_path, out_path = split_paths(run, split)
        save_prompts(test, prompts_path)
        drawn = prompts_path.name
    leaked = {p.key for p in test} & parts.sampler.combination_keys("train")
    if leaked:
        raise UserError(f"test combinations {sorted(leaked)[:3]} are training combinations of {run}'s config; not a test set")
    model = parts.model
    results = [{"adapter": "base", "epoch": 0, **judge_test_set(model, test, parts, cfg, "base", progress, seed=seed)}]
    saved_guidance = read_guidance(run) if ic.eval.guidance_scales else None  # the calibrated scale its own test line drew
    scale = guided_test_scale(ic, (saved_guidance or {}).get("reward_guidance"))
    if scale is not None:  # the run's guided sampler on the base, as its test line
        from accelerate import Accelerator

        from rlhf.trainer import DDPOTrainer

        trainer = DDPOTrainer(model, parts.reward, ic.ddpo, ic.selection, Accelerator(cpu=True), parts.selector_threshold)
        results.append({"adapter": "guided", "epoch": 0, **guided_test_set(trainer, test, parts, cfg, progress, scale, seed=seed)})
    for name in ("best", "final", SCALED_ADAPTER):
        folder = run / name
        if not (folder / "lora.safetensors").is_file():
            continue
        meta = json.loads((folder / "metadata.json").read_text()) if (folder / "metadata.json").is_file() else {}
        load_adapter_folder(model, folder)
        results.append({"adapter": name, "epoch": meta.get("epoch"), **({"scale": meta["scale"]} if "scale" in meta else {}),
                        **judge_test_set(model, test, parts, cfg, name, progress, seed=seed)})
    if is_steered_folder(run / STEERED_ADAPTER):  # `synthmed runs steer`: the base (or an adapter) steered by the run's table
        from .table_steer import load_steered_folder

        meta = load_steered_folder(model, run / STEERED_ADAPTER)
        results.append({"adapter": STEERED_ADAPTER, "epoch": meta.get("epoch"), "table_epoch": meta.get("table_epoch"),
                        "gamma": model.steering.gamma, **({"gammas": model.steering.gammas} if model.steering.gammas else {}),
                        "steers": meta.get("adapter"),
                        **judge_test_set(model, test, parts, cfg, STEERED_ADAPTER, progress, seed=seed)})
        model.steering = None
    out = {"run": str(run), **({"split": split} if split is not None else {}), "prompts": len(test),
           "images_per_prompt": ic.eval.images_per_prompt, "seed": seed, "drawn": drawn, "results": results}
    out = _clean(out)  # rounded as metrics.jsonl is: the figures equal the run's own test lines
    write_json_atomic(out_path, out, ensure_ascii=False)
    return out


def _gather_latents(accelerator, latents: torch.Tensor) -> torch.Tensor:
    if accelerator.num_processes == 1:
        return latents
    return accelerator.gather(latents.to(accelerator.device)).cpu()


def _track(accelerator, record: dict) -> None:
    if not accelerator.trackers:
        return
    values = {}
    if record["kind"] == "step":
        values = {f"train/{k}": v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("epoch", "step")}
        accelerator.log(values, step=record["step"])
    elif record["kind"] == "epoch":
        values = {f"reward/{k}": v["mean"] for k, v in record["reward"].items() if v["mean"] is not None}
        accelerator.log(values, step=record["epoch"])
    elif record["kind"] == "eval":
        values = {f"heldout/{k}": v for k, v in record["overall"].items() if v is not None}
        accelerator.log(values, step=record["epoch"])


def _save_grid(images: torch.Tensor, modalities: list[str], cfg: SynthmedConfig, path: Path, columns: int) -> None:
    from generator.sampling import SampleOutput
    from generator.trainers import save_grid

    if len(images) == 0:
        return
    channels = {m: spec.channels for m, spec in cfg.data.modalities.items()}
    tiles = SampleOutput(images).to_uint8(modalities, channels)
    save_grid(tiles, path, max(1, min(columns, len(tiles))))


def _checkpoint(root: Path, epoch: int, model, trainer, guard: RewardHackingGuard, best: dict | None, base_model: str, keep: int) -> Path:
    from generator.lora import save_lora
    from generator.models import FINDING_TABLE_FILE, save_finding_table

    folder = root / "checkpoints" / f"epoch_{epoch:04d}"
    with atomic_folder(folder, root / "checkpoints" / f".tmp_epoch_{epoch:04d}") as tmp:
        save_lora(model.unet, tmp / "lora.safetensors")
        if trainer.trains_findings:
            save_finding_table(model, tmp / FINDING_TABLE_FILE)
        torch.save({"trainer": trainer.state_dict(), "rng": _rng_state()}, tmp / "trainer_state.pt")
        logs = {name: (root / name).stat().st_size if (root / name).exists() else 0 for name in ("metrics.jsonl", "samples.jsonl")}
        write_json_atomic(tmp / "state.json", {"epoch": epoch, "logs": logs, "guard": guard.state_dict(), "best": best,
                                               "base_model": base_model, "global_step": trainer.global_step}, ensure_ascii=False)
    for old in sorted(p for p in (root / "checkpoints").glob("epoch_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return folder


__all__ = ["Parts", "ResumeError", "RewardHackingGuard", "append_lines", "build_parts", "config_differences", "judge_test_set",
           "latest_checkpoint", "resume_config", "run_improve", "save_adapter", "evaluate_test_set"]
