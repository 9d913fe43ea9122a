"""`synthmed bench improve`: our DDPO loop against trl's ``DDPOTrainer`` (0.23.1), side by side in one run.

trl removed its DDPO trainer in 0.24, so the reference is the last release that ships it, run in a
virtual environment of its own (:func:`ensure_trl_env`) that reuses this environment's packages
(torch, diffusers, transformers, accelerate, peft and synthmed itself) through a ``.pth`` file, and
adds trl 0.23.1 alone. There, :mod:`pipelines.trl_ddpo_runner` trains trl's ``DDPOTrainer`` on the
same weights, prompts, reward and settings (see :func:`trl_settings` for the mapping and what cannot
be matched); here, ``synthmed improve`` runs the same epochs. Both adapters then go through the same
held-out evaluation, so the gains are comparable:

- seconds per epoch: ours is an epoch's ``seconds.total`` without the held-out evaluation (sampling,
  reward, update, selection, grids, bookkeeping; its checkpoint is written after the clock stops);
  trl's is the wall time of ``DDPOTrainer.step`` (with trl's own checkpoints switched off).
  ``epoch_speedup_vs_trl`` is trl's mean seconds per epoch over ours.
  ``cpu_speedup_vs_trl_ddpo`` compares process CPU seconds of sampling + reward + update alone, which
  a busy machine moves less than wall time (at one thread; more threads spin while they wait).
- held-out gain: ``all_requested_shown`` (the evaluator's share of held-out images that show every
  requested finding) after ``epochs`` epochs minus the base model's, on the run's fixed held-out
  prompts, seeds and deterministic sampler.

The two sides take turns epoch by epoch (trl's epoch e, then ours, then trl's e + 1, ...) on the same
thread count, the idle side waiting, so that a change in the machine's load falls on both; the load
average at each turn is recorded.
"""

from __future__ import annotations

import json
import math
import os
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from generator.errors import UserError

TRL_VERSION = "0.23.1"
ENV_MARKER = "synthmed-trl-env.json"
BASE_PTH = "synthmed-base-env.pth"
RUNNER = Path(__file__).resolve().parent / "trl_ddpo_runner.py"
HEADLINE = "all_requested_shown"
EXTRA_PINS: tuple[str, ...] = ()  # packages pinned inside the trl environment only; none needed so far


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# The trl environment


def default_env_dir(workspace: str | os.PathLike | None = None) -> Path:
    return Path(workspace or ".") / ".synthmed" / "envs" / f"trl-{TRL_VERSION}"


def base_site_packages() -> list[str]:
    """The running environment's site-packages, which the trl environment borrows."""
    return [p for p in site.getsitepackages() if Path(p).is_dir()]


def expected_marker(base: list[str] | None = None) -> dict:
    """What a usable trl environment's marker says: built for this trl, this Python and this base."""
    return {"trl": TRL_VERSION, "python": ".".join(map(str, sys.version_info[:3])),
            "base_site_packages": list(base if base is not None else base_site_packages()), "extra": list(EXTRA_PINS)}


def marker_matches(env_dir: str | os.PathLike, expected: dict) -> bool:
    """True when ``env_dir`` was built completely (the marker is written last) for ``expected``."""
    env_dir = Path(env_dir)
    marker = env_dir / ENV_MARKER
    if not marker.is_file() or not env_python(env_dir).exists():
        return False
    try:
        saved = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return all(saved.get(k) == v for k, v in expected.items())


def env_python(env_dir: str | os.PathLike) -> Path:
    env_dir = Path(env_dir)
    return env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def pth_lines(base: list[str]) -> str:
    """``site.addsitedir`` rather than bare paths, so the base's own .pth files (editable installs) apply."""
    return "".join(f"import site; site.addsitedir({p!r})\n" for p in base)


_MISSING_REQUIREMENTS = r"""
import json, sys
from importlib import metadata
from packaging.requirements import Requirement
extras = set(sys.argv[1:])
missing = []
for text in metadata.requires("trl") or []:
    req = Requirement(text)
    if req.marker and not any(req.marker.evaluate({"extra": e}) for e in extras | {""}):
        continue
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        missing.append(str(req))
        continue
    if req.specifier and not req.specifier.contains(version, prereleases=True):
        missing.append(str(req))
print(json.dumps(missing))
"""

_CHECK = (f"import trl; assert trl.__version__ == {TRL_VERSION!r}, trl.__version__; "
          "from trl import DDPOConfig, DDPOTrainer, DDPOStableDiffusionPipeline; print(trl.__file__)")


def ensure_trl_env(env_dir: str | os.PathLike, log: Callable[[str], None] = _say) -> Path:
    """The trl environment's Python, creating the environment first when its marker is absent or stale.

    A venv without pip of its own; a ``.pth`` file puts this environment's site-packages after its own,
    so it shares torch and the rest; pip (this environment's, through that path) installs trl 0.23.1 with
    ``--no-deps --ignore-installed`` (nothing of the base is touched), then whatever trl requires that
    the base lacks, then ``EXTRA_PINS``. The marker is written last: an interrupted build is rebuilt."""
    env_dir = Path(env_dir).resolve()
    base = base_site_packages()
    expected = expected_marker(base)
    python = env_python(env_dir)
    if marker_matches(env_dir, expected):
        log(f"trl {TRL_VERSION} environment: {env_dir}")
        return python
    started = time.perf_counter()
    log(f"creating the trl {TRL_VERSION} environment in {env_dir} (once; it reuses this environment's packages)")
    env_dir.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(env_dir)], "create the venv")
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], "locate site-packages").strip()
    Path(purelib, BASE_PTH).write_text(pth_lines(base), encoding="utf-8")
    pip = [str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "--disable-pip-version-check", "-q"]
    log(f"  pip install trl=={TRL_VERSION} (no dependencies: they come from this environment)")
    _run(pip + [f"trl=={TRL_VERSION}"], f"install trl {TRL_VERSION}")
    missing = json.loads(_run([str(python), "-c", _MISSING_REQUIREMENTS, "diffusers"], "check trl's requirements"))
    added = missing + list(EXTRA_PINS)
    if added:
        log(f"  adding what trl needs and this environment lacks: {', '.join(added)}")
        _run(pip + added, "install trl's missing requirements")
    where = _run([str(python), "-c", _CHECK], f"import trl {TRL_VERSION}").strip()
    marker = {**expected, "added": added, "trl_path": where, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "seconds": round(time.perf_counter() - started, 1)}
    (env_dir / ENV_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    log(f"  ready in {marker['seconds']} s: trl {TRL_VERSION} at {where}")
    return python


def _run(cmd: list[str], what: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not {what}: `{' '.join(cmd[:6])} ...` exited {done.returncode}:\n{done.stderr[-2000:]}")
    return done.stdout


# ---------------------------------------------------------------------------------------------
# Matching settings


def bench_batches(samples: int, sample_batch: int, train_batch: int, grad_accum: int) -> dict:
    """Batch sizes both trainers can run with ``samples`` per epoch: trl insists that the sampling batch
    divides the epoch, the training batch divides the sampling batch, and training batch x accumulation
    divides the epoch. The largest values not above the configured ones win."""
    for tb in range(min(train_batch, samples), 0, -1):
        for sb in range(min(sample_batch, samples), tb - 1, -1):
            if samples % sb or sb % tb:
                continue
            for ga in range(grad_accum, 0, -1):
                if samples % (tb * ga) == 0:
                    return {"sample_batch_size": sb, "train_batch_size": tb, "grad_accum_steps": ga}
    raise ValueError(f"no batch sizes fit {samples} samples per epoch")  # unreachable: 1, 1, 1 always fits


def trained_timesteps(steps: int, fraction: float) -> int:
    """How many steps of a trajectory our trainer trains on (rlhf.trainer)."""
    return max(1, int(round(steps * fraction)))


def trl_timestep_fraction(steps: int, n: int) -> float:
    """A ``train_timestep_fraction`` for which trl's ``int(steps * fraction)`` is exactly ``n``."""
    if not 1 <= n <= steps:
        raise ValueError(f"{n} trained timesteps of {steps}")
    fraction = n / steps
    if int(steps * fraction) != n:  # float rounding below n
        fraction = min(1.0, (n + 0.5) / steps)
    return fraction


def trl_settings(ddpo) -> tuple[dict, dict]:
    """``(DDPOConfig keyword arguments, notes)`` for trl matching our ``improve.ddpo`` section ``ddpo``.

    Not expressible in trl, hence refused: a summed log density (trl averages it) and a KL penalty (trl
    has none). Advantages: ours ``group`` (within each prompt's K images of the epoch) is trl's per-prompt
    tracker over keys unique to each prompt occurrence, with buffer and minimum count K; ``tracker`` is
    trl's tracker with our buffer and minimum; ``batch`` is trl without tracking."""
    if ddpo.logprob_reduce != "mean":
        raise UserError("improve.ddpo.logprob_reduce: trl averages the log density over the latent; bench with 'mean'")
    if ddpo.kl_weight > 0:
        raise UserError("improve.ddpo.kl_weight: trl's DDPOTrainer has no KL penalty; bench with 0")
    if ddpo.objective == "none":
        raise UserError("improve.ddpo.objective=none trains nothing in stage 1, which is what the bench times against trl; "
                        "bench with 'ppo'")
    if ddpo.trainable != "lora":
        raise UserError(f"improve.ddpo.trainable={ddpo.trainable}: trl's DDPOTrainer trains the UNet's LoRA only; bench with 'lora'")
    samples = ddpo.prompts_per_epoch * ddpo.images_per_prompt
    if samples % ddpo.sample_batch_size or ddpo.sample_batch_size % ddpo.train_batch_size \
            or samples % (ddpo.train_batch_size * ddpo.grad_accum_steps):
        raise UserError(f"batch sizes {ddpo.sample_batch_size} / {ddpo.train_batch_size} x {ddpo.grad_accum_steps} do not fit "
                        f"{samples} samples per epoch in trl (see bench_batches)")
    n_train = trained_timesteps(ddpo.steps, ddpo.timestep_fraction)
    tracking = {"group": (True, ddpo.images_per_prompt, ddpo.images_per_prompt),
                "tracker": (True, ddpo.tracker_buffer, ddpo.tracker_min_count), "batch": (False, 16, 16)}[ddpo.advantages]
    kwargs = {
        "num_epochs": ddpo.epochs, "seed": ddpo.seed, "mixed_precision": "no", "log_with": None,
        "save_freq": 10**9,  # no accelerate checkpoints inside the timed epochs
        "sample_num_steps": ddpo.steps, "sample_eta": ddpo.eta, "sample_guidance_scale": ddpo.guidance,
        "sample_batch_size": ddpo.sample_batch_size, "sample_num_batches_per_epoch": samples // ddpo.sample_batch_size,
        "train_batch_size": ddpo.train_batch_size, "train_gradient_accumulation_steps": ddpo.grad_accum_steps,
        "train_learning_rate": ddpo.lr, "train_adam_weight_decay": ddpo.weight_decay, "train_max_grad_norm": ddpo.max_grad_norm,
        "train_num_inner_epochs": ddpo.inner_epochs, "train_cfg": ddpo.guidance > 1, "train_adv_clip_max": ddpo.adv_clip_max,
        "train_clip_range": ddpo.clip_range, "train_timestep_fraction": trl_timestep_fraction(ddpo.steps, n_train),
        "per_prompt_stat_tracking": tracking[0], "per_prompt_stat_tracking_buffer_size": tracking[1],
        "per_prompt_stat_tracking_min_count": tracking[2],
    }
    notes = {"trained_timesteps": n_train, "advantages": ddpo.advantages,
             "negative_prompt": "each request's own on both sides (trl's one negative is replaced in the UNet hook)",
             "adam": "AdamW betas (0.9, 0.999), eps 1e-8 on both sides", "checkpoints": "ours after each epoch, untimed; trl none",
             "objective": ("ours: PPO-clip (DDPO), as trl" if ddpo.objective == "ppo" else
                           f"ours: DRaFT-{ddpo.draft_steps} (the reward classifier's gradient through the last {ddpo.draft_steps} steps), "
                           "trl: DDPO's PPO-clip; the same prompts, reward, samples and steps, but not the same trained timesteps")}
    return kwargs, notes


# ---------------------------------------------------------------------------------------------
# Reading the two sides and the summary


def our_epochs(metrics_path: str | os.PathLike) -> tuple[list[dict], dict[int, dict]]:
    """Epoch records (seconds without the held-out evaluation) and evaluations by epoch, from metrics.jsonl."""
    epochs, evals = [], {}
    for line in Path(metrics_path).read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("kind") == "epoch":
            s = dict(record["seconds"])
            eval_seconds = s.pop("eval", 0.0) or 0.0
            s["total"] = s["total"] - eval_seconds
            epochs.append({"epoch": record["epoch"], "seconds": s, "reward_mean": (record.get("reward") or {}).get("total", {}).get("mean")})
        elif record.get("kind") == "eval":
            evals[int(record["epoch"])] = record["overall"]
    return epochs, evals


def side_summary(epochs: list[dict], base: float | None, after: float | None, after_overall: dict | None = None) -> dict:
    """Seconds per epoch (mean of the epochs' totals), the mean split by phase, rewards, held-out gain."""
    if not epochs:
        raise ValueError("no epoch was timed")
    totals = [e["seconds"]["total"] for e in epochs]
    phases = [k for k in epochs[0]["seconds"] if k != "total"]
    split = {k: round(sum(e["seconds"].get(k, 0.0) for e in epochs) / len(epochs), 3) for k in phases}
    split["other"] = round(sum(totals) / len(totals) - sum(split.values()), 3)
    gain = None if base is None or after is None else round(after - base, 6)
    return {"seconds_per_epoch": round(sum(totals) / len(totals), 3), "epoch_seconds": [round(t, 3) for t in totals],
            "split": split, "reward_mean": [e.get("reward_mean") for e in epochs],
            "heldout_base": base, "heldout_after": after, "gain": gain, "heldout_after_overall": after_overall}


def summarise(ours: dict, trl: dict | None, settings: dict) -> dict:
    """The bench's JSON: both sides, the speed-up (trl s/epoch over ours) and the goal's two checks."""
    result = {"trl_version": TRL_VERSION, "settings": settings, "ours": ours, "trl": trl,
              "epoch_speedup_vs_trl": None, "gain_difference": None, "goal": None}
    if trl is None:
        return result
    result["epoch_speedup_vs_trl"] = round(trl["seconds_per_epoch"] / ours["seconds_per_epoch"], 3)
    if "selection" in ours["split"]:
        ddpo_only = ours["seconds_per_epoch"] - ours["split"]["selection"]
        result["epoch_speedup_vs_trl_without_selection"] = round(trl["seconds_per_epoch"] / ddpo_only, 3)
    ours_cpu, trl_cpu = _mean(ours.get("cpu_seconds_ddpo")), _mean(trl.get("cpu_seconds_ddpo"))
    if ours_cpu and trl_cpu:  # sampling + reward + update only, in process CPU seconds: less moved by a busy machine
        result["cpu_speedup_vs_trl_ddpo"] = round(trl_cpu / ours_cpu, 3)
    if ours["gain"] is not None and trl["gain"] is not None:
        result["gain_difference"] = round(ours["gain"] - trl["gain"], 6)
    result["goal"] = {"speedup_at_least_2x": result["epoch_speedup_vs_trl"] >= 2.0,
                      "gain_at_least_trl": None if result["gain_difference"] is None else result["gain_difference"] >= 0}
    return result


# ---------------------------------------------------------------------------------------------
# The bench


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return []


class TrlRunner:
    """The trl side as a process that takes turns with ours: it loads and builds its trainer, then runs
    one epoch each time :meth:`run_epoch` is called and idles in between (the protocol of
    :class:`pipelines.trl_ddpo_runner.Channel`). Its stderr goes to ``folder/runner.log``."""

    def __init__(self, python: Path, spec: dict, folder: Path, progress: bool = True):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.progress = folder, progress
        spec_path = folder / "spec.json"
        spec_path.write_text(json.dumps({**spec, "interleave": True}, indent=2) + "\n", encoding="utf-8")
        root = str(Path(__file__).resolve().parent.parent)
        env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1",
               "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        if spec.get("threads"):
            env["OMP_NUM_THREADS"] = str(spec["threads"])
        self.log = open(folder / "runner.log", "w", encoding="utf-8")
        self.process = subprocess.Popen([str(python), str(RUNNER), str(spec_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1, env=env)
        self.epochs: list[dict] = []
        try:
            self.state = self._read("ready")  # set up and waiting for its first epoch
        except BaseException:
            self.close()
            raise

    def _read(self, *expected: str) -> str:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait()
            self.log.flush()
            tail = (self.folder / "runner.log").read_text(encoding="utf-8").splitlines()[-25:]
            raise RuntimeError(f"the trl runner exited {self.process.returncode}; {self.folder / 'runner.log'} ends:\n" + "\n".join(tail))
        kind, _, rest = line.strip().partition(" ")
        if kind not in expected:
            raise RuntimeError(f"the trl runner said {line.strip()[:200]!r}, expected {' or '.join(expected)}")
        return line.strip() if kind != "epoch" else rest

    def _send(self, message: str) -> None:
        self.process.stdin.write(message + "\n")
        self.process.stdin.flush()

    def run_epoch(self) -> dict:
        """One trl epoch, blocking; returns its record."""
        if not self.state.startswith("ready"):
            raise RuntimeError(f"the trl runner is not waiting for an epoch ({self.state})")
        self._send("go")
        record = json.loads(self._read("epoch"))
        self.epochs.append(record)
        self.state = self._read("ready", "trained")  # idle again before ours starts
        if self.progress:
            _say(f"  trl epoch {record['epoch']}: {record['seconds']['total']:.1f} s ({record['seconds']})")
        return record

    def finish(self) -> dict:
        """Stop training (if epochs were left), save the adapter; returns the runner's result.json."""
        if self.state.startswith("ready"):
            self._send("stop")
            self.state = self._read("trained")
        self._send("save")
        self.process.stdin.close()
        code = self.process.wait()
        self.log.close()
        if code != 0:
            tail = (self.folder / "runner.log").read_text(encoding="utf-8").splitlines()[-25:]
            raise RuntimeError(f"the trl runner exited {code}; {self.folder / 'runner.log'} ends:\n" + "\n".join(tail))
        return json.loads((self.folder / "result.json").read_text(encoding="utf-8"))

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if not self.log.closed:
            self.log.close()


def bench_improve(cfg, out: Path, env_dir: Path | None = None, skip_trl: bool = False, progress: bool = True,
                  adjusted: dict | None = None) -> dict:
    """Both sides on ``cfg`` (its ``improve`` section already holds the bench's settings); writes
    ``out/bench.json`` and returns it."""
    import dataclasses

    import torch

    from agents.requests import load_prompts
    from generator.lora import load_lora
    from generator.lora_training import lora_spec
    from rlhf.heldout import heldout_evaluation

    from .config import save_config
    from .improve import build_parts, run_improve

    ic = cfg.improve
    ddpo = ic.ddpo
    trl_kwargs, notes = trl_settings(ddpo) if not skip_trl else ({}, {"trained_timesteps": trained_timesteps(ddpo.steps, ddpo.timestep_fraction)})
    threads = ic.num_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    cfg = cfg.model_copy(update={"improve": ic.model_copy(update={"num_threads": threads})})
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "config.yaml")
    settings = {
        "epochs": ddpo.epochs, "prompts_per_epoch": ddpo.prompts_per_epoch, "images_per_prompt": ddpo.images_per_prompt,
        "samples_per_epoch": ddpo.prompts_per_epoch * ddpo.images_per_prompt, "steps": ddpo.steps, "eta": ddpo.eta,
        "guidance": ddpo.guidance, "trained_timesteps": notes["trained_timesteps"], "sample_batch_size": ddpo.sample_batch_size,
        "train_batch_size": ddpo.train_batch_size, "grad_accum_steps": ddpo.grad_accum_steps, "inner_epochs": ddpo.inner_epochs,
        "lr": ddpo.lr, "clip_range": ddpo.clip_range, "adv_clip_max": ddpo.adv_clip_max, "advantages": ddpo.advantages,
        "lora_rank": cfg.lora.rank, "lora_alpha": cfg.lora.alpha, "selection": ic.selection.enabled,
        "reward_weights": ic.reward.weights, "heldout_prompts": None, "heldout_images_per_prompt": ic.eval.images_per_prompt,
        "threads": threads, "cpu_count": os.cpu_count(), "notes": notes, "adjusted_for_trl": adjusted or {},
        "trl_config": trl_kwargs or None,
    }

    _say("loading the model, the reward and the held-out judges")
    parts = build_parts(cfg, progress=progress)
    base_model = str(ic.base_model or cfg.train.out)
    spec_lora = dataclasses.asdict(lora_spec(cfg.lora))
    prompts = [[p.to_dict() for p in parts.sampler.draw(ddpo.prompts_per_epoch, epoch, ddpo.seed)] for epoch in range(1, ddpo.epochs + 1)]

    trl_result = runner = None
    load = {"start": load_average()}
    run_dir = out / "ours"
    try:
        if not skip_trl:
            python = ensure_trl_env(env_dir or default_env_dir())
            spec = {"out": str((out / "trl").resolve()), "threads": threads, "model": base_model, "modalities": list(cfg.data.modalities),
                    "reward_modalities": list(ic.prompts.modalities), "lora": spec_lora, "prompts": prompts, "images_per_prompt": ddpo.images_per_prompt,
                    "advantages": ddpo.advantages, "first_epoch": 1, "reward": "synthmed",
                    "config": str((out / "config.yaml").resolve()), "trl_config": trl_kwargs}
            _say(f"trl {TRL_VERSION}: building DDPOTrainer on the same model (its epochs alternate with ours)")
            runner = TrlRunner(python, spec, out / "trl", progress)

        def trl_turn(point: str, epoch: int) -> bool:
            """After each of our epochs is logged (and after the base evaluation), trl's next epoch; and
            our process's CPU seconds from an epoch's start to the end of its DDPO update."""
            if point == "checkpoint" and epoch < ddpo.epochs:
                if runner is not None:
                    load.setdefault("turns", []).append(load_average())
                    runner.run_epoch()
                cpu_marks[epoch + 1] = time.process_time()
            elif point == "update" and epoch in cpu_marks:
                cpu_ddpo[epoch] = round(time.process_time() - cpu_marks[epoch], 3)
            return False

        cpu_marks: dict[int, float] = {}
        cpu_ddpo: dict[int, float] = {}

        _say(f"synthmed improve and trl DDPOTrainer: {ddpo.epochs} epochs each, taking turns")
        end = run_improve(cfg, run_dir, progress=progress, parts=parts, command="synthmed bench improve", stop_after=trl_turn)
        if runner is not None:
            settings["interleaved"] = len(runner.epochs) >= min(int(end["epoch"]), ddpo.epochs)
            while len(runner.epochs) < int(end["epoch"]):  # the loop's hook points moved: trl's epochs after ours
                runner.run_epoch()
            trl_result = runner.finish()
    finally:
        if runner is not None:
            runner.close()
    load["end"] = load_average()
    epochs, evals = our_epochs(run_dir / "metrics.jsonl")
    last = max(e["epoch"] for e in epochs)
    base_overall = evals.get(0) or {}
    ours = side_summary(epochs, base_overall.get(HEADLINE), (evals.get(last) or {}).get(HEADLINE), evals.get(last))
    ours["cpu_seconds_ddpo"] = [cpu_ddpo.get(e["epoch"]) for e in epochs]
    ours["run"] = str(run_dir)
    ours["status"] = end["status"]
    heldout = load_prompts(run_dir / "heldout_prompts.jsonl")
    settings["heldout_prompts"] = len(heldout)

    trl = None
    if trl_result is not None:
        _say("held-out evaluation of trl's adapter")
        load_lora(parts.model.unet, trl_result["adapter"], "default")  # same spec: replaces our weights in place
        result = heldout_evaluation(parts.model, heldout, parts.judges, parts.reference, ic.eval, cfg.judges.eval, ddpo.guidance,
                                    parts.train_images, ddpo.sample_batch_size, progress)
        result.pop("images")
        trl = side_summary(trl_result["epochs"], base_overall.get(HEADLINE), result["overall"][HEADLINE], result["overall"])
        trl["cpu_seconds_ddpo"] = [e.get("cpu_seconds") for e in trl_result["epochs"]]
        trl["setup_seconds"] = trl_result["setup_seconds"]
        trl["adapter"] = trl_result["adapter"]
    summary = summarise(ours, trl, settings)
    summary["heldout_metric"] = HEADLINE
    summary["load_average"] = load
    summary["out"] = str(out)
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def bench_table(summary: dict) -> tuple[list[list[Any]], list[str]]:
    """Rows for the command's table: one per side."""
    rows = []
    for name in ("ours", "trl"):
        side = summary.get(name)
        if not side:
            continue
        split = ", ".join(f"{k} {v:.1f}" for k, v in side["split"].items())
        gain = "n/a" if side["gain"] is None else f"{side['gain']:+.3f}"
        rows.append([name if name == "ours" else f"trl {summary['trl_version']}", f"{side['seconds_per_epoch']:.1f}", split,
                     _fmt(side["heldout_base"]), _fmt(side["heldout_after"]), gain])
    return rows, ["side", "s/epoch", "split (s)", "held-out base", "after", "gain"]


def _mean(values: list | None) -> float | None:
    values = [v for v in values or [] if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


__all__ = ["TRL_VERSION", "bench_batches", "bench_improve", "bench_table", "default_env_dir", "ensure_trl_env", "expected_marker",
           "marker_matches", "our_epochs", "side_summary", "summarise", "trained_timesteps", "trl_settings", "trl_timestep_fraction"]
