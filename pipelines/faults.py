"""`synthmed bench faults --kill`: kill commands with SIGKILL at random moments, resume them, check what they leave.

For each command (``train vae``, ``train unet``, ``improve``, ``kb build``, ``synthesize``, ``judges
train classifier``) on a tiny, offline setting, a :class:`Scenario` says how to start it, how to
resume it and what its outputs must satisfy. The harness:

1. runs the command once uninterrupted (the reference), recording its progress events: files
   appearing under its output folder and lines appended to its ``*.jsonl`` logs;
2. per round, starts it afresh in a new folder and SIGKILLs it after a random (seeded) number of
   progress events plus a random part of the gap to the next one, resumes it (its own
   ``--resume``; a command without one is run again from scratch), sometimes kills the resumed run
   too, and lets the last resume finish;
3. after the final resume checks the folder: every ``*.jsonl`` line parses and the file ends with a
   newline, the step/epoch numbers of the metrics are the expected sequence (none lost, none
   doubled), every checkpoint, index, image and JSON file loads, no temporary or half-written file
   is left (``*.tmp*``, ``*.old-*``, zero-length files; ``.lock`` is expected), and the result
   equals the reference's (metrics losses, final weights, index vectors, images) where the command
   is deterministic.

Every check is a :meth:`Checks.check` call that can fail; the per-command report counts kills,
resumes that survived, checks done and failures, with the first failure's details.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
POLL_S = 0.02
LEFTOVER = re.compile(r"\.tmp|\.old-")  # fileio's temporaries (.x.<pid>.<tok>.tmp.ext, .x.tmp-<pid>, .tmp_step_*) and swapped-out folders
EXPECTED_EMPTY = {".lock"}  # the run-folder lock may be an empty file
TIMING_KEY = re.compile(r"(^|_)(seconds?|time|created|started|finished|images_per_s|per_s|environment|command|cpu_seconds|resumed.*|drawn_this_call)$")


# -- checks -----------------------------------------------------------------------------------------
@dataclass
class Checks:
    """Counts checks and keeps the failed ones' messages."""

    done: int = 0
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> bool:
        self.done += 1
        if not ok:
            self.failures.append(message)
        return ok

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """``fn()``, counted as one check; an exception is a failure naming ``what``."""
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 (a file that does not load is the finding)
            self.check(False, f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            return None
        self.check(True, what)
        return value


def read_jsonl(path: Path, checks: Checks) -> list[dict]:
    """Every line of ``path`` as JSON; a torn last line or an unparsable line is a failure."""
    data = path.read_bytes()
    checks.check(not data or data.endswith(b"\n"), f"{path}: the last line is truncated (no final newline)")
    records = []
    for n, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            checks.check(False, f"{path} line {n} does not parse ({exc.msg}): {line[:80]!r}")
            continue
    checks.check(True, f"{path}: lines parse")
    return records


def check_leftovers(root: Path, checks: Checks) -> None:
    """No temporary or swapped-out file or folder, no zero-length final file, anywhere under ``root``."""
    for path in sorted(root.rglob("*")):
        if LEFTOVER.search(path.name):
            checks.check(False, f"leftover temporary {'folder' if path.is_dir() else 'file'}: {path}")
        elif path.is_file() and path.stat().st_size == 0 and path.name not in EXPECTED_EMPTY:
            checks.check(False, f"zero-length file: {path}")
    checks.check(True, f"{root}: no leftovers")


def check_loads(root: Path, checks: Checks) -> None:
    """Every file a reader would open opens: JSON, JSON lines, safetensors, torch pickles, FAISS indexes, images, CSVs."""
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not LEFTOVER.search(str(p.relative_to(root)))):
        name = path.name
        if name.endswith(".jsonl"):
            read_jsonl(path, checks)
        elif name.endswith(".json"):
            checks.guard(f"{path} parses", lambda p=path: json.loads(p.read_text(encoding="utf-8")))
        elif name.endswith(".safetensors"):
            checks.guard(f"{path} loads", lambda p=path: _load_safetensors(p))
        elif name.endswith((".bin", ".pt", ".pkl")):
            checks.guard(f"{path} loads", lambda p=path: _torch_load(p))
        elif name == "index.faiss":
            checks.guard(f"{path.parent} index loads", lambda p=path: _load_index(p.parent))
        elif name.endswith(".png"):
            checks.guard(f"{path} decodes", lambda p=path: _load_image(p))
        elif name.endswith(".csv"):
            checks.guard(f"{path} is a whole CSV", lambda p=path: _load_csv(p))


def _load_safetensors(path: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(path))


def _torch_load(path: Path) -> Any:
    import torch

    return torch.load(path, map_location="cpu", weights_only=False)


def _load_index(folder: Path):
    from knowledge.index import VectorIndex

    return VectorIndex.load(folder)


def _load_image(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image)


def _load_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise ValueError(f"rows of {sorted(widths)} columns: a row was cut")
    return rows


def strip_volatile(value: Any, work: Path) -> Any:
    """``value`` without timings, times and commands, with the round's folder written as ``<work>``."""
    if isinstance(value, dict):
        return {k: strip_volatile(v, work) for k, v in value.items() if not TIMING_KEY.search(str(k))}
    if isinstance(value, list):
        return [strip_volatile(v, work) for v in value]
    if isinstance(value, str):
        return value.replace(str(work), "<work>")
    return value


def sequence_problem(name: str, got: list[int], expected: Iterable[int]) -> str | None:
    """None when ``got`` is ``expected``; else what is doubled, missing or out of order."""
    expected = list(expected)
    if got == expected:
        return None
    doubled = sorted(k for k, n in Counter(got).items() if n > 1)
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    parts = [f"doubled {doubled[:5]}" if doubled else "", f"missing {missing[:5]}" if missing else "",
             f"unexpected {extra[:5]}" if extra else ""]
    detail = ", ".join(p for p in parts if p) or "out of order"
    return f"{name}: {detail} (got {got[:12]}{' ...' if len(got) > 12 else ''})"


def tensors_equal(a: Path, b: Path, checks: Checks, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """The tensors of two safetensors files: same names, shapes and values (within a float tolerance)."""
    import numpy as np

    x = checks.guard(f"{a} loads", lambda: _load_safetensors(a))
    y = checks.guard(f"{b} loads", lambda: _load_safetensors(b))
    if x is None or y is None:
        return
    if not checks.check(x.keys() == y.keys(), f"{a}: tensor names differ from the reference's ({sorted(set(x) ^ set(y))[:3]})"):
        return
    worst = max((float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)))) if x[k].size else 0.0
                 for k in x if x[k].shape == y[k].shape), default=0.0)
    shapes = [k for k in x if x[k].shape != y[k].shape]
    close = not shapes and all(np.allclose(x[k], y[k], rtol=rtol, atol=atol) for k in x)
    checks.check(close, f"{a}: weights differ from the uninterrupted run's (max |difference| {worst:.3g}"
                        f"{', shapes differ: ' + str(shapes[:3]) if shapes else ''})")


def losses_equal(name: str, got: list[dict], reference: list[dict], checks: Checks, key: str = "step") -> None:
    """The numeric fields of matching metrics lines (by ``key``) equal the reference's, within float noise."""
    ref = {r.get(key): r for r in reference}
    for record in got:
        other = ref.get(record.get(key))
        if other is None:
            continue
        for k, v in record.items():
            w = other.get(k)
            if isinstance(v, float) and isinstance(w, (int, float)) and not TIMING_KEY.search(k):
                same = (math.isnan(v) and math.isnan(w)) or math.isclose(v, w, rel_tol=1e-5, abs_tol=1e-7)
                if not checks.check(same, f"{name} {key} {record.get(key)}: {k} is {v}, the uninterrupted run's {w}"):
                    return


# -- processes --------------------------------------------------------------------------------------
@dataclass
class Outcome:
    """One subprocess: how it ended and the progress events it made."""

    code: int | None
    seconds: float
    killed: bool
    events: int
    timeline: list[tuple[float, int]]
    log: Path

    def tail(self, n: int = 6) -> str:
        lines = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        return " | ".join(line.strip() for line in lines[-n:])


def count_events(root: Path) -> int:
    """Files and folders under ``root`` plus lines of its JSON-lines logs: what a command's progress looks like from
    outside. The command writes while this walks: a folder renamed or removed meanwhile is skipped (``os.walk``
    ignores it; ``Path.rglob`` would raise)."""
    n = 0
    for folder, dirs, files in os.walk(root):
        n += len(dirs) + len(files)
        for name in files:
            if name.endswith(".jsonl"):
                try:
                    with open(os.path.join(folder, name), "rb") as f:
                        n += f.read().count(b"\n")
                except OSError:  # moved or replaced while counting
                    pass
    return n


def run_command(argv: list[str], root: Path, log: Path, timeout: float,
                kill_when: Callable[[float, int], bool] | None = None) -> Outcome:
    """``synthmed ARGV`` in a subprocess; SIGKILL it when ``kill_when(seconds, events)`` says so."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    timeline: list[tuple[float, int]] = []
    with open(log, "ab") as out:
        out.write(f"$ synthmed {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *argv], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        killed, events = False, 0
        try:
            while proc.poll() is None:
                now = time.perf_counter() - started
                events = count_events(root)
                if not timeline or timeline[-1][1] != events:
                    timeline.append((now, events))
                if kill_when is not None and kill_when(now, events):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed = True
                    break
                if now > timeout:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return Outcome(None, now, False, events, timeline, log)  # a hang
                time.sleep(POLL_S)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    events = count_events(root)
    timeline.append((time.perf_counter() - started, events))
    return Outcome(None if killed else proc.returncode, time.perf_counter() - started, killed, events, timeline, log)


def kill_plan(rng: random.Random, reference: Outcome, start_events: int) -> Callable[[float, int], bool]:
    """Kill after a random number of the reference's progress events (from ``start_events`` on), plus a
    random share of the time the reference took to the next event."""
    points = [(t, e) for t, e in reference.timeline if e >= start_events] or [(0.0, start_events)]
    k = rng.randrange(len(points))
    target_events = points[k][1]
    gap = (points[k + 1][0] - points[k][0]) if k + 1 < len(points) else max(0.5, reference.seconds - points[k][0])
    delay = rng.uniform(0, gap) if k else rng.uniform(0, points[0][0] + gap)
    reached: list[float] = []

    def due(seconds: float, events: int) -> bool:
        if not reached and events >= target_events:
            reached.append(seconds)
        return bool(reached) and seconds - reached[0] >= delay

    return due


# -- scenarios --------------------------------------------------------------------------------------
TINY_MODEL = ["--model.image_size=32", "--data.image_size=32", "--model.vae_channels=[8,16]", "--model.latent_channels=4",
              "--model.unet_channels=[16,32]", "--model.unet_attention_heads=2", "--model.cross_attention_dim=32",
              "--model.text_max_length=16"]
LEXICON = """concepts:
  - {id: pneumothorax, kind: finding, term: pneumothorax, abbreviations: [PTX], modalities: [cxr, chest_ct], description: Air in the pleural space.}
  - {id: drusen, kind: finding, term: drusen, modalities: [fundus, oct], description: Deposits under the RPE.}
  - {id: right_lower_lobe, kind: anatomy, term: right lower lobe, abbreviations: [RLL], modalities: [cxr, chest_ct]}
"""
SPEC = "modalities:\n  cxr:\n    normal: 2\n    findings: {pleural_effusion: 2, pneumothorax: 2}\n  oct:\n    findings: {drusen: 2}\n"


class Scenario:
    """How to run, resume and check one command. ``work`` is a round's folder, ``out`` the command's output in it."""

    name = ""
    slug = ""
    deterministic = True

    def __init__(self, inputs: Path):
        self.inputs = inputs

    def prepare(self, run: Callable[[list[str]], None]) -> None:
        """Shared inputs in ``self.inputs`` (made once per bench)."""

    def setup(self, work: Path) -> None:
        """What a round needs before the command starts (not part of what is killed)."""

    def out(self, work: Path) -> Path:
        return work / "out"

    def fresh(self, work: Path) -> list[str]:
        raise NotImplementedError

    def resume(self, work: Path) -> list[str]:
        """The command that continues an interrupted run (its own --resume, or the fresh command again)."""
        return self.fresh(work)

    def verify(self, work: Path, reference: Path, checks: Checks) -> None:
        """Command-specific checks of a finished round against the reference folder."""


class _Train(Scenario):
    kind = ""
    section = ""
    max_steps, checkpoint_every, validate_every = 40, 20, 20

    def fresh(self, work):
        return ["train", self.kind, "--data", str(self.inputs / "phantoms" / "manifest.csv"), "--no-progress",
                f"--run.runs_dir={self.out(work) / 'runs'}", f"--train.out={self.out(work) / 'model'}", *TINY_MODEL,
                *self.settings()]

    def settings(self) -> list[str]:
        s = self.section
        return [f"--{s}.max_steps={self.max_steps}", f"--{s}.batch_size=4", f"--{s}.checkpoint_every={self.checkpoint_every}",
                f"--{s}.validate_every={self.validate_every}", f"--{s}.warmup_steps=2", f"--{s}.keep_checkpoints=2"]

    def run_folder(self, work: Path) -> Path | None:
        runs = sorted((self.out(work) / "runs").glob(f"*-{self.kind}-*")) if (self.out(work) / "runs").is_dir() else []
        return runs[-1] if runs else None

    def resume(self, work):
        run = self.run_folder(work)
        return self.fresh(work) + ["--resume", str(run)] if run is not None and (run / "checkpoints").is_dir() else self.fresh(work)

    def weights(self, work: Path) -> Path:
        raise NotImplementedError

    def verify(self, work, reference, checks):
        runs = sorted((self.out(work) / "runs").glob(f"*-{self.kind}-*"))
        checks.check(len(runs) == 1, f"{len(runs)} run folders under {self.out(work) / 'runs'}: a resume started a new run")
        run, ref_run = self.run_folder(work), self.run_folder(reference)
        if run is None or ref_run is None:
            return
        lines = read_jsonl(run / "metrics.jsonl", checks) if checks.check((run / "metrics.jsonl").is_file(), f"{run}: no metrics.jsonl") else []
        train = [r["step"] for r in lines if "loss" in r]
        val = [r["step"] for r in lines if "loss" not in r]
        for name, got, every in (("training lines", train, 10), ("validation lines", val, self.validate_every)):
            problem = sequence_problem(f"{run / 'metrics.jsonl'} {name}", got, range(every, self.max_steps + 1, every))
            checks.check(problem is None, problem or "")
        latest = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
        checks.check(bool(latest) and latest[-1] == f"step_{self.max_steps:07d}", f"{run}: newest checkpoint {latest[-1:]} is not the last step")
        if self.deterministic:
            losses_equal(str(run / "metrics.jsonl"), [r for r in lines if "loss" in r],
                         [r for r in read_jsonl(ref_run / "metrics.jsonl", Checks()) if "loss" in r], checks)
            tensors_equal(self.weights(work), self.weights(reference), checks)


class TrainVae(_Train):
    name, slug, kind, section = "train vae", "train-vae", "vae", "vae_train"

    def prepare(self, run):
        if not (self.inputs / "phantoms" / "manifest.csv").is_file():
            run(["data", "phantoms", "--out", str(self.inputs / "phantoms"), "--per-finding", "1", "--size", "32",
                 "--modalities", "cxr", "oct", "--no-progress"])

    def settings(self):
        return super().settings() + ["--vae_train.ema_decay=0"]

    def weights(self, work):
        return self.out(work) / "model" / "vae" / "diffusion_pytorch_model.safetensors"


class TrainUnet(_Train):
    name, slug, kind, section = "train unet", "train-unet", "unet", "train"

    def prepare(self, run):
        TrainVae(self.inputs).prepare(run)
        base_model(self.inputs / "base")

    def setup(self, work):
        shutil.copytree(self.inputs / "base" / "vae", self.out(work) / "model" / "vae")

    def settings(self):
        return super().settings() + ["--train.ema_decay=0.9", "--train.mixed_precision=no"]

    def weights(self, work):
        return self.out(work) / "model" / "unet" / "diffusion_pytorch_model.safetensors"


def base_model(folder: Path) -> Path:
    """The tiny seeded generator the improve tests use (32 px, narrow), saved once."""
    if (folder / "model.json").is_file():
        return folder
    import torch

    from generator.config import ModelConfig
    from generator.models import LatentDiffusion

    torch.manual_seed(0)
    cfg = ModelConfig(image_size=32, vae_channels=[8, 16], latent_channels=4, unet_channels=[16, 32], unet_attention_heads=2,
                      cross_attention_dim=32, text_max_length=16)
    LatentDiffusion(cfg, ["cxr", "chest_ct", "brain_mri", "fundus", "oct"]).save(folder)
    return folder


class Improve(Scenario):
    name, slug = "improve", "improve"
    epochs = 3

    def prepare(self, run):
        import yaml

        base_model(self.inputs / "base")
        tree = {"extends": "tiny", "improve": {
            "base_model": str(self.inputs / "base"),
            "prompts": {"modalities": ["cxr", "oct"], "heldout_per_modality": 1, "test_per_modality": 1},
            "ddpo": {"epochs": self.epochs, "prompts_per_epoch": 2, "images_per_prompt": 2, "steps": 2, "sample_batch_size": 4,
                     "train_batch_size": 8, "grad_accum_steps": 1, "timestep_fraction": 1.0, "clip_range": 0.2,
                     "logprob_reduce": "sum", "lr": 1e-3, "kl_weight": 0.01},
            "selection": {"threshold": 0.0, "require_verifier_pass": False, "max_per_epoch": 2, "batch_size": 2, "noise_draws": 1},
            "eval": {"every": 1, "images_per_prompt": 2, "steps": 2, "reference_per_finding": 2},
            "report_to": "none", "num_threads": 1},
            "agents": {"verifier": {"training_data": []}}}
        (self.inputs / "improve.yaml").write_text(yaml.safe_dump(tree))

    def fresh(self, work):
        return ["improve", "--config", str(self.inputs / "improve.yaml"), "--run-dir", str(self.out(work)), "--no-progress"]

    def resume(self, work):
        # --resume needs the run's config.yaml; a run killed before writing it is started again
        if (self.out(work) / "config.yaml").is_file():
            return ["improve", "--resume", str(self.out(work)), "--no-progress"]
        return self.fresh(work)

    def verify(self, work, reference, checks):
        out = self.out(work)
        lines = read_jsonl(out / "metrics.jsonl", checks)
        ref = read_jsonl(reference / "out" / "metrics.jsonl", Checks())
        kinds = [r.get("kind") for r in lines]
        steps = [r["step"] for r in lines if r.get("kind") == "step"]
        ref_steps = [r["step"] for r in ref if r.get("kind") == "step"]
        for name, got, expected in (("optimiser steps", steps, range(1, len(ref_steps) + 1)),
                                    ("epochs", [r["epoch"] for r in lines if r.get("kind") == "epoch"], range(1, self.epochs + 1)),
                                    ("held-out evaluations", [r["epoch"] for r in lines if r.get("kind") == "eval"], range(0, self.epochs + 1))):
            problem = sequence_problem(f"{out / 'metrics.jsonl'} {name}", got, expected)
            checks.check(problem is None, problem or "")
        checks.check(kinds.count("end") == 1 and kinds[-1:] == ["end"], f"{out / 'metrics.jsonl'}: {kinds.count('end')} end lines, last kind {kinds[-1:]}")
        got = [strip_volatile(r, work) for r in lines]
        want = [strip_volatile(r, reference) for r in ref]
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
        checks.check(first is None and len(got) == len(want),
                     f"{out / 'metrics.jsonl'}: differs from the uninterrupted run's at line {first if first is not None else min(len(got), len(want)) + 1}"
                     f" ({len(got)} lines, reference {len(want)})")
        samples = [strip_volatile(r, work) for r in read_jsonl(out / "samples.jsonl", checks)]
        ref_samples = [strip_volatile(r, reference) for r in read_jsonl(reference / "out" / "samples.jsonl", Checks())]
        checks.check(samples == ref_samples, f"{out / 'samples.jsonl'}: {len(samples)} lines differ from the uninterrupted run's {len(ref_samples)}")
        tensors_equal(out / "final" / "lora.safetensors", reference / "out" / "final" / "lora.safetensors", checks)


class KbBuild(Scenario):
    name, slug = "kb build", "kb-build"

    def prepare(self, run):
        TrainVae(self.inputs).prepare(run)
        (self.inputs / "lexicon").mkdir(parents=True, exist_ok=True)
        (self.inputs / "lexicon" / "a.yaml").write_text(LEXICON)

    def fresh(self, work):
        return ["kb", "build", f"--knowledge.lexicon_dir={self.inputs / 'lexicon'}", f"--knowledge.index_dir={self.out(work)}",
                f"--knowledge.case_manifests=[{self.inputs / 'phantoms' / 'manifest.csv'}]", "--knowledge.case_index=Flat"]

    def verify(self, work, reference, checks):
        out, ref = self.out(work), reference / "out"
        build = checks.guard(f"{out / 'build.json'} parses", lambda: json.loads((out / "build.json").read_text()))
        want = json.loads((ref / "build.json").read_text())
        if build is not None:
            checks.check(strip_volatile(build, work) == strip_volatile(want, reference), f"{out / 'build.json'} differs from the uninterrupted build's")
        for part in ("concepts", "cases"):
            index = checks.guard(f"{out / part} loads", lambda p=part: _load_index(out / p))
            if index is None:
                continue
            checks.check(len(index) == want[part], f"{out / part}: {len(index)} items, the uninterrupted build has {want[part]}")
            checks.check((out / part / "items.jsonl").read_bytes() == (ref / part / "items.jsonl").read_bytes(),
                         f"{out / part / 'items.jsonl'} differs from the uninterrupted build's")
            vectors, ref_vectors = index.index.reconstruct_n(0, len(index)), _load_index(ref / part).index.reconstruct_n(0, want[part])
            import numpy as np

            checks.check(vectors.shape == ref_vectors.shape and np.allclose(vectors, ref_vectors, atol=1e-5),
                         f"{out / part}: vectors differ from the uninterrupted build's")


class Synthesize(Scenario):
    name, slug = "synthesize", "synthesize"
    images = 8

    def prepare(self, run):
        TrainVae(self.inputs).prepare(run)
        (self.inputs / "spec.yaml").write_text(SPEC)

    def fresh(self, work):
        return ["synthesize", str(self.inputs / "spec.yaml"), "--out", str(self.out(work)), "--train-data",
                str(self.inputs / "phantoms" / "manifest.csv"), "--batch-size", "2", "--synthesize.verifier=false",
                "--sample.steps=3", "--no-progress"]

    def resume(self, work):
        return self.fresh(work) + ["--resume"]

    def verify(self, work, reference, checks):
        import numpy as np

        out, ref = self.out(work), reference / "out"
        records = read_jsonl(out / "checks.jsonl", checks)
        tries = Counter((r["index"], r["attempt"]) for r in records)
        doubled = sorted(k for k, n in tries.items() if n > 1)
        checks.check(not doubled, f"{out / 'checks.jsonl'}: draws recorded twice (index, attempt): {doubled[:5]}")
        accepted = Counter(r["index"] for r in records if r["accepted"])
        ref_accepted = Counter(r["index"] for r in read_jsonl(ref / "checks.jsonl", Checks()) if r["accepted"])
        checks.check(accepted == ref_accepted, f"{out / 'checks.jsonl'}: accepted images {dict(accepted)}, uninterrupted {dict(ref_accepted)}")
        got = sorted(json.dumps(strip_volatile(r, work), sort_keys=True) for r in records)
        want = sorted(json.dumps(strip_volatile(r, reference), sort_keys=True) for r in read_jsonl(ref / "checks.jsonl", Checks()))
        checks.check(got == want, f"{out / 'checks.jsonl'}: records differ from the uninterrupted run's")
        rows = checks.guard(f"{out / 'manifest.csv'} loads", lambda: _load_csv(out / "manifest.csv"))
        checks.check(rows == _load_csv(ref / "manifest.csv"), f"{out / 'manifest.csv'} differs from the uninterrupted run's")
        names = sorted(p.name for p in (out / "images").iterdir())
        checks.check(names == sorted(p.name for p in (ref / "images").iterdir()), f"{out / 'images'}: files {names[:4]}... differ from the reference's")
        for name in names:
            if (ref / "images" / name).is_file() and not LEFTOVER.search(name):
                same = np.array_equal(_load_image(out / "images" / name), _load_image(ref / "images" / name))
                checks.check(same, f"{out / 'images' / name}: pixels differ from the uninterrupted run's")
        summary = checks.guard(f"{out / 'summary.json'} parses", lambda: json.loads((out / "summary.json").read_text()))
        if summary is not None:
            checks.check(summary.get("accepted") == self.images, f"{out / 'summary.json'}: accepted {summary.get('accepted')}, not {self.images}")


class JudgesTrain(Scenario):
    name, slug = "judges train", "judges-train"

    def prepare(self, run):
        if not (self.inputs / "phantoms_oct" / "manifest.csv").is_file():
            run(["data", "phantoms", "--out", str(self.inputs / "phantoms_oct"), "--per-finding", "8", "--size", "32", "--seed", "3",
                 "--modalities", "oct", "--no-progress"])

    def fresh(self, work):
        return ["judges", "train", "classifier", "--data", str(self.inputs / "phantoms_oct" / "manifest.csv"), "--modalities", "oct",
                "--roles", "reward", "--out", str(self.out(work)), "--judges.classifier.image_size=32", "--judges.classifier.epochs=2",
                "--judges.classifier.batch_size=16", "--judges.classifier.convnet_widths=[8,16]",
                "--judges.classifier.resnet_widths=[8,16]", "--judges.classifier.val_fraction=0.4",
                "--judges.classifier.benchmark_per_finding=1", "--no-progress"]

    def verify(self, work, reference, checks):
        folder, ref = self.out(work) / "reward" / "oct", reference / "out" / "reward" / "oct"
        names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
        checks.check(names == ["config.json", "metadata.json", "model.safetensors"], f"{folder}: holds {names}")
        if "model.safetensors" in names:
            tensors_equal(folder / "model.safetensors", ref / "model.safetensors", checks)
            got = strip_volatile(json.loads((folder / "metadata.json").read_text()), work)
            want = strip_volatile(json.loads((ref / "metadata.json").read_text()), reference)
            checks.check(got.get("metrics") == want.get("metrics"), f"{folder / 'metadata.json'}: metrics differ from the uninterrupted run's")


SCENARIOS: dict[str, type[Scenario]] = {s.slug: s for s in (TrainVae, TrainUnet, Improve, KbBuild, Synthesize, JudgesTrain)}


# -- the bench --------------------------------------------------------------------------------------
@dataclass
class Tally:
    """One command's rounds."""

    command: str
    rounds: int = 0
    kills: int = 0
    ended_before_kill: int = 0
    resumes: int = 0
    resumes_survived: int = 0
    checks: int = 0
    failures: list[dict] = field(default_factory=list)
    reference_seconds: float = 0.0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"command": self.command, "rounds": self.rounds, "kills": self.kills, "ended_before_kill": self.ended_before_kill,
                "resumes": self.resumes, "resumes_survived": self.resumes_survived, "checks": self.checks,
                "failed_rounds": len(self.failures), "failures": self.failures, "reference_seconds": round(self.reference_seconds, 1),
                "seconds": round(self.seconds, 1)}


def check_folder(scenario: Scenario, work: Path, reference: Path) -> Checks:
    """Every check of a finished round."""
    checks = Checks()
    out = scenario.out(work)
    if checks.check(out.is_dir(), f"{out}: no output"):
        check_leftovers(out, checks)
        check_loads(out, checks)
        scenario.verify(work, reference, checks)
    return checks


def _runner(work: Path) -> Callable[[list[str]], None]:
    def run(argv: list[str]) -> None:
        outcome = run_command(argv, work, work / "prepare.log", timeout=1800)
        if outcome.code != 0:
            raise RuntimeError(f"synthmed {' '.join(argv)} failed (exit {outcome.code}): {outcome.tail()}")
    return run


def reference_run(scenario: Scenario, folder: Path) -> Outcome:
    """The uninterrupted run every round is compared with; it must finish and pass the checks itself."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    scenario.setup(folder)
    outcome = run_command(scenario.fresh(folder), scenario.out(folder), folder / "command.log", timeout=1800)
    if outcome.code != 0:
        raise RuntimeError(f"{scenario.name}: the uninterrupted reference run failed (exit {outcome.code}): {outcome.tail()}")
    return outcome


def kill_round(scenario: Scenario, work: Path, reference: Path, ref: Outcome, rng: random.Random, tally: Tally,
               max_kills: int = 2) -> None:
    """Start, kill (once or more), resume to the end, check; failures go into ``tally``."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    scenario.setup(work)
    out, log = scenario.out(work), work / "command.log"
    timeout = max(120.0, 6 * ref.seconds)
    kills = 1 + sum(rng.random() < 0.5 for _ in range(max_kills - 1))
    problems: list[str] = []
    argv = scenario.fresh(work)
    for attempt in range(kills + 1):
        last = attempt == kills
        plan = None if last else kill_plan(rng, ref, count_events(out) if attempt else 0)
        outcome = run_command(argv, out, log, timeout, plan)
        if attempt:
            tally.resumes += 1
        if outcome.killed:
            tally.kills += 1
            problems += [f"after kill {tally.kills}: {m}" for m in _checkpoints_load(out)]
        elif outcome.code is None:
            problems.append(f"`synthmed {' '.join(argv)}` hung: no exit after {timeout:.0f} s ({outcome.tail()})")
            break
        elif outcome.code != 0:
            problems.append(f"`synthmed {' '.join(argv)}` exited {outcome.code}: {outcome.tail()}")
            break
        elif not last:
            tally.ended_before_kill += 1  # finished before its kill moment: the remaining resumes find it complete
        argv = scenario.resume(work)
    checks = check_folder(scenario, work, reference)
    tally.checks += checks.done
    problems += checks.failures
    if attempt and not problems:
        tally.resumes_survived += 1
    if problems:
        tally.failures.append({"round": tally.rounds, "folder": str(work), "problems": problems[:20], "log": str(log)})


def _checkpoints_load(out: Path) -> list[str]:
    """Right after a kill: every complete checkpoint (a folder named ``step_*``/``epoch_*``) loads."""
    checks = Checks()
    for folder in sorted(out.rglob("checkpoints/*")):
        if folder.is_dir() and not LEFTOVER.search(folder.name):
            for path in sorted(folder.glob("*.safetensors")):
                checks.guard(f"{path} loads", lambda p=path: _load_safetensors(p))
            for path in sorted(folder.glob("*.json")):
                checks.guard(f"{path} parses", lambda p=path: json.loads(p.read_text()))
    return checks.failures


def run_bench(commands: list[str], rounds: int, seed: int, out: Path, progress: bool = True, keep: bool = False) -> dict:
    """Every command: a reference run, then ``rounds`` kill rounds; the report."""
    from tqdm import tqdm

    inputs = out / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"rounds": rounds, "seed": seed, "out": str(out), "commands": {}}
    for slug in commands:
        scenario = SCENARIOS[slug](inputs)
        tally = Tally(scenario.name)
        started = time.perf_counter()
        scenario.prepare(_runner(inputs))
        reference = out / slug / "reference"
        ref = reference_run(scenario, reference)
        tally.reference_seconds = ref.seconds
        own = check_folder(scenario, reference, reference)  # the reference passes the checks too
        if own.failures:
            tally.failures.append({"round": "reference", "folder": str(reference), "problems": own.failures[:20]})
        rng = random.Random(f"{seed}:{slug}")
        for r in tqdm(range(rounds), desc=scenario.name, unit=" round", disable=not progress):
            tally.rounds = r + 1
            work = out / slug / f"round-{r:03d}"
            before = len(tally.failures)
            kill_round(scenario, work, reference, ref, rng, tally)
            if not keep and len(tally.failures) == before:
                shutil.rmtree(work, ignore_errors=True)  # failed rounds stay for inspection
        tally.seconds = time.perf_counter() - started
        report["commands"][scenario.name] = tally.to_dict()
        partial = {**report, "partial": True, "failed_rounds": sum(c["failed_rounds"] for c in report["commands"].values())}
        (out / "faults.json").write_text(json.dumps(partial, indent=2) + "\n")  # what is done so far, should the bench be stopped
    report["failed_rounds"] = sum(c["failed_rounds"] for c in report["commands"].values())
    return report


def report_rows(report: dict) -> tuple[list[list[Any]], list[str]]:
    rows = []
    for name, c in report["commands"].items():
        first = c["failures"][0] if c["failures"] else None
        detail = f"round {first['round']}: {first['problems'][0]}" if first else "-"
        rows.append([name, c["rounds"], c["kills"], f"{c['resumes_survived']}/{c['rounds']}", c["checks"], c["failed_rounds"],
                     detail[:160]])
    return rows, ["command", "rounds", "kills", "resumes survived", "checks", "failed rounds", "first failure"]


__all__ = ["SCENARIOS", "Checks", "check_leftovers", "check_loads", "count_events", "kill_plan", "read_jsonl", "report_rows",
           "run_bench", "run_command", "sequence_problem", "strip_volatile"]
