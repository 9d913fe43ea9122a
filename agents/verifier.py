"""The verifier agent: checks each candidate image with tools and returns a structured verdict.

Tools: a finding classifier (by default the verifier role's own, ``agents.verifier.role``: trained apart
from the reward's, so that what reward guidance or a reward-trained adapter drew is judged by another
network; or the reward's; never the held-out evaluator, which the constructor refuses), the text-image
alignment model, image quality checks (blank, saturated, out-of-field, NaN) and a memorisation check
against the generator's training images. The verdict says per requested finding what was expected,
the observed calibrated probability and whether it passed; for a round
that fails, :func:`agents.refinement.suggest_actions` turns the verdict into the typed actions
(emphasis, negative prompt, guidance, reseed) that the graph's ``refine`` node applies.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from rlhf.config import EvalConfig
from rlhf.metrics import pixel_memorisation, quality_checks

from .config import VerifierConfig
from .reader import project

log = logging.getLogger(__name__)


class Verifier:
    """``verify(images, prompt, modality, findings) -> round verdict`` (see :meth:`verify`)."""

    def __init__(
        self,
        finding_scorer,  # rlhf.classifiers.FindingScorer with role "verifier" or "reward"
        alignment=None,  # rlhf.alignment.AlignmentModel, or None
        config: VerifierConfig | None = None,
        quality: EvalConfig | None = None,
        training_images: Mapping[str, torch.Tensor] | None = None,  # modality -> (N, 3, H, W) in [-1, 1]
        training_note: str = "",
        lineage: Callable[[str], set[str]] | None = None,  # a finding and its is-a ancestors (agents.reader.lexicon_lineage)
        reward_scorer=None,  # the reward-role scorer that guides the graph's draws (reward guidance); default: finding_scorer if it is one
    ):
        role = getattr(finding_scorer, "role", None)
        if role not in ("verifier", "reward"):
            raise ValueError(f"the verifier judges with the verifier-role (or reward-role) finding classifiers; got role {role!r}. "
                             "The held-out evaluator must never judge what the graph keeps.")
        if reward_scorer is not None and getattr(reward_scorer, "role", None) != "reward":
            raise ValueError(f"reward_scorer must hold the reward-role classifiers, got role {getattr(reward_scorer, 'role', None)!r}")
        self.findings = finding_scorer
        self.reward = reward_scorer if reward_scorer is not None else finding_scorer if role == "reward" else None
        self.alignment = alignment
        self.config = config or VerifierConfig()
        self.quality = quality or EvalConfig()
        self.training_images = dict(training_images or {})
        self.training_note = training_note
        self.lineage = lineage or (lambda name: {name})

    @property
    def role(self) -> str:
        """The role of the classifiers it judges with: ``verifier`` or ``reward``."""
        return self.findings.role

    @property
    def independent_of_reward(self) -> bool:
        """Whether its finding classifiers are another network than the reward's (that guides and trains)."""
        return self.role != "reward"

    def labels(self, modality: str) -> list[str]:
        classifier = self.findings.classifiers.get(modality)
        return list(classifier.label_names) if classifier is not None else []

    def expected(self, findings: Sequence[Mapping[str, Any]], modality: str, normal: bool = False,
                 labels: Sequence[str] | None = None) -> dict[str, bool]:
        """label -> present / absent: what ``findings`` (and a whole-study ``normal``) ask of ``modality``'s classifier, or
        of ``labels`` (another classifier's: the reward's, which guides) (:func:`agents.reader.project`, the one reading
        every judge and reward guidance share)."""
        return project(findings, self.labels(modality) if labels is None else labels, self.lineage, normal=normal)

    def verify(self, images: torch.Tensor, prompt: str, modality: str, findings: Sequence[Mapping[str, Any]],
               paths: Sequence[str] | None = None, seeds: Sequence[int] | None = None, normal: bool = False) -> dict:
        """Verdict on candidates ``images`` ((B, 3, H, W) in [-1, 1]) drawn for ``prompt``.

        ``findings`` are the pathology stage's records (name, present, ...), ``normal`` its whole-study normal; what they
        ask of the classifier's labels is :func:`agents.reader.project`'s reading, the one every reader of findings
        gives. Returns ``{"passed", "best", "candidates": [per-candidate verdict], "tools": {...}}``."""
        cfg = self.config
        n = images.shape[0]
        label_order = self.labels(modality)
        labels = set(label_order)
        expected = self.expected(findings, modality, normal)
        # named findings no label stands for (not even as a kind of it): listed as not checked
        unchecked = [f for f in findings if not f.get("uncertain") and not project([f], label_order, self.lineage)]
        probs: dict[str, np.ndarray] = {}
        points = self.findings.operating_points(modality)
        if modality in self.findings.classifiers:
            _, details = self.findings.score(images, [prompt] * n, [modality] * n, expected=[expected] * n)
            probs = {name: np.asarray(details[f"prob/{name}"]) for name in labels}
        cosine = self.alignment.cosine(images, [prompt] * n) if self.alignment is not None and cfg.use_alignment else None
        quality = quality_checks(images, [modality] * n, self.quality)
        memo = None
        reference = self.training_images.get(modality)
        if cfg.use_memorisation and reference is not None and len(reference):
            memo = pixel_memorisation(images, reference, cfg.memorisation_threshold, cfg.memorisation_size)

        candidates = []
        for i in range(n):
            rows, failures, agreement = [], [], []
            for f in unchecked:
                name, present = f["name"], bool(f.get("present", True))
                rows.append({"name": name, "expected": "present" if present else "absent", "probability": None,
                             "pass": None, "checked": False,
                             "why": f"the {modality} {self.role} classifier has no label {name!r}; not checked"})
            for name, present in expected.items():
                if name not in probs:
                    continue
                p = float(probs[name][i])
                threshold = cfg.present_threshold if present else cfg.absent_threshold
                threshold = points.get(name, 0.5) if threshold is None else threshold
                ok = p >= threshold if present else p < threshold
                agreement.append(p if present else 1.0 - p)
                rows.append({"name": name, "expected": "present" if present else "absent", "probability": round(p, 4),
                             "threshold": round(threshold, 4), "pass": bool(ok), "checked": True})
                if not ok:
                    failures.append(f"{name}: expected {'present' if present else 'absent'}, observed p={p:.2f}")
            # labels the request does not mention: reported, never failed (the request leaves them open)
            others = {name: round(float(probs[name][i]), 4) for name in sorted(labels - set(expected)) if name in probs}
            q = quality[i]
            if not q["ok"]:
                failures += q["reasons"]
            align = None
            if cosine is not None:
                c = float(cosine[i])
                ok = cfg.min_alignment is None or c >= cfg.min_alignment
                align = {"cosine": round(c, 4), "min": cfg.min_alignment, "pass": bool(ok)}
                if not ok:
                    failures.append(f"alignment: CLIP cosine {c:.3f} < {cfg.min_alignment}")
            if memo is not None:
                s = float(memo["max_ssim"][i])
                memorised = bool(memo["memorised"][i])
                mem = {"checked": True, "nearest_ssim": round(s, 4), "threshold": cfg.memorisation_threshold,
                       "nearest_index": int(memo["nearest_index"][i]), "pass": not memorised}
                if memorised:
                    failures.append(f"memorisation: SSIM {s:.3f} to training image #{mem['nearest_index']} >= {cfg.memorisation_threshold}")
            else:
                why = (f"no {modality} training images to compare with ({self.training_note})" if self.training_images
                       else self.training_note or "no training images to compare with")
                mem = {"checked": False, "pass": True, "why": why}
            score = (float(np.mean(agreement)) if agreement else 0.5) + cfg.alignment_weight * (align["cosine"] if align else 0.0)
            score -= 1.0 * (not q["ok"]) + 1.0 * (not mem["pass"])
            candidates.append({
                "candidate": i,
                "path": paths[i] if paths is not None else None,
                "seed": int(seeds[i]) if seeds is not None else None,
                "passed": not failures,
                "score": round(score, 4),
                "findings": rows,
                "other_findings": others,
                "alignment": align,
                "quality": {k: q[k] for k in ("ok", "nan", "blank", "saturated", "out_of_field", "reasons")}
                | {k: (round(q[k], 4) if np.isfinite(q[k]) else None) for k in ("std", "saturated_share", "corner_brightness")},
                "memorisation": mem,
                "failures": failures,
            })
        passing = [c for c in candidates if c["passed"]]
        pool = passing or candidates
        best = max(pool, key=lambda c: c["score"])["candidate"]
        return {"passed": bool(passing), "best": best, "candidates": candidates,
                "tools": {"finding_classifier": self.role, "alignment": cosine is not None, "memorisation": memo is not None,
                          "quality": True}}


__all__ = ["Verifier"]
