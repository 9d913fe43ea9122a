"""The DDPO trainer: rollouts with log probabilities, rewards, group advantages, PPO-clip updates of the
UNet's LoRA weights (or, ``trainable``, of a finding-token model's finding table, or both), and stage 2
(active selection: a reward-weighted denoising update on the samples the selector and the verifier keep).

It receives its parts (policy, reward, accelerator, settings) and builds none of them; the run
directory, evaluation and resume live in :mod:`pipelines.improve`. The maths is in :mod:`rlhf.ddpo`.

Several processes (``accelerate launch``): every rank rolls out its own slice of the epoch's prompts
with its own seeds (both keyed by the *global* sample index, so one process with the whole batch
draws exactly the same samples); rewards are gathered so advantages see every sample of a group;
each rank's loss is a sum normalised by the global number of terms, and gradients are summed across
ranks before the optimiser step, so N processes make the update one process would make with the same
total batch.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from generator.ddim_logprob import ddim_step_with_logprob
from generator.errors import SynthmedError
from generator.lora import adapters_disabled, lora_parameters, merged_for_sampling
from generator.models import LatentDiffusion, latent_size
from generator.sampling import guided_conditioning, guided_prediction, initial_noise

from .config import DDPOConfig, SelectionConfig
from .ddpo import (PerPromptStatTracker, batch_advantages, clip_advantages, epoch_lr, findings_log_likelihood, gaussian_kl, group_advantages,
                   jittered_views, ppo_clip_loss, predicted_x0, stated_vector)
from .guidance import GuidedDraw, RewardGuide, reward_guided_draw

log = logging.getLogger(__name__)


class NonFiniteError(SynthmedError, ValueError):
    """A NaN or infinite loss or reward: the loop stops before anything of the epoch is written."""


@dataclass
class Rollout:
    """One rank's rollouts of an epoch."""

    items: list[Any]  # ImagePrompt per sample
    seeds: list[int]  # noise seed per sample
    indices: list[int]  # global sample index per sample
    latents: torch.Tensor  # (B, T + 1, C, h, w): x_T ... x_0
    log_probs: torch.Tensor  # (B, T) float32
    timesteps: torch.Tensor  # (T,)
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1], float32 on the CPU
    seconds: float = 0.0


@dataclass
class UpdateStats:
    steps: list[dict] = field(default_factory=list)  # one record per optimiser step
    seconds: float = 0.0


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The noise seed of global sample ``index`` of ``epoch``: distinct across epochs and ranks."""
    return int(np.random.default_rng([seed, epoch, index]).integers(2**31 - 1))


class DDPOTrainer:
    def __init__(self, model: LatentDiffusion, reward: Callable, cfg: DDPOConfig, selection: SelectionConfig,
                 accelerator, selector_threshold: float | None = None):
        self.model = model
        self.reward = reward
        self.cfg = cfg
        self.selection = selection
        self.accelerator = accelerator
        targets = cfg.trainable.split("+")
        self.trains_findings = "findings" in targets
        lora = [p for p in lora_parameters(model.unet) if p.requires_grad]
        if not lora:
            raise ValueError("the UNet has no trainable LoRA parameters; add an adapter with generator.lora.add_lora first")
        if "lora" not in targets:  # the adapter stays (zero: the base UNet) so every run folder has one; it is not trained
            for p in lora:
                p.requires_grad_(False)
            lora = []
        table = model.conditioner.finding_parameters() if self.trains_findings else []
        if self.trains_findings and not table:
            raise SynthmedError(f"improve.ddpo.trainable={cfg.trainable} tunes the finding table, but the base model has none "
                                "(model.finding_tokens is off); improve a model trained with --model.finding_tokens=true, or "
                                "train the LoRA only (improve.ddpo.trainable=lora)")
        for p in table:
            p.requires_grad_(True)
        # the KL's reference: the base model's own finding table (frozen), swapped in with the adapter disabled
        self._base_findings = copy.deepcopy(model.conditioner.findings).requires_grad_(False) if self.trains_findings else None
        self.params = lora + table
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.tracker = PerPromptStatTracker(cfg.tracker_buffer, cfg.tracker_min_count) if cfg.advantages == "tracker" else None
        self.selector_threshold = selection.threshold if selection.threshold is not None else selector_threshold
        self.global_step = 0
        model.scheduler.set_timesteps(cfg.steps)
        self.timesteps = model.scheduler.timesteps.clone()
        if selection.draws_guided:  # refused before anything is written
            self.reward_scorer("improve.selection.source=guided")
        if selection.target in ("trajectory", "table", "drafts") and selection.source != "guided":
            what = {"trajectory": "the guided drafts' own steps", "table": "an offset table of the guided drafts' shifts",
                    "drafts": "the base's guided drafts"}
            raise SynthmedError(f"improve.selection.target={selection.target} fits {what[selection.target]}; it needs "
                                "improve.selection.source=guided")
        if (selection.table_warmup or selection.table_replay) and selection.target != "table":
            raise SynthmedError(f"improve.selection.table_warmup / table_replay shape the offset table's fit; they need "
                                f"improve.selection.target=table (it is {selection.target}); set them to 0 or use the table")
        if cfg.objective == "none" and not (selection.enabled and selection.max_per_epoch > 0):
            raise SynthmedError("improve.ddpo.objective=none leaves stage 1 without an update and stage 2 is off "
                                "(improve.selection.enabled / max_per_epoch): nothing would be trained; turn one of them on")
        # target=table: every epoch's guided drafts of the base, as the offset table's data (features and shifts per draft)
        self.offset_features: list[list[str]] = []
        self.offset_shifts: torch.Tensor | None = None
        # target=table with table_replay: the selected requests' table-steered draws of the last epochs, revisited
        self.replay: list[dict] = []

    # -- state --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "tracker": self.tracker.state_dict() if self.tracker else None,
                "global_step": self.global_step,
                "offset_pool": {"features": self.offset_features, "shifts": self.offset_shifts} if self.offset_features else None,
                "replay": self.replay}

    def set_epoch_lr(self, epoch: int) -> float:
        """Sets the optimiser's learning rate for ``epoch`` by ``improve.ddpo.lr_schedule`` (:func:`rlhf.ddpo.epoch_lr`) and
        returns it; called at the start of each epoch, so a resumed run's rates are the uninterrupted run's."""
        cfg = self.cfg
        lr = epoch_lr(cfg.lr, epoch, cfg.lr_schedule, cfg.lr_schedule_epochs or cfg.epochs, cfg.lr_min_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.tracker is not None and state.get("tracker") is not None:
            self.tracker.load_state_dict(state["tracker"])
        self.global_step = int(state["global_step"])
        pool = state.get("offset_pool")
        self.offset_features = [list(f) for f in pool["features"]] if pool else []
        self.offset_shifts = pool["shifts"] if pool else None
        self.replay = [dict(entry) for entry in state.get("replay") or []]

    # -- the policy's conditioning and its reference ---------------------------------------------
    def _conditioning(self, items: Sequence[Any]):
        """Guided conditioning of ``items`` (unconditional half first); with the gradient on when the finding table trains."""
        with torch.set_grad_enabled(self.trains_findings):
            return guided_conditioning(self.model, [it.prompt for it in items], [it.modality for it in items],
                                       [it.negative for it in items], self.cfg.guidance, [it.generator_findings for it in items])

    @contextmanager
    def _base_policy(self) -> Iterator[None]:
        """The base model, for the KL's reference: the adapter disabled and, when the finding table trains, the base
        model's table in place of the tuned one."""
        with adapters_disabled(self.model.unet):
            if self._base_findings is None:
                yield
                return
            conditioner = self.model.conditioner
            tuned, conditioner.findings = conditioner.findings, self._base_findings
            try:
                yield
            finally:
                conditioner.findings = tuned

    def _reference_conditioning(self, items: Sequence[Any], cond):
        """The conditioning the KL's reference sees: ``cond`` itself unless the finding table trains."""
        if self._base_findings is None:
            return cond
        with torch.no_grad(), self._base_policy():
            return self._conditioning(items)

    # -- sampling -----------------------------------------------------------------------------
    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    def local_slice(self, n_global: int) -> slice:
        per = n_global // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    @torch.no_grad()
    def rollout(self, items: Sequence[Any], indices: Sequence[int], epoch: int, progress: bool = True) -> Rollout:
        """K images per prompt were expanded by the caller: ``items[i]`` is drawn with seed
        ``sample_seed(cfg.seed, epoch, indices[i])``; DDIM with eta > 0 and guidance, keeping every latent
        and each step's log probability (float32)."""
        cfg, model = self.cfg, self.model
        started = time.perf_counter()
        seeds = [sample_seed(cfg.seed, epoch, i) for i in indices]
        size = latent_size(model.cfg)
        shape = (model.cfg.latent_channels, size, size)
        scheduler = model.scheduler
        scheduler.set_timesteps(cfg.steps)
        all_latents, all_logp, images = [], [], []
        bar = tqdm(total=len(items), desc=f"epoch {epoch}: rollouts", unit=" img", disable=not progress, leave=False)
        model.unet.eval()
        with merged_for_sampling(model.unet):
            self._draw(items, seeds, shape, all_latents, all_logp, images, bar)
        bar.close()
        return Rollout(list(items), seeds, list(indices), torch.cat(all_latents), torch.cat(all_logp), scheduler.timesteps.clone(),
                       torch.cat(images), time.perf_counter() - started)

    def _draw(self, items, seeds, shape, all_latents, all_logp, images, bar) -> None:
        cfg, model = self.cfg, self.model
        scheduler = model.scheduler
        for start in range(0, len(items), cfg.sample_batch_size):
            chunk = list(items[start:start + cfg.sample_batch_size])
            chunk_seeds = seeds[start:start + len(chunk)]
            noise = [initial_noise(1, shape, s) for s in chunk_seeds]
            latents = torch.cat([x for x, _ in noise]).to(model.device) * scheduler.init_noise_sigma
            generators = [g[0] for _, g in noise]
            cond = guided_conditioning(model, [it.prompt for it in chunk], [it.modality for it in chunk],
                                       [it.negative for it in chunk], cfg.guidance, [it.generator_findings for it in chunk])
            trajectory, logps = [latents], []
            for t in scheduler.timesteps:
                prediction = guided_prediction(model, latents, t.expand(len(chunk)), cond, cfg.guidance)
                step = ddim_step_with_logprob(scheduler, prediction, t, latents, eta=cfg.eta, generator=generators,
                                              reduce=cfg.logprob_reduce)
                latents = step.prev_sample
                trajectory.append(latents)
                logps.append(step.log_prob.float())
            all_latents.append(torch.stack(trajectory, dim=1).cpu())  # (b, T + 1, C, h, w)
            all_logp.append(torch.stack(logps, dim=1).cpu())  # (b, T)
            images.append(model.decode(latents).float().cpu())
            bar.update(len(chunk))

    # -- advantages ---------------------------------------------------------------------------
    def advantages(self, rewards: np.ndarray, groups: Sequence[str], prompts: Sequence[str]) -> np.ndarray:
        """Normalised, clipped advantages of the whole (gathered) epoch batch."""
        if self.cfg.advantages == "group":
            adv = group_advantages(rewards, groups)
        elif self.cfg.advantages == "tracker":
            adv = self.tracker.update(list(prompts), rewards)
        else:
            adv = batch_advantages(rewards)
        return clip_advantages(adv, self.cfg.adv_clip_max)

    # -- stage 1: PPO-clip ----------------------------------------------------------------------
    def _train_timesteps(self, epoch: int, inner: int, index: int) -> np.ndarray:
        """Which steps of sample ``index``'s trajectory are trained on: a fresh draw per sample and pass."""
        steps = len(self.timesteps)
        n = max(1, int(round(steps * self.cfg.timestep_fraction)))
        return np.random.default_rng([self.cfg.seed, epoch, inner, index, 7]).permutation(steps)[:n]

    def _sync_gradients(self) -> None:
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        flat = self.accelerator.reduce(flat, reduction="sum")
        offset = 0
        for p, g in zip(self.params, grads):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).clone()
            offset += n

    def _optimiser_step(self) -> float:
        self._sync_gradients()
        norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm))
        if not math.isfinite(norm):
            raise NonFiniteError(f"the gradient norm is {norm} at optimiser step {self.global_step + 1}")
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1
        return norm

    def _optimiser_passes(self, n: int, epoch: int, salt: int, desc: str, progress: bool):
        """``inner_epochs`` passes over an epoch's ``n`` rollouts in a seeded order (``salt`` keeps each update's draw
        its own): yields ``(inner, members, bar)`` per optimiser step, the UNet in train mode meanwhile."""
        cfg = self.cfg
        self.model.scheduler.set_timesteps(cfg.steps)
        self.model.unet.train()
        per_step = cfg.train_batch_size * cfg.grad_accum_steps
        n_steps = math.ceil(n / per_step)
        bar = tqdm(total=cfg.inner_epochs * n_steps, desc=desc, unit=" step", disable=not progress, leave=False)
        try:
            for inner in range(cfg.inner_epochs):
                order = np.random.default_rng([cfg.seed, epoch, inner, salt]).permutation(n)
                for s in range(n_steps):
                    yield inner, order[s * per_step:(s + 1) * per_step], bar
                    bar.update(1)
        finally:
            bar.close()
            self.model.unet.eval()

    def update(self, rollout: Rollout, advantages: np.ndarray, epoch: int, progress: bool = True) -> UpdateStats:
        """PPO-clip over a sampled fraction of each trajectory's steps, ``inner_epochs`` passes."""
        cfg, model = self.cfg, self.model
        started = time.perf_counter()
        stats = UpdateStats()
        n = len(rollout.items)
        adv = torch.as_tensor(advantages, dtype=torch.float32)
        scheduler = model.scheduler
        micro = cfg.train_batch_size
        for inner, members, bar in self._optimiser_passes(n, epoch, 11, f"epoch {epoch}: update", progress):
            train_steps = {int(i): self._train_timesteps(epoch, inner, rollout.indices[i]) for i in members}
            local_terms = sum(len(v) for v in train_steps.values())
            global_terms = local_terms * self.world  # ranks hold equal shares (checked by the loop)
            acc = {"policy_loss": 0.0, "kl": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "ratio_min": math.inf, "ratio_max": -math.inf}
            for m in range(0, len(members), micro):
                batch = members[m:m + micro]
                items = [rollout.items[i] for i in batch]
                cond = self._conditioning(items)
                ref_cond = self._reference_conditioning(items, cond) if cfg.kl_weight > 0 else None
                n_train = len(train_steps[int(batch[0])])
                for j in range(n_train):
                    idx = torch.as_tensor([int(train_steps[int(i)][j]) for i in batch])
                    rows = torch.as_tensor(batch)
                    x_t = rollout.latents[rows, idx].to(model.device)
                    x_prev = rollout.latents[rows, idx + 1].to(model.device)
                    t = rollout.timesteps[idx].to(model.device)
                    old = rollout.log_probs[rows, idx].to(model.device)
                    prediction = guided_prediction(model, x_t, t, cond, cfg.guidance)
                    step = ddim_step_with_logprob(scheduler, prediction, t, x_t, eta=cfg.eta, prev_sample=x_prev,
                                                  reduce=cfg.logprob_reduce)
                    terms = ppo_clip_loss(step.log_prob, old, adv[rows].to(model.device), cfg.clip_range, reduce="sum")
                    loss = terms.loss
                    kl_value = torch.zeros(())
                    if cfg.kl_weight > 0:
                        with torch.no_grad(), self._base_policy():
                            ref_prediction = guided_prediction(model, x_t, t, ref_cond, cfg.guidance)
                            ref = ddim_step_with_logprob(scheduler, ref_prediction, t, x_t, eta=cfg.eta, prev_sample=x_prev,
                                                         reduce=cfg.logprob_reduce)
                        kl = gaussian_kl(step.mean, ref.mean, step.std, reduce=cfg.logprob_reduce)
                        kl_value = kl.detach().sum()
                        loss = loss + cfg.kl_weight * kl.sum()
                    if not torch.isfinite(loss):
                        bad = [rollout.indices[int(i)] for i in batch]
                        raise NonFiniteError(f"non-finite DDPO loss in epoch {epoch} on samples {bad} "
                                             f"(prompts: {[it.prompt[:60] for it in items]})")
                    (loss / global_terms).backward(retain_graph=self.trains_findings)  # the table's graph serves every timestep
                    k = len(batch)
                    acc["policy_loss"] += float(terms.loss.detach()) / local_terms
                    acc["kl"] += float(kl_value) / local_terms
                    acc["approx_kl"] += float(terms.approx_kl) * k / local_terms
                    acc["clipfrac"] += float(terms.clipfrac) * k / local_terms
                    acc["ratio_min"] = min(acc["ratio_min"], float(terms.ratio.min()))
                    acc["ratio_max"] = max(acc["ratio_max"], float(terms.ratio.max()))
            norm = self._optimiser_step()
            record = {"kind": "step", "epoch": epoch, "step": self.global_step, "stage": "ddpo",
                      "loss": acc["policy_loss"] + cfg.kl_weight * acc["kl"], **acc, "grad_norm": norm,
                      "lr": self.optimizer.param_groups[0]["lr"], "samples": len(members)}
            stats.steps.append(self._mean_over_ranks(record))
            bar.set_postfix(loss=f"{record['loss']:.4f}", clipfrac=f"{acc['clipfrac']:.2f}")
        stats.seconds = time.perf_counter() - started
        return stats

    # -- stage 1, objective "draft": the reward's gradient through the last K steps ----------------------------
    def _stated(self, items: Sequence[Any], labels: Sequence[str]) -> torch.Tensor:
        """(B, L): +1 where an item's structured expectation asks for label l, -1 where it states it absent, else 0."""
        return torch.stack([stated_vector(it.expected, labels) for it in items]) if items else torch.zeros(0, len(labels))

    def draft_update(self, rollout: Rollout, epoch: int, progress: bool = True) -> UpdateStats:
        """DRaFT-K on the epoch's stored rollouts: from each trajectory's latent K steps before the end, the last K
        DDIM steps run again with the gradient on (guidance as in the rollout; each step's noise held at the value the
        rollout drew, ``x_prev = mean + (x_prev_rollout - mean.detach())``, so the final latent *is* the rollout's), the
        VAE decodes, and the reward-role classifier's log likelihood of the expected findings is maximised. The
        evaluator never enters: the classifiers come from the reward's findings scorer, which refuses any other role."""
        cfg, model = self.cfg, self.model
        scorer = self.reward_scorer("the 'draft' objective")
        started = time.perf_counter()
        stats = UpdateStats()
        n = len(rollout.items)
        steps = len(rollout.timesteps)
        k = min(cfg.draft_steps, steps)
        scheduler = model.scheduler
        micro = cfg.train_batch_size
        for _, members, bar in self._optimiser_passes(n, epoch, 13, f"epoch {epoch}: reward-gradient update", progress):
            # images that state any finding the classifier knows carry the loss; the mean runs over all ranks' images
            counted = sum(1 for i in members if any(f in scorer.classifiers[rollout.items[i].modality].label_names
                                                    for f in dict(rollout.items[i].expected)))
            global_count = max(1, int(self.accelerator.reduce(torch.tensor(float(counted)), reduction="sum").item())
                               if self.world > 1 else counted)
            total_ll, total_kl, images_seen = 0.0, 0.0, 0
            for m in range(0, len(members), micro):
                batch = members[m:m + micro]
                rows = torch.as_tensor(batch)
                items = [rollout.items[i] for i in batch]
                cond = self._conditioning(items)
                ref_cond = self._reference_conditioning(items, cond) if cfg.kl_weight > 0 else None
                x = rollout.latents[rows, steps - k].to(model.device)
                kl = torch.zeros(len(batch), device=model.device)
                for j in range(steps - k, steps):
                    t = rollout.timesteps[j].expand(len(batch)).to(model.device)
                    prediction = guided_prediction(model, x, t, cond, cfg.guidance)
                    stored = rollout.latents[rows, j + 1].to(model.device)
                    step = ddim_step_with_logprob(scheduler, prediction, t, x, eta=cfg.eta, prev_sample=stored,
                                                  reduce=cfg.logprob_reduce)
                    if cfg.kl_weight > 0:  # to the base model on the same input, adapter disabled (not a second copy)
                        with torch.no_grad(), self._base_policy():
                            ref = ddim_step_with_logprob(scheduler, guided_prediction(model, x.detach(), t, ref_cond, cfg.guidance), t,
                                                         x.detach(), eta=cfg.eta, prev_sample=stored, reduce=cfg.logprob_reduce)
                        kl = kl + gaussian_kl(step.mean, ref.mean, step.std, reduce=cfg.logprob_reduce)
                    x = step.mean + (stored - step.mean.detach()).to(step.mean.dtype)
                images = model.decode(x).float()
                ll = torch.zeros(len(batch), device=images.device)
                has = torch.zeros(len(batch), dtype=torch.bool, device=images.device)
                views = torch.Generator().manual_seed(int(np.random.default_rng([cfg.seed, epoch, rollout.indices[batch[0]], 23])
                                                          .integers(2**31 - 1)))
                for modality in dict.fromkeys(it.modality for it in items):
                    index = torch.as_tensor([i for i, it in enumerate(items) if it.modality == modality], device=images.device)
                    classifier = scorer.classifiers[modality]
                    seen = jittered_views(images[index], cfg.draft_views, views, cfg.draft_view_shift, cfg.draft_view_zoom)
                    stated = self._stated([items[i] for i in index.tolist()], classifier.label_names)
                    value, mask = findings_log_likelihood(classifier.differentiable_logits(seen),
                                                          stated.repeat(cfg.draft_views, 1).to(seen.device))
                    ll = ll.index_put((index,), value.view(cfg.draft_views, -1).mean(0).to(ll.dtype))
                    has = has.index_put((index,), mask[:len(index)])
                loss = (-(ll * has).sum() + cfg.kl_weight * kl.sum()) / global_count
                if not torch.isfinite(loss):
                    bad = [rollout.indices[int(i)] for i in batch]
                    raise NonFiniteError(f"non-finite reward-gradient loss in epoch {epoch} on samples {bad} "
                                         f"(prompts: {[it.prompt[:60] for it in items]})")
                loss.backward()
                total_ll += float((ll * has).sum().detach())
                total_kl += float(kl.detach().sum())
                images_seen += int(has.sum())
            norm = self._optimiser_step()
            mean_ll = total_ll / max(1, images_seen)
            mean_kl = total_kl / max(1, len(members))
            record = {"kind": "step", "epoch": epoch, "step": self.global_step, "stage": "draft", "loss": -mean_ll + cfg.kl_weight * mean_kl,
                      "findings_log_likelihood": mean_ll, "kl": mean_kl, "grad_norm": norm, "lr": self.optimizer.param_groups[0]["lr"],
                      "samples": len(members), "draft_steps": k}
            stats.steps.append(self._mean_over_ranks(record))
            bar.set_postfix(loglik=f"{mean_ll:.3f}")
        stats.seconds = time.perf_counter() - started
        return stats

    def _mean_over_ranks(self, record: dict) -> dict:
        keys = ["loss", "policy_loss", "kl", "approx_kl", "clipfrac"]
        if self.world > 1:
            values = torch.tensor([record[k] for k in keys], dtype=torch.float64)
            values = self.accelerator.reduce(values, reduction="mean")
            record.update({k: float(v) for k, v in zip(keys, values)})
        return {k: (round(v, 8) if isinstance(v, float) and math.isfinite(v) else v) for k, v in record.items()}

    # -- stage 2: active selection ------------------------------------------------------------
    def selected(self, rewards: np.ndarray, components: dict[str, np.ndarray]) -> np.ndarray:
        """Boolean mask over the gathered epoch batch: selector quality above the threshold, and (with
        ``require_verifier_pass``) every expected finding on the right side of 0.5; at most
        ``max_per_epoch``, highest reward first."""
        n = len(rewards)
        mask = np.ones(n, dtype=bool)
        if not self.selection.enabled or self.selection.max_per_epoch == 0:
            return np.zeros(n, dtype=bool)
        quality = components.get("selector")
        if quality is not None and self.selector_threshold is not None:
            mask &= quality >= self.selector_threshold
        if self.selection.require_verifier_pass and "findings/verifier_pass" in components:
            mask &= components["findings/verifier_pass"] > 0.5
        chosen = np.flatnonzero(mask)
        if len(chosen) > self.selection.max_per_epoch:
            chosen = chosen[np.argsort(-rewards[chosen], kind="stable")[: self.selection.max_per_epoch]]
        out = np.zeros(n, dtype=bool)
        out[chosen] = True
        return out

    def reward_scorer(self, purpose: str):
        scorer = getattr(self.reward, "finding_scorer", None)
        if scorer is None or getattr(scorer, "role", None) != "reward":
            raise SynthmedError(f"{purpose} needs the reward's findings component (reward-role classifiers); "
                                "add findings to improve.reward.weights")
        return scorer

    @torch.no_grad()
    def guided_drafts(self, items: Sequence[Any], indices: Sequence[int], epoch: int, progress: bool = True,
                      seeds: Sequence[int] | None = None, scale: float | None = None, base: bool = False) -> GuidedDraw:
        """Stage 2's candidates with ``selection.source="guided"``: per item, a reward-guided DDIM draw
        (:func:`rlhf.guidance.reward_guided_draw`: eta 0, the rollouts' steps and guidance) from the rollout's starting
        noise (``sample_seed`` of its global index; ``seeds``: these), its views keyed by the global index too, so any
        batching or split of ranks draws the same. Returns the final latents, the images and, per step, the state ``x_t``,
        the guided output the step took (for ``selection.target="trajectory"``) and the shift guidance gave x0_hat there
        (for ``selection.target="table"``), all on the CPU. The evaluator never enters: the classifiers are the reward's,
        which refuses any other role. ``scale``: this guidance scale instead of ``selection.guidance_scale`` (the held-out
        calibration's). ``base``: drawn by the base model (the adapter disabled), as ``selection.target="table"`` fits
        them."""
        cfg, model = self.cfg, self.model
        guide = RewardGuide(self.reward_scorer("improve.selection.source=guided"),
                            self.selection.guidance_scale if scale is None else scale,
                            self.selection.guidance_views, cfg.draft_view_shift, cfg.draft_view_zoom)
        bar = tqdm(total=len(items), desc=f"epoch {epoch}: guided drafts", unit=" img", disable=not progress, leave=False)
        model.unet.eval()
        with self._base_policy() if base else merged_for_sampling(model.unet):  # a merged adapter cannot be disabled
            draw = reward_guided_draw(
                model, guide, [it.prompt for it in items], [it.modality for it in items],
                [guide.stated(dict(it.expected), it.modality) for it in items],
                list(seeds) if seeds is not None else [sample_seed(cfg.seed, epoch, int(i)) for i in indices],
                lambda i, step: int(np.random.default_rng([cfg.seed, epoch, int(indices[i]), step, 29]).integers(2**31 - 1)),
                cfg.steps, cfg.guidance, negatives=[it.negative for it in items], findings=[it.generator_findings for it in items],
                batch_size=cfg.sample_batch_size, keep_trajectory=True, on_batch=bar.update)
        bar.close()
        return draw

    def keep_offset_drafts(self, items: Sequence[Any], shifts: torch.Tensor) -> None:
        """``selection.target="table"``: add the drafts of ``items`` (every rank's) and their shifts to the table's data."""
        from .amortised import request_features

        self.offset_features += [request_features(it.modality, it.findings) for it in items]
        kept = shifts.cpu().half()  # in half precision: the pool rides in every checkpoint (the shifts' RMS is 1e-2..1e-1)
        self.offset_shifts = kept if self.offset_shifts is None else torch.cat([self.offset_shifts, kept])

    def offset_table(self):
        """The offset table fitted to every draft kept so far (:class:`rlhf.amortised.OffsetTable`)."""
        from .amortised import OffsetTable

        if not self.offset_features:
            raise SynthmedError("no guided drafts kept yet to fit the offset table to")
        return OffsetTable.fit(self.offset_features, self.offset_shifts.float(), [int(t) for t in self.timesteps],
                               self.selection.table_ridge)

    def keep_replay(self, epoch: int, indices: Sequence[int], states: torch.Tensor, targets: torch.Tensor,
                    step_norm: torch.Tensor) -> None:
        """``selection.table_replay``: keep an epoch's selected requests (their global sample ``indices``) with their
        table-steered draws' states and targets (half precision: they ride in every checkpoint) and the epoch's
        per-step norm, dropping the epochs beyond the last ``table_replay``."""
        if self.selection.table_replay == 0 or not len(indices):
            return
        self.replay.append({"epoch": int(epoch), "indices": [int(i) for i in indices], "states": states.cpu().half(),
                            "targets": targets.cpu().half(), "step_norm": step_norm.cpu().float()})
        self.replay = self.replay[-self.selection.table_replay:]

    @torch.no_grad()
    def table_drafts(self, items: Sequence[Any], indices: Sequence[int], epoch: int, table) -> GuidedDraw:
        """Per item, the base's draw (DDIM eta 0, the rollouts' steps and guidance, the rollout's starting noise) with
        x0_hat moved by ``selection.table_gamma`` x the table's offset for its request: the states it passed and the
        outputs it took there are what ``selection.target="table"`` fits."""
        from .amortised import request_features, table_steered_draw

        self.model.unet.eval()
        with self._base_policy():
            draw = table_steered_draw(self.model, table, self.selection.table_gamma, [it.prompt for it in items],
                                      [it.modality for it in items], [request_features(it.modality, it.findings) for it in items],
                                      [sample_seed(self.cfg.seed, epoch, int(i)) for i in indices], self.cfg.steps, self.cfg.guidance,
                                      [it.negative for it in items], [it.generator_findings for it in items],
                                      self.cfg.sample_batch_size, keep_trajectory=True)
        return draw

    def selection_update(self, final_latents: torch.Tensor | None, items: Sequence[Any], rewards: np.ndarray, epoch: int,
                         progress: bool = True, trajectory: tuple[torch.Tensor, torch.Tensor] | None = None,
                         step_norm: torch.Tensor | None = None) -> UpdateStats:
        """Reward-weighted denoising loss on the selected samples' final latents (gathered: every rank
        holds all of them and trains on its share of each step's batch; None with ``trajectory``, which replaces them).

        loss_i = w_i * || f(x_t, t, prompt_i) - target ||^2 with weights ``w = r / mean(r)`` over the
        selected (rewards shifted to be positive), at ``noise_draws`` random timesteps per sample, ``passes`` times
        over the selected samples (each pass with its own timesteps and noise). ``f`` is the conditional branch
        (``fit="conditional"``) or the guided prediction sampling uses (``fit="guided"``: ``u + g (c - u)`` at the
        rollouts' guidance ``g``, so what is fitted is not amplified g-fold again when the policy samples).

        ``trajectory`` (``selection.target="trajectory"``: the selected guided drafts' states and guided outputs,
        (N, T, C, h, w) each) replaces the noised final latent by a state the guided sampler passed through and the
        target by the output it took there: the guided prediction is fitted to reward guidance's own (guidance
        distillation), ``noise_draws`` of the T steps per sample per pass.

        ``step_norm`` (``selection.target="table"``: (T,), or (N, T) per sample when requests of several epochs are
        fitted together, the mean squared shift the table's steering gave x0_hat at each step) makes it the table's
        regression: the guided prediction's x0_hat is fitted to the steered draw's, each
        step's squared error divided by that step's ``step_norm`` so every step counts alike (1.0: the adapter gives
        nothing of the offsets); the steps drawn are those the table moves (``step_norm`` above a thousandth of its
        largest), each sample's in a fresh order per pass, so ``noise_draws`` of at least their count visits every one;
        and every selected request weighs alike (the target is the table's, for the request, not a draft's)."""
        cfg = self.selection
        started = time.perf_counter()
        stats = UpdateStats()
        n = len(items)
        if n == 0:
            return stats
        model = self.model
        shifted = rewards - rewards.min() + 1e-3 if rewards.min() <= 0 else rewards.copy()
        weights = torch.as_tensor(shifted / shifted.mean(), dtype=torch.float32)
        scheduler = model.scheduler
        moved = None
        if step_norm is not None:
            weights = torch.ones(n)
            step_norm = step_norm.float().expand(n, -1) if step_norm.dim() == 1 else step_norm.float()
            mean_norm = step_norm.mean(dim=0)
            moved = np.flatnonzero((mean_norm > 1e-3 * mean_norm.max()).numpy())
            if not len(moved):  # the table moves no step (no shift yet): nothing to fit
                log.warning("epoch %d: the offset table moves no step; the selection has nothing to fit", epoch)
                return stats
        model.unet.train()
        per_pass = math.ceil(n / cfg.batch_size)
        n_steps = per_pass * cfg.passes
        bar = tqdm(total=n_steps, desc=f"epoch {epoch}: selection", unit=" step", disable=not progress, leave=False)
        for step in range(n_steps):
            pass_index, s = divmod(step, per_pass)
            members = np.arange(s * cfg.batch_size, min(n, (s + 1) * cfg.batch_size))
            mine = members[self.rank::self.world]
            total_terms = len(members) * cfg.noise_draws
            loss_sum = 0.0
            if len(mine):
                batch_items = [items[i] for i in mine]
                fits_guided = cfg.fit == "guided" or trajectory is not None
                if fits_guided:  # the prediction sampling uses: both branches, combined at the rollouts' guidance
                    cond = self._conditioning(batch_items)
                else:
                    with torch.set_grad_enabled(self.trains_findings):
                        cond = model.conditioner([it.prompt for it in batch_items], [it.modality for it in batch_items],
                                                 [it.generator_findings for it in batch_items])
                for d in range(pass_index * cfg.noise_draws, (pass_index + 1) * cfg.noise_draws):  # each pass: fresh draws
                    rows = torch.as_tensor(mine)
                    if trajectory is not None:  # a step of the guided draft, drawn per sample (keyed by its global index)
                        states, outputs = trajectory
                        if moved is not None:  # the table's steps, each sample's in its own order per pass
                            k = d - pass_index * cfg.noise_draws
                            j = torch.as_tensor([int(np.random.default_rng([self.cfg.seed, epoch, int(i), pass_index, 23]).permutation(
                                moved)[k % len(moved)]) for i in mine])
                        else:
                            j = torch.as_tensor([int(np.random.default_rng([self.cfg.seed, epoch, int(i), d, 17]).integers(
                                states.shape[1])) for i in mine])
                        noisy = states[rows, j].to(model.device)
                        t = self.timesteps[j].to(model.device)
                        target = outputs[rows, j].to(model.device)
                    else:
                        x0 = final_latents[rows].to(model.device)
                        # timesteps and noise per sample, keyed by the global index so any split of ranks draws the same
                        t = torch.as_tensor([int(np.random.default_rng([self.cfg.seed, epoch, int(i), d, 17]).integers(
                            scheduler.config.num_train_timesteps)) for i in mine], device=x0.device)
                        noise = torch.stack([torch.randn(x0.shape[1:], generator=torch.Generator().manual_seed(
                            int(np.random.default_rng([self.cfg.seed, epoch, int(i), d, 19]).integers(2**31 - 1)))) for i in mine]).to(x0.device)
                        noisy = scheduler.add_noise(x0, noise, t)
                        target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
                    if fits_guided:
                        pred = guided_prediction(model, noisy, t, cond, self.cfg.guidance)
                    else:
                        pred = model.unet(noisy, t, encoder_hidden_states=cond.tokens, encoder_attention_mask=cond.mask,
                                          class_labels=cond.class_emb).sample
                    if moved is not None:  # x0_hat against the steered draw's, per step relative to the table's shift
                        kind, alpha = scheduler.config.prediction_type, scheduler.alphas_cumprod[t.cpu()].view(-1, 1, 1, 1).to(noisy.device)
                        pred = predicted_x0(pred.float(), noisy.float(), alpha, kind)
                        target = predicted_x0(target.float(), noisy.float(), alpha, kind)
                    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
                    if moved is not None:
                        per_sample = per_sample / step_norm[rows, j].to(per_sample.device)
                    loss = (weights[torch.as_tensor(mine)].to(per_sample.device) * per_sample).sum() * cfg.loss_weight
                    if not torch.isfinite(loss):
                        raise NonFiniteError(f"non-finite selection loss in epoch {epoch} on selected samples {list(map(int, mine))}")
                    (loss / total_terms).backward(retain_graph=self.trains_findings)  # the table's graph serves every draw
                    loss_sum += float(loss.detach())
            else:  # this rank has no share of the step: still takes part in the gradient sum
                for p in self.params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            norm = self._optimiser_step()
            record = {"kind": "step", "epoch": epoch, "step": self.global_step, "stage": "selection",
                      "loss": loss_sum / total_terms * self.world, "grad_norm": norm,
                      "lr": self.optimizer.param_groups[0]["lr"], "samples": len(members)}
            if self.world > 1:
                record["loss"] = float(self.accelerator.reduce(torch.tensor([loss_sum / total_terms]), reduction="sum")[0])
            stats.steps.append(record)
            bar.update(1)
        bar.close()
        model.unet.eval()
        stats.seconds = time.perf_counter() - started
        return stats


__all__ = ["DDPOTrainer", "NonFiniteError", "Rollout", "UpdateStats", "sample_seed"]
