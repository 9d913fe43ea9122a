"""Refinement as typed actions (agents/refinement.py): what the verdict asks for, what each action changes,
and the trace record each leaves (the keys `synthmed trace show` and the dashboard read)."""

from agents.config import RefineConfig
from agents.refinement import (ACTIONS, Emphasis, Emphasise, NegativeNormal, NegativePrompt, RefineState, Reseed, SetGuidance,
                               apply_actions, suggest_actions)


def verdict(*findings, saturated=False):
    rows = [{"name": n, "checked": True, "pass": ok, "expected": exp} for n, exp, ok in findings]
    return {"best": 0, "candidates": [{"findings": rows, "quality": {"saturated": saturated}}]}


def state(findings, user_severity=None, guidance=4.0):
    return RefineState(Emphasis(), guidance, findings, user_severity or {}, escalate_severity=True)


def test_a_missing_finding_asks_for_emphasis_normal_negative_more_guidance_and_new_seeds():
    cfg = RefineConfig()
    actions = suggest_actions(verdict(("pleural_effusion", "present", False), ("pneumothorax", "absent", True)), 4.0, cfg)
    kinds = [type(a) for a in actions]
    assert kinds == [Emphasise, NegativeNormal, SetGuidance, Reseed] if cfg.normal_as_negative else [Emphasise, SetGuidance, Reseed]
    guidance = next(a for a in actions if isinstance(a, SetGuidance))
    assert guidance.old == 4.0 and guidance.new == min(cfg.max_guidance, 4.0 + cfg.guidance_step)


def test_a_negated_finding_shown_goes_to_the_negative_prompt_and_saturation_lowers_guidance():
    cfg = RefineConfig()
    actions = suggest_actions(verdict(("pneumothorax", "absent", False), saturated=True), 6.0, cfg)
    assert [type(a) for a in actions] == [NegativePrompt, SetGuidance, Reseed]
    assert actions[0].finding == "pneumothorax"
    assert actions[1].new == max(cfg.min_guidance, 6.0 - cfg.guidance_step)


def test_emphasis_escalates_an_open_severity_but_keeps_the_users():
    findings = [{"name": "pleural_effusion", "present": True, "severity": "mild"},
                {"name": "cardiomegaly", "present": True, "severity": "moderate"}]
    s = state(findings, user_severity={"pleural_effusion": None, "cardiomegaly": "moderate"})
    records = apply_actions([Emphasise("why", finding="pleural_effusion"), Emphasise("why", finding="cardiomegaly")], s)
    assert s.emphasis.severity == {"pleural_effusion": "moderate"}
    assert records[0]["severity"] == "moderate" and "restated as moderate" in records[0]["applied"]
    assert s.emphasis.repeat_in_impression == ["cardiomegaly"] and records[1]["applied"] == "stated again in the impression"


def test_actions_change_only_their_part_of_the_state_and_record_themselves():
    s = state([{"name": "drusen", "present": True, "severity": None}])
    records = apply_actions([NegativeNormal("a"), NegativePrompt("b", finding="macular_hole"), NegativePrompt("b", finding="macular_hole"),
                             SetGuidance("c", old=4.0, new=5.5), Reseed("d")], s)
    assert s.emphasis.normal_negative and s.emphasis.negative_findings == ["macular_hole"] and s.guidance == 5.5
    assert [r["action"] for r in records] == ["negative_normal", "negative_prompt", "negative_prompt", "guidance", "reseed"]
    assert records[3] == {"action": "guidance", "from": 4.0, "to": 5.5, "why": "c", "applied": "guidance 4.0 -> 5.5"}
    assert all({"action", "why", "applied"} <= set(r) for r in records)
    assert set(ACTIONS) == {"emphasis", "negative_normal", "negative_prompt", "guidance", "reseed"}


def test_emphasis_round_trips_through_the_state():
    e = Emphasis({"drusen": "severe"}, ["macular_hole"], True, ["drusen"])
    assert Emphasis.from_dict(e.to_dict()) == e and Emphasis.from_dict(None) == Emphasis()
