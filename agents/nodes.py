"""The graph's nodes: each reads the state and returns a partial update.

:class:`Nodes` holds the parts the factory was given (reasoner, generator, verifier) and one
method per node. Routers are pure functions of the state at the bottom of this file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from generator.errors import UserError

from .config import AgentsConfig
from .drawing import read_images
from .prompts import SEVERITY_ORDER, Emphasis, compose_prompt
from .schema import ParsedRequest, PathologyResult, StageError
from .verifier import suggest_actions

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


class Nodes:
    def __init__(self, reasoner, generator, verifier, config: AgentsConfig | None = None):
        self.reasoner, self.generator, self.verifier = reasoner, generator, verifier
        self.config = config or AgentsConfig()

    # -- reasoning -------------------------------------------------------------------------
    def parse_request(self, state: Mapping) -> dict:
        request = self.reasoner.parse_request(state.get("text") or "", state.get("modality") or "")
        if self.generator is not None and request.modality not in self.generator.modalities:
            raise StageError(f"modality {request.modality!r} is known, but the generator was not trained on it "
                             f"(it knows {', '.join(self.generator.modalities)}); use one of those or a model trained on it")
        summary = f"{request.modality}: {len(request.statements)} statement(s)" + (", truncated" if request.truncated else "")
        return {"request": _dump(request), "warnings": list(request.warnings), "_summary": summary}

    def localize_anatomy(self, state: Mapping) -> dict:
        anatomy = self.reasoner.localize_anatomy(ParsedRequest(**state["request"]))
        summary = ", ".join(m.concept_id for m in anatomy.mentions) or "no anatomy named"
        return {"anatomy": _dump(anatomy), "retrievals": [_dump(r) for r in anatomy.retrievals], "_summary": summary}

    def assess_pathology(self, state: Mapping) -> dict:
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
        return {"pathology": _dump(result), "retrievals": [_dump(r) for r in result.retrievals],
                "warnings": [w for w in warnings if w not in result.warnings] + list(result.warnings), "_summary": summary}

    def map_visual_features(self, state: Mapping) -> dict:
        visual = self.reasoner.map_visual_features(ParsedRequest(**state["request"]), PathologyResult(**state["pathology"]))
        summary = f"{len(visual.descriptors)} appearance(s), {len(visual.cases)} similar case(s)"
        return {"visual": _dump(visual), "retrievals": [_dump(r) for r in visual.retrievals], "_summary": summary}

    # -- prompt, drawing, verification ------------------------------------------------------
    def compose_prompt(self, state: Mapping) -> dict:
        settings = state["settings"]
        composition = compose_prompt(state["request"], state["pathology"], state["request"]["modality"],
                                     Emphasis(), settings["default_severity"], settings["base_negative"])
        composition["visual"] = [d["description"] for d in (state.get("visual") or {}).get("descriptors", []) if d.get("description")]
        return {"composition": composition, "round": 0, "guidance": float(settings["guidance"]), "status": "running",
                "_summary": composition["prompt"]}

    def generate(self, state: Mapping) -> dict:
        settings, composition = state["settings"], state["composition"]
        r = int(state.get("round", 0))
        k = int(settings["candidates"])
        seeds = [int(settings["seed"]) + r * k + j for j in range(k)]
        modality = state["request"]["modality"]
        paths, _, seconds = self.generator.draw(composition["prompt"], modality, seeds, Path(settings["out"]) / f"round{r}",
                                                negative=composition["negative"], guidance=state["guidance"], steps=settings["steps"])
        drawn = [{"round": r, "path": p, "seed": s, "prompt": composition["prompt"], "negative": composition["negative"],
                  "guidance": state["guidance"], "steps": settings["steps"]} for p, s in zip(paths, seeds)]
        return {"candidates": drawn, "round": r + 1, "_summary": f"round {r}: {k} candidate(s) in {seconds:.1f} s", "_seconds_generate": seconds}

    def verify(self, state: Mapping) -> dict:
        r = int(state["round"]) - 1
        drawn = [c for c in state["candidates"] if c["round"] == r]
        images = read_images([c["path"] for c in drawn])
        composition = state["composition"]
        verdict = self.verifier.verify(images, composition["prompt"], state["request"]["modality"], composition["findings"],
                                       paths=[c["path"] for c in drawn], seeds=[c["seed"] for c in drawn])
        verdict["round"] = r
        for c in verdict["candidates"]:
            c["round"] = r
        best = verdict["candidates"][verdict["best"]]
        summary = f"round {r}: {'pass' if verdict['passed'] else 'fail'}; best {Path(best['path']).name} score {best['score']}"
        if not verdict["passed"]:
            summary += " (" + "; ".join(best["failures"][:3]) + ")"
        return {"verdicts": [verdict], "_summary": summary}

    def refine(self, state: Mapping) -> dict:
        settings = state["settings"]
        verdict = state["verdicts"][-1]
        composition = state["composition"]
        actions = suggest_actions(verdict, float(state["guidance"]), composition["findings"], self.config.refine)
        emphasis = Emphasis.from_dict(composition.get("emphasis"))
        user_severity = {f["name"]: f.get("severity") for f in state["pathology"]["findings"]}
        current = {f["name"]: f for f in composition["findings"]}
        guidance = float(state["guidance"])
        present_names = [f["name"] for f in composition["findings"] if f.get("present", True)]
        applied = []
        for action in actions:
            a = dict(action)
            if a["action"] == "emphasis":
                name = a["finding"]
                severity = current.get(name, {}).get("severity")
                if self.config.refine.escalate_severity and user_severity.get(name) is None and severity in SEVERITY_ORDER[:-1]:
                    a["severity"] = emphasis.severity[name] = SEVERITY_ORDER[SEVERITY_ORDER.index(severity) + 1]
                    a["applied"] = f"restated as {a['severity']} (the request gives no severity)"
                elif present_names and present_names[0] == name:
                    a["applied"] = "wording kept (the user's severity; already the impression's statement)"
                else:
                    if name not in emphasis.repeat_in_impression:
                        emphasis.repeat_in_impression.append(name)
                    a["applied"] = "stated again in the impression"
            elif a["action"] == "negative_normal":
                emphasis.normal_negative = True
                a["applied"] = "normal report added to the negative prompt"
            elif a["action"] == "negative_prompt":
                if a["finding"] not in emphasis.negative_findings:
                    emphasis.negative_findings.append(a["finding"])
                a["applied"] = "stated in the negative prompt"
            elif a["action"] == "guidance":
                guidance = float(a["to"])
                a["applied"] = f"guidance {a['from']} -> {a['to']}"
            elif a["action"] == "reseed":
                a["applied"] = "next round draws new seeds"
            applied.append(a)
        new = compose_prompt(state["request"], state["pathology"], state["request"]["modality"], emphasis,
                             settings["default_severity"], settings["base_negative"])
        new["visual"] = composition.get("visual", [])
        summary = "; ".join(a["applied"] for a in applied)
        return {"composition": new, "guidance": guidance, "refinements": [{"round": int(state["round"]), "actions": applied}],
                "_summary": summary}

    def finish(self, state: Mapping) -> dict:
        settings = state.get("settings") or {}
        if state.get("status") == "refused":
            return {"result": {"status": "refused", "error": state.get("error"), "images": []}, "_summary": f"refused: {state.get('error')}"}
        if settings.get("stop_after") == "compose_prompt" or not state.get("verdicts"):
            return {"status": "composed", "result": result_record(state, [], None, "composed"), "_summary": "composed (nothing drawn)"}
        verdicts = state["verdicts"]
        ranked = sorted((c for v in verdicts for c in v["candidates"]),
                        key=lambda c: (c["passed"], c["score"]), reverse=True)
        chosen = ranked[: int(settings.get("n", 1))]
        passed = bool(chosen) and all(c["passed"] for c in chosen)
        status = "passed" if passed else "failed"
        return {"status": status, "result": result_record(state, chosen, verdicts[-1], status),
                "_summary": f"{status} after {len(verdicts)} round(s); kept {', '.join(Path(c['path']).name for c in chosen)}"}


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
