"""Refinement: what a failed verification round changes before the next one, in one place.

The verifier's verdict on a round's best candidate becomes a list of typed actions
(:func:`suggest_actions`); each action knows how to apply itself to a :class:`RefineState` (the
composition's :class:`Emphasis` and the guidance scale) and says what it did. The graph's ``refine``
node only builds the state, applies the actions in order and records them; the trace keeps each
action as ``{"action": kind, ..., "why": ..., "applied": ...}``.

    requested finding not shown  -> Emphasise (restate it; escalate its severity only where the user
                                    left it open), NegativeNormal (push away from a normal study),
                                    SetGuidance (higher)
    negated finding shown        -> NegativePrompt naming it
    saturated image              -> SetGuidance (lower)
    always                       -> Reseed (new seeds for every candidate)

Composition reads only :class:`Emphasis` (restated severities, findings to push away from, the
normal report as a negative), so the trace shows exactly what changed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .config import RefineConfig
from .schema import SEVERITY_ORDER


@dataclass
class Emphasis:
    """What refinement rounds have asked of the composition so far."""

    severity: dict[str, str] = field(default_factory=dict)  # finding -> severity restated by refinement
    negative_findings: list[str] = field(default_factory=list)  # findings seen although not wanted: stated in the negative prompt
    normal_negative: bool = False  # the modality's normal report joins the negative prompt
    repeat_in_impression: list[str] = field(default_factory=list)  # findings stated again in the impression

    def to_dict(self) -> dict:
        return {"severity": dict(self.severity), "negative_findings": list(self.negative_findings),
                "normal_negative": self.normal_negative, "repeat_in_impression": list(self.repeat_in_impression)}

    @classmethod
    def from_dict(cls, d: dict | None) -> "Emphasis":
        d = d or {}
        return cls(dict(d.get("severity") or {}), list(d.get("negative_findings") or []), bool(d.get("normal_negative")),
                   list(d.get("repeat_in_impression") or []))


@dataclass
class RefineState:
    """What the actions of one refine step read and change."""

    emphasis: Emphasis
    guidance: float
    findings: Sequence[Mapping[str, Any]]  # the composition's findings (name, present, severity, ...)
    user_severity: Mapping[str, str | None]  # finding -> the severity the request gave (None: left open)
    escalate_severity: bool = True

    @property
    def present_names(self) -> list[str]:
        return [f["name"] for f in self.findings if f.get("present", True)]

    def severity_of(self, name: str) -> str | None:
        return next((f.get("severity") for f in self.findings if f["name"] == name), None)


@dataclass(frozen=True)
class Action:
    """One refinement action; ``apply`` changes the state and returns what the trace records beyond the fields."""

    why: str
    kind: ClassVar[str] = ""

    def apply(self, state: RefineState) -> dict[str, Any]:
        raise NotImplementedError

    def fields(self) -> dict[str, Any]:
        return {}

    def record(self, applied: Mapping[str, Any]) -> dict[str, Any]:
        return {"action": self.kind, **self.fields(), "why": self.why, **applied}


@dataclass(frozen=True)
class FindingAction(Action):
    """An action about one finding, which its trace record names."""

    finding: str = ""

    def fields(self) -> dict[str, Any]:
        return {"finding": self.finding}


@dataclass(frozen=True)
class Emphasise(FindingAction):
    kind: ClassVar[str] = "emphasis"

    def apply(self, state: RefineState) -> dict[str, Any]:
        name, severity = self.finding, state.severity_of(self.finding)
        if state.escalate_severity and state.user_severity.get(name) is None and severity in SEVERITY_ORDER[:-1]:
            new = SEVERITY_ORDER[SEVERITY_ORDER.index(severity) + 1]
            state.emphasis.severity[name] = new
            return {"severity": new, "applied": f"restated as {new} (the request gives no severity)"}
        present = state.present_names
        if present and present[0] == name:
            return {"applied": "wording kept (the user's severity; already the impression's statement)"}
        if name not in state.emphasis.repeat_in_impression:
            state.emphasis.repeat_in_impression.append(name)
        return {"applied": "stated again in the impression"}


@dataclass(frozen=True)
class NegativeNormal(Action):
    kind: ClassVar[str] = "negative_normal"

    def apply(self, state: RefineState) -> dict[str, Any]:
        state.emphasis.normal_negative = True
        return {"applied": "normal report added to the negative prompt"}


@dataclass(frozen=True)
class NegativePrompt(FindingAction):
    kind: ClassVar[str] = "negative_prompt"

    def apply(self, state: RefineState) -> dict[str, Any]:
        if self.finding not in state.emphasis.negative_findings:
            state.emphasis.negative_findings.append(self.finding)
        return {"applied": "stated in the negative prompt"}


@dataclass(frozen=True)
class SetGuidance(Action):
    old: float = 0.0
    new: float = 0.0
    kind: ClassVar[str] = "guidance"

    def fields(self) -> dict[str, Any]:
        return {"from": self.old, "to": self.new}

    def apply(self, state: RefineState) -> dict[str, Any]:
        state.guidance = float(self.new)
        return {"applied": f"guidance {self.old} -> {self.new}"}


@dataclass(frozen=True)
class Reseed(Action):
    kind: ClassVar[str] = "reseed"

    def apply(self, state: RefineState) -> dict[str, Any]:
        return {"applied": "next round draws new seeds"}


ACTIONS: dict[str, type[Action]] = {a.kind: a for a in (Emphasise, NegativeNormal, NegativePrompt, SetGuidance, Reseed)}


def suggest_actions(verdict: Mapping[str, Any], guidance: float, refine: RefineConfig) -> list[Action]:
    """The actions for a failed round, from its best candidate's verdict (see the module's table)."""
    best = verdict["candidates"][verdict["best"]]
    checked = [r for r in best["findings"] if r["checked"] and not r["pass"]]
    missing = [r["name"] for r in checked if r["expected"] == "present"]
    unwanted = [r["name"] for r in checked if r["expected"] == "absent"]
    actions: list[Action] = [Emphasise(f"{name} not shown (p below threshold)", finding=name) for name in missing]
    if missing and refine.normal_as_negative:
        actions.append(NegativeNormal("push the image away from a normal study"))
    actions += [NegativePrompt(f"{name} shown although the request negates it", finding=name) for name in unwanted]
    new_guidance = guidance
    if missing:
        new_guidance = min(refine.max_guidance, guidance + refine.guidance_step)
    if best["quality"]["saturated"]:
        new_guidance = max(refine.min_guidance, guidance - refine.guidance_step)
    if new_guidance != guidance:
        actions.append(SetGuidance("finding not shown" if new_guidance > guidance else "saturated image", old=guidance, new=new_guidance))
    actions.append(Reseed("draw new candidates"))
    return actions


def apply_actions(actions: Sequence[Action], state: RefineState) -> list[dict[str, Any]]:
    """Apply ``actions`` in order to ``state``; their trace records."""
    return [action.record(action.apply(state)) for action in actions]


__all__ = ["ACTIONS", "Action", "Emphasis", "Emphasise", "FindingAction", "NegativeNormal", "NegativePrompt", "RefineState", "Reseed", "SetGuidance",
           "apply_actions", "suggest_actions"]
