"""The LLM reasoning backend: any LangChain chat model per stage, the rules as fallback.

For each stage the rules run first: they make the retrieval calls (which stay in the trace
whichever backend decides) and give the model grounded candidates. The chat model then answers
with the stage's record (agents.schema) as JSON, through ``with_structured_output`` where the model
supports it and as a JSON reply otherwise. The answer is validated twice: by the pydantic model,
and against the knowledge base (finding names must be lexicon findings of the modality, the
modality a configured one). An answer that fails either check, a timeout or any error of the
model's client falls back to the rules' record, with a warning saying why.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence

from langchain_core.messages import BaseMessage
from pydantic import BaseModel, ValidationError

from generator.errors import SynthmedError, UserError

from .schema import AnatomyResult, ParsedRequest, PathologyResult, StageError, VisualResult

log = logging.getLogger(__name__)

STAGE_TASKS = {
    "parse_request": "Split the request into statements and mark negation (e.g. 'no', 'without', 'resolved') and "
                     "uncertainty (e.g. 'possible', 'cannot exclude', '?') per statement. Keep text, modality and offsets.",
    "localize_anatomy": "List the anatomical places the request names (lexicon anatomy ids), with their side.",
    "assess_pathology": "List every finding the request states, as lexicon finding ids valid for the modality, with "
                        "present (false when negated), uncertain, severity (mild/moderate/severe), laterality "
                        "(left/right/bilateral) and location (anatomy / phantom location id) where the text gives them. "
                        "Flag contradictions (a normal study with findings; one finding both present and absent).",
    "map_visual_features": "For each present finding, how it looks on this modality (one descriptor each).",
}
RECORDS: dict[str, type[BaseModel]] = {"parse_request": ParsedRequest, "localize_anatomy": AnatomyResult,
                                       "assess_pathology": PathologyResult, "map_visual_features": VisualResult}


class LLMOutputError(SynthmedError, ValueError):
    pass


def _json_of(reply) -> dict:
    """The JSON object in a chat reply (a message, a dict, or text, possibly fenced)."""
    if isinstance(reply, BaseModel) and not isinstance(reply, BaseMessage):  # a structured-output answer
        return reply.model_dump()
    if isinstance(reply, dict):
        return reply
    text = getattr(reply, "content", reply)
    if isinstance(text, list):  # content blocks
        text = "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in text)
    text = str(text).strip()
    fenced = re.search(r"```(?:json)?\s*(.*?)```", text, re.S)
    if fenced:
        text = fenced.group(1).strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        raise LLMOutputError(f"no JSON object in the reply: {text[:120]!r}")
    try:
        return json.loads(text[start:end + 1])
    except json.JSONDecodeError as exc:
        raise LLMOutputError(f"reply is not valid JSON ({exc.msg} at {exc.pos})") from None


class LLMReasoner:
    """The four stages by ``chat_model`` for the stages in ``stages``, by ``fallback`` (a RuleReasoner) otherwise."""

    name = "llm"

    def __init__(self, chat_model, fallback, stages: Sequence[str] | None = None, known_findings: dict[str, set[str]] | None = None):
        self.model = chat_model
        self.fallback = fallback
        self.stages = set(stages if stages is not None else RECORDS)
        unknown = self.stages - set(RECORDS)
        if unknown:
            raise UserError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(RECORDS)}")
        self.known_findings = known_findings  # modality -> lexicon finding ids valid there

    # -- the model call ----------------------------------------------------------------------
    def _ask(self, stage: str, context: dict) -> BaseModel:
        record = RECORDS[stage]
        schema = json.dumps(record.model_json_schema())
        messages = [
            ("system", "You are a radiology reporting assistant inside a synthetic-image generator. "
                       f"Task: {STAGE_TASKS[stage]} Answer with one JSON object that validates against this JSON schema "
                       f"and nothing else:\n{schema}"),
            ("human", json.dumps(context, ensure_ascii=False, default=str)),
        ]
        reply = None
        structured = getattr(self.model, "with_structured_output", None)
        if structured is not None:
            try:
                reply = structured(record).invoke(messages)
            except NotImplementedError:
                reply = None  # models without tool calling answer in text below
        if reply is None:
            reply = self.model.invoke(messages)
        return record.model_validate(_json_of(reply))

    def _run(self, stage: str, rules_result: BaseModel, context: dict, check) -> BaseModel:
        """The stage's record, its ``backend`` saying who decided it: "llm", "rules" (not an LLM stage) or
        "rules (llm fallback)" (with a warning saying why)."""
        if stage not in self.stages:
            return rules_result.model_copy(update={"backend": "rules"})
        try:
            answer = self._ask(stage, context | {"candidate": rules_result.model_dump(mode="json")})
            check(answer)
        except (LLMOutputError, ValidationError, StageError, ValueError, TimeoutError, OSError, RuntimeError) as exc:
            reason = str(exc).splitlines()[0][:300]
            warning = f"{stage}: the LLM's answer did not validate ({type(exc).__name__}: {reason}); used the rules"
            log.warning(warning)
            return _with_warning(rules_result, warning).model_copy(update={"backend": "rules (llm fallback)"})
        update = {"backend": "llm"}
        if hasattr(rules_result, "retrievals") and hasattr(answer, "retrievals"):
            update["retrievals"] = rules_result.retrievals  # the trace keeps the retrieval calls actually made
        return answer.model_copy(update=update)

    # -- the stages -------------------------------------------------------------------------
    def parse_request(self, text: str, modality: str) -> ParsedRequest:
        rules = self.fallback.parse_request(text, modality)  # raises for empty text and unknown modalities

        def check(answer: ParsedRequest) -> None:
            if answer.modality != rules.modality:
                raise LLMOutputError(f"modality {answer.modality!r} differs from the resolved {rules.modality!r}")
            if not answer.statements:
                raise LLMOutputError("no statements")

        return self._run("parse_request", rules, {"text": rules.text, "modality": rules.modality}, check)

    def localize_anatomy(self, request: ParsedRequest) -> AnatomyResult:
        rules = self.fallback.localize_anatomy(request)
        return self._run("localize_anatomy", rules, {"request": request.model_dump(mode="json")}, lambda answer: None)

    def assess_pathology(self, request: ParsedRequest, anatomy: AnatomyResult) -> PathologyResult:
        rules = self.fallback.assess_pathology(request, anatomy)
        known = (self.known_findings or {}).get(request.modality)

        def check(answer: PathologyResult) -> None:
            if known is not None:
                foreign = [f.name for f in answer.findings if f.name not in known]
                if foreign:
                    raise LLMOutputError(f"finding(s) {foreign} are not lexicon findings of {request.modality}")
            drawable = {f.name: f.drawable for f in rules.findings}
            for f in answer.findings:  # drawability is a fact of the generator, not the model's opinion
                f.drawable = drawable.get(f.name, f.drawable)

        return self._run("assess_pathology", rules, {"request": request.model_dump(mode="json"),
                                                     "anatomy": anatomy.model_dump(mode="json", exclude={"retrievals"})}, check)

    def map_visual_features(self, request: ParsedRequest, pathology: PathologyResult) -> VisualResult:
        rules = self.fallback.map_visual_features(request, pathology)
        return self._run("map_visual_features", rules, {"modality": request.modality,
                                                        "findings": [f.model_dump(mode="json") for f in pathology.findings]},
                         lambda answer: None)


def _with_warning(record: BaseModel, warning: str) -> BaseModel:
    if "warnings" in type(record).model_fields:
        return record.model_copy(update={"warnings": [*record.warnings, warning]})
    return record


def make_chat_model(cfg):
    """A ChatOpenAI client for an OpenAI-compatible server (``agents.llm``); needs ``langchain-openai``."""
    import os

    if not cfg.model:
        raise UserError("agents.reasoner is llm but agents.llm.model is empty; set --agents.llm.model=NAME "
                        "(and agents.llm.base_url for your server), or use agents.reasoner=rules")
    try:
        from langchain_openai import ChatOpenAI
    except ImportError:
        raise ImportError("the llm reasoner talks to OpenAI-compatible servers through langchain-openai: "
                          "pip install langchain-openai") from None
    return ChatOpenAI(model=cfg.model, base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env, "not-needed"),
                      temperature=cfg.temperature, timeout=cfg.timeout_s, max_retries=0)


__all__ = ["LLMOutputError", "LLMReasoner", "STAGE_TASKS", "make_chat_model"]
