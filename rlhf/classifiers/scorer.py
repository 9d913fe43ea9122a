"""The finding scorer: agreement between what a prompt asks for and what the classifiers of one role see."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from generator.errors import UserError

from ..scorers import ScoreResult, as_image_batch, check_inputs, register_scorer
from .layout import DEFAULT_ROOT, NEUTRAL_AGREEMENT, ROLES
from .model import ClassifierNotFoundError, FindingClassifier, load_classifier, train_command


class FindingScorer:
    """Agreement between the findings a prompt asks for and what the ``role`` classifiers see.

    For image ``i`` with stated findings ``S_i`` (``expected[i]``, the request's structured expectation, or
    read from the prompt by ``reader``: the graph's one reader of findings, :class:`agents.reader.FindingReader`)
    and calibrated probabilities ``p``::

        agreement_i = mean over f in S_i of ( p_f if f is stated present else 1 - p_f )

    Findings the prompt does not state, and stated findings the classifier does not know, do not
    count. An image with none counts ``NEUTRAL_AGREEMENT`` (0.5) and ``n_expected`` 0, so it
    neither rewards nor punishes. Details: ``agreement``, ``n_expected`` and ``prob/<finding>``
    for every label of every loaded modality (NaN where the finding is not the image's modality's).
    """

    def __init__(self, classifiers: Mapping[str, FindingClassifier], role: str, name: str | None = None,
                 reader: Callable[[str, str, Sequence[str]], Mapping[str, bool]] | None = None):
        if role not in ROLES:
            raise UserError(f"unknown classifier role {role!r}; choose one of {', '.join(ROLES)}")
        if not classifiers:
            raise UserError("a finding scorer needs at least one classifier")
        for modality, classifier in classifiers.items():
            if classifier.role != role:
                raise UserError(
                    f"the {modality} classifier has role {classifier.role!r}, but this scorer is the {role!r} scorer; "
                    "the reward must never be built from evaluator weights"
                )
            if classifier.modality != modality:
                raise ValueError(f"classifier of modality {classifier.modality!r} given for modality {modality!r}")
        self.classifiers = dict(classifiers)
        self.role = role
        self.name = name or f"finding_{role}"
        self.label_names = list(dict.fromkeys(n for c in self.classifiers.values() for n in c.label_names))
        self.reader = reader

    def operating_points(self, modality: str) -> dict[str, float]:
        """label -> the calibrated probability from which the ``modality`` classifier counts it as shown."""
        classifier = self.classifiers.get(modality)
        return {} if classifier is None else dict(zip(classifier.label_names, map(float, classifier.thresholds)))

    def expected_for(self, prompt: str, modality: str) -> dict[str, bool]:
        """What the prompt states about each of the modality's labels, read by the scorer's ``reader``."""
        if self.reader is None:
            raise UserError(
                "this finding scorer was given prompts without their expected findings and has no reader: pass "
                "expected=[{finding: present}, ...] (the request's structured expectation), or build the scorer with "
                "reader=agents.reader.FindingReader(...) (the graph's reader of findings)")
        return dict(self.reader(prompt, modality, self.classifiers[modality].label_names))

    def score(
        self,
        images: Any,
        prompts: Sequence[str],
        modalities: Sequence[str],
        expected: Sequence[Mapping[str, bool]] | None = None,
    ) -> ScoreResult:
        batch = as_image_batch(images)
        check_inputs(batch, prompts, modalities)
        n = batch.shape[0]
        if expected is not None and len(expected) != n:
            raise ValueError(f"{n} images but {len(expected)} expected-finding dicts; give one per image (or None to read the prompts)")
        scores = np.full(n, NEUTRAL_AGREEMENT, dtype=np.float64)
        n_expected = np.zeros(n, dtype=np.float64)
        probs = {name: np.full(n, np.nan, dtype=np.float64) for name in self.label_names}
        for modality in dict.fromkeys(modalities):
            if modality not in self.classifiers:
                known = ", ".join(self.classifiers)
                raise UserError(f"no {self.role} finding classifier for modality {modality!r}; loaded: {known}")
            classifier = self.classifiers[modality]
            index = np.array([i for i, m in enumerate(modalities) if m == modality])
            p = classifier.predict_proba(batch[torch.from_numpy(index)]).astype(np.float64)
            column = {name: j for j, name in enumerate(classifier.label_names)}
            for name, j in column.items():
                probs[name][index] = p[:, j]
            for row, i in enumerate(index):
                stated = expected[i] if expected is not None else self.expected_for(prompts[i], modality)
                terms = [p[row, column[f]] if bool(present) else 1.0 - p[row, column[f]] for f, present in stated.items() if f in column]
                if terms:
                    scores[i] = float(np.mean(terms))
                    n_expected[i] = len(terms)
        details = {"agreement": scores.copy(), "n_expected": n_expected, **{f"prob/{k}": v for k, v in probs.items()}}
        return scores, details


def load_finding_scorer(
    role: str, root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu",
    reader: Callable[[str, str, Sequence[str]], Mapping[str, bool]] | None = None,
) -> FindingScorer:
    """The ``role`` scorer over the classifiers in ``<root>/<role>/`` (every modality there, or ``modalities``);
    ``reader`` reads prompts given without their expected findings (see :class:`FindingScorer`)."""
    if role not in ROLES:
        raise UserError(f"unknown classifier role {role!r}; choose one of {', '.join(ROLES)}")
    from generator.paths import shipped

    folder = shipped(root) if root is not None else DEFAULT_ROOT
    # judges trained before the verifier role can do without it
    hint = "; or let the verifier judge with the reward's classifiers: --agents.verifier.role=reward" if role == "verifier" else ""
    if modalities is None:
        modalities = sorted(p.name for p in (folder / role).glob("*") if (p / "config.json").is_file())
        if not modalities:
            raise ClassifierNotFoundError(
                f"no {role} finding classifiers in {folder / role}; train them with: " + train_command(role, "all", folder) + hint)
    try:
        classifiers = {m: load_classifier(folder / role / m, role=role, device=device) for m in modalities}
    except ClassifierNotFoundError as exc:
        if not hint:
            raise
        raise ClassifierNotFoundError(f"{exc}{hint}") from None
    return FindingScorer(classifiers, role, reader=reader)


@register_scorer("finding_reward")
def finding_reward_scorer(root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu",
                          reader=None) -> FindingScorer:
    """The reward's finding scorer, from the shipped ``reward`` classifiers by default."""
    return load_finding_scorer("reward", root, modalities, device, reader)


@register_scorer("finding_verifier")
def finding_verifier_scorer(root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu",
                            reader=None) -> FindingScorer:
    """The verifier's finding scorer (trained apart from the reward's); never part of a reward."""
    return load_finding_scorer("verifier", root, modalities, device, reader)


@register_scorer("finding_evaluator")
def finding_evaluator_scorer(root: str | os.PathLike | None = None, modalities: Sequence[str] | None = None, device: str = "cpu",
                             reader=None) -> FindingScorer:
    """The held-out evaluator's finding scorer; never part of a reward."""
    return load_finding_scorer("evaluator", root, modalities, device, reader)
