"""The loop's reward: a weighted composite of judges, every component kept per sample.

Components (``improve.reward.weights``):

- ``findings``: the verifier's per-finding agreement from the **reward-role** classifier against the
  prompt's structured expectation (``mean(p_f if f is present else 1 - p_f)``), never a re-parse of
  the text; details ``prob/<finding>``, ``verifier_pass`` (every expected finding on the right side of
  its operating point, read by the verifier's classifiers: ``agents.verifier.role``, by default the
  ``verifier`` role, trained apart from the reward's, so that stage 2 does not keep what only the
  network being optimised against sees) and, with such a verifier, ``verifier_agreement`` (its agreement:
  a reward that rises while it does not is the reward being fooled);
- ``alignment``: CLIP cosine between the image and its prompt (the shipped alignment model);
- ``selector``: the selector's learned quality in [0, 1], with ``above_threshold``;
- ``quality``: 1 when no quality check fails (blank, saturated, out of field, NaN), else 0.

The held-out evaluator can never enter: asking for it is an error, and the finding component refuses
classifiers of any role but ``reward`` (:class:`rlhf.classifiers.FindingScorer`).

Items are anything with ``.prompt``, ``.modality`` and ``.expected`` (``{finding: present}``), such as
:class:`agents.requests.ImagePrompt`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from generator.errors import UserError

from .config import FORBIDDEN_IN_REWARD, REWARD_COMPONENTS, EvalConfig, JudgesConfig, RewardConfig
from .metrics import quality_checks
from .scorers import ScoreResult, as_image_batch, build_scorer, check_inputs, register_scorer


class QualityScorer:
    """1 where no quality check fails, else 0; details name each flag."""

    name = "quality"

    def __init__(self, config: EvalConfig | None = None):
        self.config = config or EvalConfig()

    def score(self, images: Any, prompts: Sequence[str], modalities: Sequence[str]) -> ScoreResult:
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities)
        checks = quality_checks(batch, list(modalities), self.config)
        details = {flag: np.array([float(c[flag]) for c in checks]) for flag in ("nan", "blank", "saturated", "out_of_field")}
        return np.array([float(c["ok"]) for c in checks]), details


@register_scorer("quality")
def quality_scorer(config: EvalConfig | None = None) -> QualityScorer:
    return QualityScorer(config)


@dataclass
class RewardResult:
    total: np.ndarray  # (B,) the weighted sum
    components: dict[str, np.ndarray]  # each component (B,) by name, and "<component>/<detail>" (B,)

    def component_names(self) -> list[str]:
        return [k for k in self.components if "/" not in k]


def check_weights(weights: Mapping[str, float]) -> None:
    """One clear error for a reward that names the evaluator or an unknown component."""
    forbidden = [k for k in weights if k in FORBIDDEN_IN_REWARD or "evaluator" in k]
    if forbidden:
        raise UserError(f"improve.reward.weights.{forbidden[0]}: the held-out evaluator can never enter a reward "
                        f"(it judges the result); reward components: {', '.join(REWARD_COMPONENTS)}")
    unknown = [k for k in weights if k not in REWARD_COMPONENTS]
    if unknown:
        raise UserError(f"improve.reward.weights.{unknown[0]}: unknown reward component {unknown[0]!r}; "
                        f"known: {', '.join(REWARD_COMPONENTS)}")
    if not weights or not any(w != 0 for w in weights.values()):
        raise UserError(f"improve.reward.weights: give at least one non-zero weight among {', '.join(REWARD_COMPONENTS)}")
    bad = {k: w for k, w in weights.items() if not np.isfinite(w)}
    if bad:
        raise UserError(f"improve.reward.weights: weights must be finite numbers, got {bad}")


class Reward:
    """``reward(images, items) -> RewardResult``; components with weight 0 are still measured and logged."""

    def __init__(self, weights: Mapping[str, float], scorers: Mapping[str, Any], findings_form: str = "prob",
                 findings_floor: float = 1e-6, verifier: Any = None):
        check_weights(weights)
        if findings_form not in ("prob", "log"):
            raise ValueError(f"findings_form must be 'prob' or 'log', got {findings_form!r}")
        if not 0 < findings_floor < 0.5:
            raise ValueError(f"findings_floor must be in (0, 0.5), got {findings_floor}")
        self.findings_form = findings_form
        self.findings_floor = float(findings_floor)
        missing = [k for k in weights if k not in scorers]
        if missing:
            raise ValueError(f"no scorer given for reward component(s) {', '.join(missing)}")
        finding = scorers.get("findings")
        if finding is not None and getattr(finding, "role", None) != "reward":
            raise ValueError(f"the findings component must use the reward-role classifiers, got role {getattr(finding, 'role', None)!r}; "
                             "the held-out evaluator can never enter a reward")
        if verifier is not None and getattr(verifier, "role", None) not in ("verifier", "reward"):
            raise ValueError(f"the verifier pass reads the verifier-role (or reward-role) classifiers, got role "
                             f"{getattr(verifier, 'role', None)!r}; the held-out evaluator never decides what stage 2 keeps")
        self.weights = dict(weights)
        self.scorers = dict(scorers)
        self.verifier = verifier  # None: the verifier pass reads the findings scorer (the reward's classifiers)

    @property
    def finding_scorer(self):
        return self.scorers.get("findings")

    def __call__(self, images: torch.Tensor, items: Sequence[Any], progress: bool = False) -> RewardResult:
        batch = as_image_batch(images)
        prompts = [it.prompt for it in items]
        modalities = [it.modality for it in items]
        check_inputs(batch, prompts, modalities)
        n = batch.shape[0]
        total = np.zeros(n, dtype=np.float64)
        components: dict[str, np.ndarray] = {}
        from tqdm import tqdm

        for name, scorer in tqdm(self.scorers.items(), desc="reward", unit=" judge", disable=not progress, leave=False):
            if name == "findings":
                expected = [dict(it.expected) for it in items]
                scores, details = scorer.score(batch, prompts, modalities, expected=expected)
                if self.findings_form == "log":  # the probability agreement stays in the log as findings/agreement
                    scores = log_agreement(details, expected, self.findings_floor)
                else:
                    details = {k: v for k, v in details.items() if k != "agreement"}
                judge, read = scorer, details
                if self.verifier is not None:
                    judge = self.verifier
                    _, read = judge.score(batch, prompts, modalities, expected=expected)
                    details["verifier_agreement"] = read["agreement"]
                details["verifier_pass"] = verifier_pass(read, expected, modalities,
                                                         {m: judge.operating_points(m) for m in set(modalities)})
            else:
                scores, details = scorer.score(batch, prompts, modalities)
            components[name] = np.asarray(scores, dtype=np.float64)
            for key, value in details.items():
                components[f"{name}/{key}"] = np.asarray(value, dtype=np.float64)
            total += self.weights.get(name, 0.0) * components[name]
        return RewardResult(total, components)


def log_agreement(details: Mapping[str, np.ndarray], expected: Sequence[Mapping[str, bool]], floor: float = 1e-6) -> np.ndarray:
    """Per image, the mean over its expected findings (those the classifier knows) of ``log p`` (present) or
    ``log(1 - p)`` (absent), ``p`` clipped to ``[floor, 1 - floor]``; 0 where no expected finding is known
    (neither rewarded nor punished, as the probability form's neutral 0.5 is after group normalisation)."""
    out = np.zeros(len(expected))
    for i, stated in enumerate(expected):
        terms = []
        for name, present in stated.items():
            probs = details.get(f"prob/{name}")
            if probs is None or not np.isfinite(probs[i]):
                continue
            p = min(max(float(probs[i]), floor), 1.0 - floor)
            terms.append(math.log(p) if present else math.log1p(-p))
        if terms:
            out[i] = float(np.mean(terms))
    return out


def verifier_pass(details: Mapping[str, np.ndarray], expected: Sequence[Mapping[str, bool]], modalities: Sequence[str],
                  thresholds: Mapping[str, Mapping[str, float]] | None = None) -> np.ndarray:
    """1 where every expected finding the classifier knows is on the right side of its operating point
    (``thresholds[modality][finding]``, the judging classifier's own; 0.5 where none is given)."""
    out = np.ones(len(expected))
    for i, stated in enumerate(expected):
        points = (thresholds or {}).get(modalities[i], {})
        for name, present in stated.items():
            probs = details.get(f"prob/{name}")
            if probs is None or not np.isfinite(probs[i]):
                continue
            if (probs[i] >= points.get(name, 0.5)) != bool(present):
                out[i] = 0.0
                break
    return out


def build_reward(cfg: RewardConfig, judges: JudgesConfig, modalities: Sequence[str], device: str = "cpu",
                 verifier_role: str = "reward") -> Reward:
    """The reward of ``cfg.weights`` from the shipped (or configured) judges. Every named component is loaded;
    ``findings`` is always loaded too (stage 2's verifier pass needs it) and logged even at weight 0. The verifier
    pass reads the ``verifier_role`` classifiers (``agents.verifier.role``; ``reward``: the findings component's own)."""
    check_weights(cfg.weights)
    wanted = dict(cfg.weights)
    wanted.setdefault("findings", 0.0)
    scorers: dict[str, Any] = {}
    alignment = None
    for name in wanted:
        if name == "findings":
            scorers[name] = build_scorer("finding_reward", root=judges.classifier.out, modalities=list(modalities), device=device)
        elif name in ("alignment", "selector"):
            if alignment is None:
                from .alignment import load_alignment

                alignment = load_alignment(judges.alignment if judges.alignment.model else judges.alignment.out, device=device)
            if name == "alignment":
                scorers[name] = build_scorer("alignment", model=alignment)
            else:
                scorers[name] = build_scorer("selector", folder=judges.selector.out, alignment=alignment, device=device)
        elif name == "quality":
            scorers[name] = build_scorer("quality", config=judges.eval)
    verifier = None
    if verifier_role != "reward":
        verifier = build_scorer(f"finding_{verifier_role}", root=judges.classifier.out, modalities=list(modalities), device=device)
    return Reward(wanted, scorers, findings_form=cfg.findings_form, findings_floor=cfg.findings_floor, verifier=verifier)


__all__ = ["QualityScorer", "Reward", "RewardResult", "build_reward", "check_weights", "log_agreement", "quality_scorer", "verifier_pass"]
