"""The graph's nodes: each reads the state and returns a partial update.

:class:`Nodes` holds the parts the factory was given (reasoner, generator, verifier) and one
method per node. Routers are pure functions of the state at the bottom of this file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from generator.config import ModalityConfig
from generator.errors import UserError

from .config import AgentsConfig
from .drawing import read_images
from .prompts import compose_prompt
from .refinement import Emphasis, RefineState, apply_actions, suggest_actions
from .schema import ParsedRequest, PathologyResult, StageError

log = logging.getLogger(__name__)

REASONING_STAGES = ("parse_request", "localize_anatomy", "assess_pathology", "map_visual_features")


def settings_from(cfg: AgentsConfig, trace_id: str, sample_steps: int, sample_guidance: float, base_negative: str = "",
                  **overrides: Any) -> dict:
    """The per-request settings stored in the state (and so in the trace)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    n = int(given.pop("n", 1))
    settings = {
        "trace_id": trace_id,
        "n": n,
        "candidates": max(n, cfg.candidates),
        "max_rounds": cfg.max_rounds,
        "seed": cfg.seed,
        "steps": cfg.steps or sample_steps,
        "guidance": cfg.guidance if cfg.guidance is not None else sample_guidance,
        "out": str(Path(cfg.out) / trace_id),
        "contradiction": cfg.contradiction,
        "non_drawable": cfg.non_drawable,
        "default_severity": cfg.default_severity,
        "base_negative": base_negative,
        "reward_guidance": cfg.reward_guidance,
        "reward_guidance_views": cfg.reward_guidance_views,
        "stop_after": None,  # "compose_prompt": reason and compose only, draw nothing
    }
    unknown = set(given) - set(settings)
    if unknown:
        raise ValueError(f"unknown setting(s) {sorted(unknown)}; known: {sorted(settings)}")
    settings.update(given)
    if settings["max_rounds"] < 1:
        raise UserError(f"max_rounds must be at least 1, got {settings['max_rounds']}")
    return settings


def _dump(record) -> dict:
    return record.model_dump(mode="json")


@dataclass
class Step:
    """What a node hands the graph: the state update, and for the trace a one-line summary, the backend that
    decided a reasoning stage (from its record) and the seconds spent drawing."""

    update: dict
    summary: str | None = None
    backend: str | None = None
    generate_seconds: float | None = None


class Nodes:
    def __init__(self, reasoner, generator, verifier, config: AgentsConfig | None = None,
                 modalities: Mapping[str, ModalityConfig] | None = None, wording: dict | None = None):
        self.reasoner, self.generator, self.verifier = reasoner, generator, verifier
        self.config = config or AgentsConfig()
        self.modalities = dict(modalities or {})  # the configured modalities; one absent here is composed as built in
        self.wording = wording  # the generator's caption words (its wording.json), or None: the phantom templates

    # -- reasoning -------------------------------------------------------------------------
    def parse_request(self, state: Mapping) -> Step:
        request = self.reasoner.parse_request(state.get("text") or "", state.get("modality") or "")
        if self.generator is not None and request.modality not in self.generator.modalities:
            raise StageError(f"modality {request.modality!r} is known, but the generator was not trained on it "
                             f"(it knows {', '.join(self.generator.modalities)}); use one of those or a model trained on it")
        summary = f"{request.modality}: {len(request.statements)} statement(s)" + (", truncated" if request.truncated else "")
        return Step({"request": _dump(request), "warnings": list(request.warnings)}, summary, request.backend)

    def localize_anatomy(self, state: Mapping) -> Step:
        anatomy = self.reasoner.localize_anatomy(ParsedRequest(**state["request"]))
        summary = ", ".join(m.concept_id for m in anatomy.mentions) or "no anatomy named"
        return Step({"anatomy": _dump(anatomy), "retrievals": [_dump(r) for r in anatomy.retrievals]}, summary, anatomy.backend)

    def assess_pathology(self, state: Mapping) -> Step:
        from .schema import AnatomyResult

        result = self.reasoner.assess_pathology(ParsedRequest(**state["request"]), AnatomyResult(**state["anatomy"]))
        settings = state["settings"]
        warnings = list(result.warnings)
        result = apply_contradiction_policy(result, settings["contradiction"], warnings)
        undrawable = [f.name for f in result.findings if f.present and not f.drawable]
        if undrawable and settings["non_drawable"] == "refuse":
            raise StageError(f"the generator was not trained on {', '.join(undrawable)} ({state['request']['modality']}); "
                             "remove it from the request or set agents.non_drawable=warn to draw the rest")
        summary = "; ".join(_finding_words(f) for f in result.findings) or ("normal study" if result.normal else "no findings")
        return Step({"pathology": _dump(result), "retrievals": [_dump(r) for r in result.retrievals],
                     "warnings": [w for w in warnings if w not in result.warnings] + list(result.warnings)}, summary, result.backend)

    def map_visual_features(self, state: Mapping) -> Step:
        visual = self.reasoner.map_visual_features(ParsedRequest(**state["request"]), PathologyResult(**state["pathology"]))
        summary = f"{len(visual.descriptors)} appearance(s), {len(visual.cases)} similar case(s)"
        return Step({"visual": _dump(visual), "retrievals": [_dump(r) for r in visual.retrievals]}, summary, visual.backend)

    # -- prompt, drawing, verification ------------------------------------------------------
    def compose_prompt(self, state: Mapping) -> Step:
        settings = state["settings"]
        modality = state["request"]["modality"]
        composition = compose_prompt(state["request"], state["pathology"], modality, Emphasis(), settings["default_severity"],
                                     settings["base_negative"], self.modalities.get(modality), self.wording)
        composition["visual"] = [d["description"] for d in (state.get("visual") or {}).get("descriptors", []) if d.get("description")]
        warnings = []
        cut = self.generator.unread_tail(composition["prompt"]) if self.generator is not None else None
        if cut:
            tokens, limit, tail = cut
            warnings.append(f"prompt truncated by the generator: it is {tokens} tokens and the model reads {limit} "
                            f"(model.text_max_length), so it never sees \"{tail}\"; shorten the request or use a model "
                            "trained with a longer limit")
        return Step({"composition": composition, "round": 0, "guidance": float(settings["guidance"]), "status": "running",
                     "warnings": warnings}, composition["prompt"])

    def generate(self, state: Mapping) -> Step:
        settings, composition = state["settings"], state["composition"]
        r = int(state.get("round", 0))
        k = int(settings["candidates"])
        seeds = [int(settings["seed"]) + r * k + j for j in range(k)]
        modality = state["request"]["modality"]
        scale = float(settings.get("reward_guidance") or 0.0)  # traces from before the setting have none
        guide = expected = None
        warnings = []
        if scale > 0:
            from rlhf.guidance import RewardGuide

            if self.verifier.reward is None:
                raise StageError("reward guidance needs the reward-role finding classifiers, and this graph's verifier was "
                                 "built without them; build it with Verifier(..., reward_scorer=...) or draw without reward guidance")
            guide = RewardGuide(self.verifier.reward, scale, int(settings.get("reward_guidance_views") or 4))
            expected = self.verifier.expected(composition["findings"], modality, bool(state["pathology"].get("normal")),
                                              labels=guide.labels(modality))
            if r == 0:
                towards = ("the reward's finding classifier; the verifier judges them with its own, trained apart from it, "
                           "which a guided image may still partly fool" if self.verifier.independent_of_reward else
                           "the verifier's own finding classifier (agents.verifier.role: reward), so its verdict is not "
                           "independent evidence")
                warnings.append(f"reward guidance (scale {scale:g}): the candidates were drawn towards {towards}; the held-out "
                                "evaluator judges them in `synthmed bench graph --compare` and in `synthmed synthesize`'s checks")
        paths, _, seconds = self.generator.draw(composition["prompt"], modality, seeds, Path(settings["out"]) / f"round{r}",
                                                negative=composition["negative"], guidance=state["guidance"], steps=settings["steps"],
                                                findings=composition["findings"], reward_guide=guide, expected=expected)
        drawn = [{"round": r, "path": p, "seed": s, "prompt": composition["prompt"], "negative": composition["negative"],
                  "guidance": state["guidance"], "steps": settings["steps"], **({"reward_guidance": scale} if guide else {})}
                 for p, s in zip(paths, seeds)]
        summary = f"round {r}: {k} candidate(s) in {seconds:.1f} s" + (f", reward-guided (scale {scale:g})" if guide else "")
        return Step({"candidates": drawn, "round": r + 1, **({"warnings": warnings} if warnings else {})}, summary,
                    generate_seconds=seconds)

    def verify(self, state: Mapping) -> Step:
        r = int(state["round"]) - 1
        drawn = [c for c in state["candidates"] if c["round"] == r]
        images = read_images([c["path"] for c in drawn])
        composition = state["composition"]
        verdict = self.verifier.verify(images, composition["prompt"], state["request"]["modality"], composition["findings"],
                                       paths=[c["path"] for c in drawn], seeds=[c["seed"] for c in drawn],
                                       normal=bool(state["pathology"].get("normal")))
        verdict["round"] = r
        for c in verdict["candidates"]:
            c["round"] = r
        best = verdict["candidates"][verdict["best"]]
        summary = f"round {r}: {'pass' if verdict['passed'] else 'fail'}; best {Path(best['path']).name} score {best['score']}"
        if not verdict["passed"]:
            summary += " (" + "; ".join(best["failures"][:3]) + ")"
        return Step({"verdicts": [verdict]}, summary)

    def refine(self, state: Mapping) -> Step:
        settings, composition = state["settings"], state["composition"]
        actions = suggest_actions(state["verdicts"][-1], float(state["guidance"]), self.config.refine)
        refine = RefineState(Emphasis.from_dict(composition.get("emphasis")), float(state["guidance"]), composition["findings"],
                             {f["name"]: f.get("severity") for f in state["pathology"]["findings"]}, self.config.refine.escalate_severity)
        applied = apply_actions(actions, refine)
        modality = state["request"]["modality"]
        new = compose_prompt(state["request"], state["pathology"], modality, refine.emphasis, settings["default_severity"],
                             settings["base_negative"], self.modalities.get(modality), self.wording)
        new["visual"] = composition.get("visual", [])
        return Step({"composition": new, "guidance": refine.guidance, "refinements": [{"round": int(state["round"]), "actions": applied}]},
                    "; ".join(a["applied"] for a in applied))

    def finish(self, state: Mapping) -> Step:
        settings = state.get("settings") or {}
        if state.get("status") == "refused":
            return Step({"result": {"status": "refused", "error": state.get("error"), "images": []}}, f"refused: {state.get('error')}")
        if settings.get("stop_after") == "compose_prompt" or not state.get("verdicts"):
            return Step({"status": "composed", "result": result_record(state, [], None, "composed")}, "composed (nothing drawn)")
        verdicts = state["verdicts"]
        ranked = sorted((c for v in verdicts for c in v["candidates"]),
                        key=lambda c: (c["passed"], c["score"]), reverse=True)
        chosen = ranked[: int(settings.get("n", 1))]
        passed = bool(chosen) and all(c["passed"] for c in chosen)
        status = "passed" if passed else "failed"
        return Step({"status": status, "result": result_record(state, chosen, verdicts[-1], status)},
                    f"{status} after {len(verdicts)} round(s); kept {', '.join(Path(c['path']).name for c in chosen)}")


def result_record(state: Mapping, chosen: list[dict], last_verdict: dict | None, status: str) -> dict:
    composition = state.get("composition") or {}
    pathology = state.get("pathology") or {}
    findings = []
    for f in pathology.get("findings", []):
        entry = {"name": f["name"], "present": f["present"], "term": f.get("term")}
        for key in ("laterality", "severity", "location"):
            if f.get(key):
                entry[key] = f[key]
        if f.get("uncertain"):
            entry["uncertain"] = True
        entry["drawable"] = f.get("drawable", True)
        if f.get("codes"):
            entry["codes"] = f["codes"]
        findings.append(entry)
    return {
        "status": status,
        "images": [c["path"] for c in chosen],
        "verdict": {"passed": status == "passed", "rounds": len(state.get("verdicts") or []),
                    "candidates": chosen, "last_round": last_verdict["round"] if last_verdict else None},
        "report": composition.get("report"),
        "prompt": composition.get("prompt"),
        "negative": composition.get("negative"),
        "assumed": composition.get("assumed", []),
        "findings": findings,
        "normal": pathology.get("normal", False),
        "modality": (state.get("request") or {}).get("modality"),
    }


def apply_contradiction_policy(result: PathologyResult, policy: str, warnings: list[str]) -> PathologyResult:
    """Refuse a contradictory request, or resolve it in favour of the stated findings."""
    if not result.contradictions:
        return result
    messages = "; ".join(c.message for c in result.contradictions)
    if policy == "refuse":
        raise StageError(f"contradictory request: {messages}. Remove one of the statements, or set "
                         "agents.contradiction=prefer_findings to keep the findings")
    findings = list(result.findings)
    for c in result.contradictions:
        if c.kind == "present_and_absent":
            findings = [f for f in findings if not (f.name in c.findings and not f.present)]
    warnings.append(f"contradiction resolved in favour of the findings: {messages}")
    return result.model_copy(update={"findings": findings, "normal": False})


def _finding_words(f) -> str:
    words = [w for w in (f.severity, f.laterality, f.location.replace("_", " ") if f.location else None) if w]
    return ("no " if not f.present else "possible " if f.uncertain else "") + " ".join([*words, f.name])


# -- routers: pure functions of the state ----------------------------------------------------
def after_stage(state: Mapping) -> Literal["continue", "finish"]:
    return "finish" if state.get("status") == "refused" else "continue"


def after_compose(state: Mapping) -> Literal["generate", "finish"]:
    if state.get("status") == "refused" or (state.get("settings") or {}).get("stop_after") == "compose_prompt":
        return "finish"
    return "generate"


def after_verify(state: Mapping) -> Literal["refine", "finish"]:
    """Pass: finish. Fail with rounds left: refine. Fail on the last round: finish with the failing verdict."""
    if state["verdicts"][-1]["passed"]:
        return "finish"
    return "refine" if int(state["round"]) < int(state["settings"]["max_rounds"]) else "finish"


__all__ = ["Nodes", "REASONING_STAGES", "after_compose", "after_stage", "after_verify", "apply_contradiction_policy",
           "result_record", "settings_from"]
