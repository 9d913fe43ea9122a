"""Steering a sampler by an offset table: every DDIM step's x0_hat moved by gamma x the table's offset for what the
request states, with no classifier and no gradient at sampling (one lookup per step).

The table (:class:`OffsetTable`) is what ``synthmed improve --config table`` learns: per (DDIM step, feature of a
request's structured expectation) an offset, fitted by ridge regression to the shifts the reward classifiers' guidance
applied on drafts of training requests (:mod:`rlhf.amortised` fits and draws with it; the held-out evaluator never
enters it). ``synthmed runs steer RUN`` chooses gamma on the run's held-out set and writes a *steered folder*
(``<run>/steered/``: ``steering.json``, the table, and the LoRA it steers when it steers one). Naming that folder with
``--lora`` (sample, generate, eval, synthesize, bench graph) sets :attr:`LatentDiffusion.steering`, and
:func:`generator.sampling.sample` then moves every step's x0_hat by it (:meth:`TableSteering.steer`): gamma 0 is the
plain sampler, image for image. Stock diffusers and peft load a steered folder's LoRA (where it has one); a diffusers
pipeline steers by the table through :meth:`TableSteering.attach`, a forward hook on its UNet that adds the same shift
to its output (with DDIM it draws synthmed's steered images).

A request's features come from the structured findings the sampler is given (:func:`request_features`): the graph's
composition for ``synthmed generate``, the request's expectation for the loop's held-out and test sets, ``--finding``
or the graph's reader of the text for ``synthmed sample``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .ddim_logprob import output_for_x0, predicted_x0
from .errors import UserError

FORMAT = "synthmed-offset-table-1"


def request_features(modality: str, findings: Sequence[Mapping[str, Any]]) -> list[str]:
    """The table's features of one request: its modality's bias, each present finding with its side, each finding it
    states absent ("stated": False, the absences a normal study implies without naming them, are left out). A finding's
    side is its ``laterality`` (the request sampler's and the graph's findings) or ``side`` (an eval case's labels)."""
    out = [f"{modality}|_bias"]
    for f in findings or ():
        if f.get("uncertain"):  # a hedged finding ("possible consolidation") states nothing (agents.reader)
            continue
        if f["present"]:
            out.append(f"{modality}|{f['name']}|present|{f.get('laterality') or f.get('side') or '-'}")
        elif f.get("stated", True):
            out.append(f"{modality}|{f['name']}|absent")
    return out


class OffsetTable:
    """``weights`` (T, F, C, h, w): the offset of feature f at fitted step t, for the scheduler's ``timesteps`` (T, in
    sampling order); ``features`` name the F columns."""

    def __init__(self, features: Sequence[str], timesteps: Sequence[int], weights: torch.Tensor, ridge: float = 0.0):
        if weights.dim() < 3 or weights.shape[:2] != (len(timesteps), len(features)):
            raise ValueError(f"weights of shape {tuple(weights.shape)} do not match {len(timesteps)} timesteps x {len(features)} features")
        if len(set(features)) != len(features):
            raise ValueError("the table's features repeat")
        self.features = list(features)
        self.index = {f: k for k, f in enumerate(self.features)}
        self.timesteps = [int(t) for t in timesteps]
        self.weights = weights.float()
        self.ridge = float(ridge)
        self.fit_r2: list[float] | None = None  # per step, R2 on the drafts :meth:`fit` was fitted to

    @classmethod
    def fit(cls, features: Sequence[Sequence[str]], shifts: torch.Tensor, timesteps: Sequence[int], ridge: float = 1.0) -> "OffsetTable":
        """Per step, the ridge regression of the N drafts' shifts (N, T, C, h, w) on their features' indicators."""
        if not ridge >= 0:
            raise UserError(f"the offset table's ridge penalty must be 0 or more, got {ridge!r}")
        if shifts.dim() < 3 or shifts.shape[0] != len(features) or shifts.shape[1] != len(timesteps):
            raise ValueError(f"shifts of shape {tuple(shifts.shape)} do not match {len(features)} drafts x {len(timesteps)} steps")
        if not len(features):
            raise UserError("no drafts to fit the offset table to")
        vocab = sorted({f for fs in features for f in fs})
        table = cls(vocab, timesteps, torch.zeros(len(timesteps), len(vocab), *shifts.shape[2:]), ridge)
        X = table.design(features).double()
        gram = X.T @ X + ridge * torch.eye(len(vocab), dtype=X.dtype)
        n, steps = shifts.shape[:2]
        rhs = X.T @ shifts.reshape(n, -1).double()  # every step's right-hand sides at once: (F, T x D)
        # lstsq, not solve: with no ridge a feature that always comes with another is not singular
        solution = torch.linalg.lstsq(gram, rhs).solution.float().view(len(vocab), steps, *shifts.shape[2:])
        table.weights = solution.transpose(0, 1).contiguous()
        table.fit_r2 = table.r2(features, shifts)  # what it holds of the data it was fitted to
        return table

    def design(self, features: Sequence[Sequence[str]]) -> torch.Tensor:
        """(N, F) indicators; a feature the table never saw adds nothing."""
        X = torch.zeros(len(features), len(self.features))
        for i, fs in enumerate(features):
            for f in fs:
                k = self.index.get(f)
                if k is not None:
                    X[i, k] = 1.0
        return X

    def r2(self, features: Sequence[Sequence[str]], shifts: torch.Tensor) -> list[float]:
        """Per step, the share of the shifts' energy the table explains."""
        pred = torch.einsum("nf,tfd->ntd", self.design(features), self.weights.flatten(2))
        flat = shifts.flatten(2).float()
        return [1 - float((flat[:, j] - pred[:, j]).pow(2).sum() / flat[:, j].pow(2).sum().clamp_min(1e-30))
                for j in range(len(self.timesteps))]

    def at(self, t: int | torch.Tensor) -> torch.Tensor:
        """(F, C, h, w): the offsets at timestep ``t``, linear between the two fitted timesteps around it (the first or
        last fitted one outside them), so a sampler with other steps than the fit's can use the table."""
        t = float(t)
        ts = self.timesteps
        order = sorted(range(len(ts)), key=lambda k: ts[k])
        lo = max((k for k in order if ts[k] <= t), key=lambda k: ts[k], default=order[0])
        hi = min((k for k in order if ts[k] >= t), key=lambda k: ts[k], default=order[-1])
        if ts[lo] == ts[hi]:
            return self.weights[lo]
        w = (t - ts[lo]) / (ts[hi] - ts[lo])
        return (1 - w) * self.weights[lo] + w * self.weights[hi]

    def offset(self, features: Sequence[Sequence[str]], t: int | torch.Tensor) -> torch.Tensor:
        """(N, C, h, w): each request's offset at timestep ``t``."""
        return torch.einsum("nf,fd->nd", self.design(features), self.at(t).flatten(1)).view(len(features), *self.weights.shape[2:])

    def save(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from generator.fileio import atomic_write

        meta = {"format": FORMAT, "features": json.dumps(self.features), "timesteps": json.dumps(self.timesteps),
                "ridge": repr(self.ridge)}
        return atomic_write(path, lambda tmp: save_file({"weights": self.weights.contiguous()}, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "OffsetTable":
        from safetensors import safe_open

        from generator.safeload import check_safetensors

        fix = "use the one a table-stage run wrote (synthmed improve --config table: RUN/offset_table.safetensors) or remove it"
        check_safetensors(path, "offset table", fix)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or "weights" not in f.keys():
                raise UserError(f"{path} is not a synthmed offset table (format {meta.get('format')!r}, want {FORMAT!r}); {fix}")
            weights = f.get_tensor("weights")
        try:
            return cls(json.loads(meta["features"]), json.loads(meta["timesteps"]), weights, float(meta.get("ridge", 0)))
        except (KeyError, ValueError, TypeError) as exc:
            raise UserError(f"offset table {path} is damaged ({exc}); {fix}") from None


STEERING_FILE = "steering.json"  # marks a steered folder (`synthmed runs steer`): gamma and the table's file
STEERING_FORMAT = "synthmed-steering-1"
OFFSET_TABLE_FILE = "offset_table.safetensors"


class TableSteering:
    """``gamma`` x ``table``'s offset for each request added to every sampling step's x0_hat (:meth:`steer`)."""

    def __init__(self, table: OffsetTable, gamma: float, source: str | None = None,
                 implies: Mapping[str, Mapping[str, Sequence[str]]] | None = None, gammas: Mapping[str, float] | None = None):
        for value in (gamma, *(gammas or {}).values()):
            if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0):
                raise UserError(f"a steering's gamma must be a number, 0 or more, got {value!r}")
        self.table = table
        self.gamma = float(gamma)
        # per modality, a gamma of its own (`synthmed runs steer --per-modality`: chosen on each modality's held-out
        # images); a modality without one takes ``gamma``
        self.gammas = {str(m): float(g) for m, g in (gammas or {}).items()}
        self.source = source  # the folder it was loaded from, for messages and records
        # per modality, the findings a finding implies present (the run's request sampler's FindingSpec.implies: "active
        # CNV" is drawn, asked for and fitted with its subretinal fluid); a text that names the finding alone steers
        # as the requests the table was fitted on
        self.implies = {m: {f: list(v) for f, v in (by or {}).items()} for m, by in (implies or {}).items()}
        # a finding's is-a ancestors (agents.reader's lineage): a kind the table has no offset for ("plate atelectasis", as
        # the graph's reader names it) takes its nearest kind the table has ("atelectasis"); set by those who read text
        self.lineage: Callable[[str], set[str]] | None = None
        self._names = {tuple(f.split("|")[:2]) for f in table.features if f.count("|") >= 2}

    def features(self, modalities: Sequence[str], findings: Sequence[Sequence[Mapping[str, Any]] | None] | None) -> list[list[str]]:
        """Each sample's table features; a sample without findings gets its modality's bias alone."""
        findings = findings if findings is not None else [None] * len(modalities)
        return [[self._known(feature) for feature in request_features(m, self._implied(m, [self._named(m, x) for x in f or ()]))]
                for m, f in zip(modalities, findings)]

    def _implied(self, modality: str, findings: list[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """``findings`` with what their present ones imply (:attr:`implies`) added present, unless they state it."""
        implies = self.implies.get(modality, {})
        named = {f.get("name") for f in findings}
        extra = []
        for f in findings:
            if f.get("present") and not f.get("uncertain"):
                for name in implies.get(f.get("name"), ()):
                    if name not in named:
                        named.add(name)
                        extra.append({"name": name, "present": True})
        return [*findings, *extra]

    def _named(self, modality: str, finding: Mapping[str, Any]) -> Mapping[str, Any]:
        name = finding.get("name")
        if self.lineage is None or (modality, name) in self._names:
            return finding
        kinds = sorted(a for a in self.lineage(name) if (modality, a) in self._names)
        return {**finding, "name": kinds[0]} if kinds else finding

    def _known(self, feature: str) -> str:
        """A present finding's side the table has no offset for takes the finding's side-free offset, where it has one:
        the graph's reader gives a finding the side its location implies ("left lower lobe"), where the loop's requests
        (the table's fit) state the location alone."""
        if feature in self.table.index or not feature.count("|") == 3:
            return feature
        sideless = feature.rsplit("|", 1)[0] + "|-"
        return sideless if sideless in self.table.index else feature

    def check(self, model) -> None:
        """A clear error where the table's offsets cannot move ``model``'s latents."""
        from .models import latent_size

        self.check_latents(model.cfg.latent_channels, latent_size(model.cfg))

    def gamma_for(self, modality: str) -> float:
        return self.gammas.get(modality, self.gamma)

    def sample_gammas(self, features: Sequence[Sequence[str]]) -> torch.Tensor:
        """(N,): each sample's gamma, by its modality (its first feature is the modality's bias, :func:`request_features`)."""
        return torch.tensor([self.gamma_for(f[0].split("|", 1)[0]) if f else self.gamma for f in features])

    def delta(self, features: Sequence[Sequence[str]], t: int | torch.Tensor) -> torch.Tensor:
        """(N, C, h, w): how far each sample's x0_hat moves at timestep ``t``: its gamma x the table's offset."""
        return self.sample_gammas(features).view(-1, *[1] * (self.table.weights.dim() - 2)) * self.table.offset(features, t)

    def steer(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | int, alphas_cumprod: torch.Tensor,
              prediction_type: str, features: Sequence[Sequence[str]]) -> torch.Tensor:
        """The UNet ``output`` at ``x_t`` whose x0_hat is moved by gamma x each sample's offset at timestep ``t``; a
        sample whose gamma is 0 keeps its output as it is, bit for bit."""
        moved = (self.sample_gammas(features) != 0).nonzero().flatten()
        if not len(moved):
            return output
        t = int(t)
        alpha = alphas_cumprod[t].to(x_t.device)
        rows = moved.tolist()
        x0 = predicted_x0(output[moved].float(), x_t[moved].float(), alpha, prediction_type)
        delta = self.delta([features[i] for i in rows], t).to(x0.device)
        out = output.clone()
        out[moved] = output_for_x0(x0 + delta, x_t[moved].float(), alpha, prediction_type).to(output.dtype)
        return out

    def shift(self, t: int, features: Sequence[Sequence[str]], alphas_cumprod: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """(N, C, h, w): what :meth:`steer` adds to the UNet's output at timestep ``t``. At a fixed x_t the output is
        linear in x0_hat, so moving x0_hat by delta moves the output by the same amount whatever the output was."""
        delta = self.delta(features, t)
        alpha = alphas_cumprod[t].float().cpu()
        return output_for_x0(delta, torch.zeros_like(delta), alpha, prediction_type)

    def attach(self, pipe, modalities: Sequence[str], findings: Sequence[Sequence[Mapping[str, Any]] | None] | None = None
               ) -> "PipelineSteering":
        """Steer a diffusers pipeline (``pipe.unet``, ``pipe.scheduler``; a ``StableDiffusionPipeline`` over a synthmed
        model's or any epsilon-, v- or x0-predicting UNet whose latents the table fits) for one call's requests: one
        ``modality`` and one list of structured ``findings`` per prompt, as :func:`request_features` reads them::

            steering = load_steering("runs/<id>/steered")
            with steering.attach(pipe, ["cxr"], [[{"name": "pleural_effusion", "present": True, "laterality": "left"}]]):
                image = pipe(prompt_embeds=..., num_inference_steps=25, guidance_scale=4.0).images[0]

        A forward hook on the UNet adds the table's offset to every call's output (both guidance halves alike, so the
        guided output moves by it once): what synthmed's sampler does (``--lora RUN/steered``), image for image with
        DDIM (tested). ``with`` (or ``.remove()``) takes the hook off."""
        self.check_latents(pipe.unet.config.in_channels, pipe.unet.config.sample_size)
        return PipelineSteering(self, pipe, self.features(modalities, findings))

    def check_latents(self, channels: int, size: int | Sequence[int]) -> None:
        """A clear error where the table's offsets are not ``channels`` x ``size`` (a side, or (height, width))."""
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        want = (int(channels), int(h), int(w))
        if tuple(self.table.weights.shape[2:]) != want:
            raise UserError(f"the offset table of {self.source or 'the steering'} holds offsets of shape "
                            f"{tuple(self.table.weights.shape[2:])} but this model's latents are {want}: it was fitted for "
                            "another model; steer the model its run trained (its config.yaml's model)")

    def describe(self) -> dict[str, Any]:
        return {"gamma": self.gamma, **({"gammas": self.gammas} if self.gammas else {}), "features": len(self.table.features),
                "timesteps": self.table.timesteps, **({"implies": self.implies} if self.implies else {}),
                **({"folder": self.source} if self.source else {})}


class PipelineSteering:
    """The forward hook :meth:`TableSteering.attach` puts on a diffusers pipeline's UNet (a context manager)."""

    def __init__(self, steering: TableSteering, pipe, features: list[list[str]]):
        if not features:
            raise UserError("steering a pipeline needs one modality (and its findings) per prompt; none given")
        prediction_type = pipe.scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UserError(f"the pipeline's scheduler predicts {prediction_type!r}; the table steers epsilon, v_prediction "
                            "or sample predictions")
        alphas = getattr(pipe.scheduler, "alphas_cumprod", None)
        if alphas is None:
            raise UserError(f"{type(pipe.scheduler).__name__} has no alphas_cumprod to place the table's offsets by; use DDIM "
                            "(DDIMScheduler.from_config(pipe.scheduler.config)), as synthmed's sampler does")
        self.steering, self.pipe, self.features = steering, pipe, features
        self.alphas, self.prediction_type = torch.as_tensor(alphas).float(), prediction_type
        self._handle = pipe.unet.register_forward_hook(self._hook, with_kwargs=True)

    def rows(self, batch: int) -> list[int]:
        """Which request each of the UNet's ``batch`` rows draws: diffusers stacks [negatives, prompts] under guidance,
        each prompt's ``num_images_per_prompt`` images next to each other."""
        n = len(self.features)
        halves = 2 if getattr(self.pipe, "do_classifier_free_guidance", batch == 2 * n) else 1
        if batch % (halves * n):
            raise UserError(f"the UNet drew a batch of {batch} for {n} steered requests"
                            f"{' under guidance' if halves == 2 else ''}: attach one modality and findings list per prompt")
        per = batch // (halves * n)
        return [(b % (batch // halves)) // per for b in range(batch)]

    def _hook(self, module, args, kwargs, output):
        sample = output[0] if isinstance(output, tuple) else output.sample
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        ts = torch.as_tensor(t).flatten().float().round().long().cpu()
        rows = self.rows(sample.shape[0])
        if ts.numel() not in (1, len(rows)):
            raise UserError(f"the UNet was called with {ts.numel()} timesteps for a batch of {len(rows)}")
        ts = ts.expand(len(rows)) if ts.numel() == 1 else ts
        shift = torch.empty(sample.shape, dtype=torch.float32)
        for value in ts.unique().tolist():
            at = (ts == value).nonzero().flatten().tolist()
            shift[at] = self.steering.shift(int(value), [self.features[rows[b]] for b in at], self.alphas, self.prediction_type)
        moved = sample + shift.to(sample.device, sample.dtype)
        if isinstance(output, tuple):
            return (moved, *output[1:])
        output.sample = moved
        return output

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "PipelineSteering":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def is_steered_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / STEERING_FILE).is_file()


def save_steering(folder: str | os.PathLike, table: OffsetTable, gamma: float, record: Mapping[str, Any] | None = None,
                  implies: Mapping[str, Mapping[str, Sequence[str]]] | None = None, gammas: Mapping[str, float] | None = None) -> Path:
    """The table and ``steering.json`` (gamma, the table's file, ``implies`` and ``gammas``: see :class:`TableSteering`,
    ``record``) in ``folder``; steering.json is written last, so a folder is a steered folder only once its table is
    whole."""
    from .fileio import write_text_atomic

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    table.save(folder / OFFSET_TABLE_FILE)
    info = {"format": STEERING_FORMAT, "gamma": float(gamma), "table": OFFSET_TABLE_FILE, "features": len(table.features),
            "timesteps": table.timesteps, **({"gammas": {m: float(g) for m, g in gammas.items()}} if gammas else {}),
            **({"implies": {m: dict(v) for m, v in implies.items()}} if implies else {}),
            **dict(record or {})}
    write_text_atomic(folder / STEERING_FILE, json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return folder


def load_steering(folder: str | os.PathLike) -> TableSteering:
    """A steered folder's :class:`TableSteering` (see :func:`save_steering`)."""
    folder = Path(folder)
    fix = "rewrite it with `synthmed runs steer RUN` (it writes RUN/steered/), or name another adapter"
    try:
        info = json.loads((folder / STEERING_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{folder / STEERING_FILE} cannot be read ({exc}); {fix}") from None
    if not isinstance(info, dict) or info.get("format") != STEERING_FORMAT:
        got = info.get("format") if isinstance(info, dict) else type(info).__name__
        raise UserError(f"{folder / STEERING_FILE} is not a synthmed steering (format {got!r}, want {STEERING_FORMAT!r}); {fix}")
    gamma = info.get("gamma")
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise UserError(f"{folder / STEERING_FILE}: gamma must be a number, 0 or more, got {gamma!r}; {fix}")
    table_path = folder / str(info.get("table") or OFFSET_TABLE_FILE)
    if not table_path.is_file():
        raise UserError(f"{folder} names its offset table {table_path.name} but holds no such file; {fix}")
    implies = info.get("implies") or {}  # a folder written before implications were kept has none
    if not (isinstance(implies, dict) and all(isinstance(v, dict) and all(isinstance(x, list) for x in v.values())
                                              for v in implies.values())):
        raise UserError(f"{folder / STEERING_FILE}: implies must map modality -> finding -> implied findings, got {implies!r}; {fix}")
    gammas = info.get("gammas") or {}  # per modality, where `runs steer --per-modality` chose them
    if not (isinstance(gammas, dict) and all(not isinstance(g, bool) and isinstance(g, (int, float)) and g >= 0
                                             for g in gammas.values())):
        raise UserError(f"{folder / STEERING_FILE}: gammas must map modality -> a gamma of 0 or more, got {gammas!r}; {fix}")
    return TableSteering(OffsetTable.load(table_path), float(gamma), str(folder), implies, gammas)


__all__ = ["FORMAT", "OFFSET_TABLE_FILE", "OffsetTable", "PipelineSteering", "STEERING_FILE", "STEERING_FORMAT", "TableSteering",
           "is_steered_folder", "load_steering", "request_features", "save_steering"]
