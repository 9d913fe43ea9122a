"""The LLM backend driven by LangChain's fake chat model: a valid structured answer is used, anything
else falls back to the rules with a warning; the retrieval calls stay in the record either way."""

from __future__ import annotations

import json

import pytest
from langchain_core.language_models.fake_chat_models import FakeListChatModel

from agents.llm import LLMReasoner, _json_of
from agents.schema import PathologyResult
from knowledge.build import build_knowledge_base, load_retriever
from knowledge.lexicon import load_lexicon

MODALITIES = ["cxr", "chest_ct", "brain_mri", "fundus", "oct"]


@pytest.fixture(scope="module")
def rules(tmp_path_factory, embedder):
    from agents.rules import RuleReasoner

    folder = tmp_path_factory.mktemp("kb")
    concepts = load_lexicon()
    build_knowledge_base(folder, concepts, iter([]), embedder, "Flat", "Flat", progress=False)
    retriever = load_retriever(folder, embedder, modalities=MODALITIES)
    known = {m: {c.id for c in concepts if c.kind == "finding" and (not c.modalities or m in c.modalities)} for m in MODALITIES}
    return RuleReasoner(retriever), known


def pathology_answer(**finding) -> str:
    return "Here you are:\n```json\n" + json.dumps(PathologyResult(findings=[{"name": "pleural_effusion", "term": "pleural effusion",
                                                                           **finding}]).model_dump(mode="json")) + "\n```"


def test_valid_answer_is_used_and_retrievals_are_the_real_ones(rules):
    reasoner, known = rules
    model = FakeListChatModel(responses=[pathology_answer(laterality="right", severity="mild")])
    llm = LLMReasoner(model, reasoner, stages=["assess_pathology"], known_findings=known)
    request = llm.parse_request("small right effusion", "cxr")
    assert request.backend == "rules"  # not an LLM stage here
    result = llm.assess_pathology(request, llm.localize_anatomy(request))
    assert result.backend == "llm"
    assert [(f.name, f.laterality, f.severity) for f in result.findings] == [("pleural_effusion", "right", "mild")]
    assert result.retrievals and result.retrievals == reasoner.assess_pathology(request, reasoner.localize_anatomy(request)).retrievals


@pytest.mark.parametrize("reply,why", [
    ("I think it is an effusion.", "no JSON"),
    ('{"findings": [{"name": "pleural_effusion"}]}', "ValidationError"),  # term missing
    (None, "not lexicon findings"),
])
def test_invalid_answers_fall_back_to_the_rules(rules, reply, why):
    reasoner, known = rules
    reply = reply if reply is not None else pathology_answer().replace("pleural_effusion", "drusen_of_the_lung")
    llm = LLMReasoner(FakeListChatModel(responses=[reply]), reasoner, stages=["assess_pathology"], known_findings=known)
    request = llm.parse_request("large left pleural effusion", "cxr")
    result = llm.assess_pathology(request, llm.localize_anatomy(request))
    assert result.backend == "rules (llm fallback)"
    assert any(why in w and "did not validate" in w for w in result.warnings)
    expected = reasoner.assess_pathology(request, reasoner.localize_anatomy(request))
    assert [f.name for f in result.findings] == [f.name for f in expected.findings]


def test_parse_stage_answer_must_keep_the_resolved_modality(rules):
    reasoner, _ = rules
    rules_parse = reasoner.parse_request("no pneumothorax", "chest x-ray")
    wrong = rules_parse.model_copy(update={"modality": "oct"}).model_dump_json()
    llm = LLMReasoner(FakeListChatModel(responses=[wrong]), reasoner, stages=["parse_request"])
    parsed = llm.parse_request("no pneumothorax", "chest x-ray")
    assert parsed.modality == "cxr" and parsed.backend == "rules (llm fallback)"


def test_graph_records_which_backend_ran_each_stage(rules, tmp_path):
    from agents.config import AgentsConfig
    from agents.graph import build_graph
    from agents.nodes import settings_from

    reasoner, known = rules
    llm = LLMReasoner(FakeListChatModel(responses=[pathology_answer(laterality="left", severity="severe")]), reasoner,
                      stages=["assess_pathology"], known_findings=known)
    graph = build_graph(llm, None, None)
    settings = settings_from(AgentsConfig(), "x", 2, 4.0, stop_after="compose_prompt")
    state = graph.invoke({"text": "big effusion on the left", "modality": "cxr", "settings": settings})
    backends = {e["node"]: e.get("backend") for e in state["events"]}
    assert backends["assess_pathology"] == "llm" and backends["parse_request"] == "rules"
    assert "large left pleural effusion" in state["composition"]["prompt"].lower()


def test_json_of_reads_fenced_and_bare_replies():
    assert _json_of('```json\n{"a": 1}\n```') == {"a": 1}
    assert _json_of('sure: {"a": {"b": 2}} done') == {"a": {"b": 2}}
