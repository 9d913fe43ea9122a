"""The graph's one state.

Every value is plain JSON (dicts, lists, strings, numbers), so the SQLite checkpointer stores each
step readably and ``synthmed trace show`` can print it without the code that wrote it.

Reducers: fields annotated with ``operator.add`` are append-only logs: a node returns only its new
entries and LangGraph appends them, so no node can rewrite what an earlier step recorded. Every
other field is replaced by the latest node that returns it.
"""

from __future__ import annotations

import operator
from typing import Annotated, Literal, TypedDict

Status = Literal["running", "passed", "failed", "refused", "composed"]  # composed: stop_after=compose_prompt, nothing drawn


class GraphState(TypedDict, total=False):
    # the request, as given
    text: str
    modality: str  # as the user wrote it; request["modality"] holds the resolved id
    settings: dict  # trace_id, n, candidates, max_rounds, seed, steps, guidance, out, policies (see agents.nodes.settings_from)

    # one record per reasoning stage (agents.schema models, dumped)
    request: dict  # parse_request: ParsedRequest
    anatomy: dict  # localize_anatomy: AnatomyResult
    pathology: dict  # assess_pathology: PathologyResult (after the contradiction policy)
    visual: dict  # map_visual_features: VisualResult
    composition: dict  # compose_prompt / refine: report, prompt, negative, assumed, emphasis, findings

    # the generate-verify loop
    round: int  # rounds drawn so far; the loop stops at settings["max_rounds"]
    guidance: float  # guidance scale of the next round
    candidates: Annotated[list[dict], operator.add]  # every drawn image: round, path, seed, prompt, negative, guidance
    verdicts: Annotated[list[dict], operator.add]  # one verifier verdict per round
    refinements: Annotated[list[dict], operator.add]  # one entry per refine step: round, actions applied

    # the trace
    events: Annotated[list[dict], operator.add]  # one per node run: node, backend, seconds, summary
    retrievals: Annotated[list[dict], operator.add]  # every retrieval call (agents.schema.RetrievalRecord)
    warnings: Annotated[list[str], operator.add]

    status: Status
    error: str | None  # why a request was refused
    result: dict  # finish: images, report, verdict, findings


__all__ = ["GraphState", "Status"]
