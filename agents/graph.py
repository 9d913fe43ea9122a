"""The agent graph: a LangGraph ``StateGraph`` over :class:`~agents.state.GraphState`.

    parse_request -> localize_anatomy -> assess_pathology -> map_visual_features -> compose_prompt
      -> generate -> verify -> (pass) finish
                          -> (fail, rounds left) refine -> generate
                          -> (fail, last round) finish

Any reasoning stage may refuse a request (a :class:`~agents.schema.StageError`: unknown modality,
empty text, a finding foreign to the modality, a contradiction under the ``refuse`` policy); the
request then goes straight to ``finish`` with the reason recorded, so a refusal is traced like
any other run. The graph is built by :func:`build_graph` from the parts it is given and compiled
there, never at import time.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Mapping

from langgraph.graph import END, START, StateGraph

from generator.config import ModalityConfig

from .config import AgentsConfig
from .nodes import REASONING_STAGES, Nodes, Step, after_compose, after_stage, after_verify
from .schema import StageError
from .state import GraphState

log = logging.getLogger(__name__)

NODES = (*REASONING_STAGES, "compose_prompt", "generate", "verify", "refine", "finish")


def traced(name: str, fn: Callable[[Mapping], Step]) -> Callable[[Mapping], dict]:
    """The node ``fn`` as a LangGraph node: its :class:`~agents.nodes.Step`'s update plus one trace event
    (node, round, seconds, summary; the backend of a reasoning stage, the seconds spent drawing); a
    :class:`StageError` becomes a refusal recorded in the state."""

    @functools.wraps(fn)
    def run(state: Mapping) -> dict:
        started = time.perf_counter()
        try:
            step = fn(state)
            update, summary = dict(step.update), step.summary
        except StageError as exc:
            step, update, summary = None, {"status": "refused", "error": str(exc)}, f"refused: {exc}"
        event = {"node": name, "round": int(update.get("round", state.get("round", 0)) or 0),
                 "seconds": round(time.perf_counter() - started, 4), "summary": summary}
        if name in REASONING_STAGES:
            event["backend"] = step.backend if step is not None and step.backend else "rules"
        if step is not None and step.generate_seconds is not None:
            event["generate_seconds"] = round(step.generate_seconds, 4)
        update["events"] = [event]
        log.info("%s: %s", name, event["summary"])
        return update

    return run


def build_graph(reasoner, generator, verifier, checkpointer=None, config: AgentsConfig | None = None,
                modalities: Mapping[str, ModalityConfig] | None = None, wording: dict | None = None):
    """The compiled graph. Parts: ``reasoner`` (agents.rules.RuleReasoner or agents.llm.LLMReasoner, each
    holding its retriever), ``generator`` (agents.drawing.ImageGenerator; may be None for a graph
    that only reasons and composes), ``verifier`` (agents.verifier.Verifier), ``checkpointer`` (a
    LangGraph checkpointer, e.g. SqliteSaver; None keeps no trace), ``modalities`` (the configured
    modalities, ``data.modalities``; None: the built-in ones), ``wording`` (the generator's caption words, its
    ``wording.json``: prompts are written in them; None: the phantom report templates)."""
    config = config or AgentsConfig()
    nodes = Nodes(reasoner, generator, verifier, config, modalities, wording)
    graph = StateGraph(GraphState)
    for name in NODES:
        graph.add_node(name, traced(name, getattr(nodes, name)))
    graph.add_edge(START, "parse_request")
    chain = [*REASONING_STAGES, "compose_prompt"]
    for here, nxt in zip(chain, chain[1:]):
        graph.add_conditional_edges(here, after_stage, {"continue": nxt, "finish": "finish"})
    graph.add_conditional_edges("compose_prompt", after_compose, {"generate": "generate", "finish": "finish"})
    graph.add_conditional_edges("generate", after_stage, {"continue": "verify", "finish": "finish"})  # a refusal drew nothing
    graph.add_conditional_edges("verify", after_verify, {"refine": "refine", "finish": "finish"})
    graph.add_edge("refine", "generate")
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=checkpointer)


def recursion_limit(max_rounds: int) -> int:
    """Graph steps a request may take: the stages, then three per round (generate, verify, refine)."""
    return len(NODES) + 3 * max_rounds + 4


__all__ = ["NODES", "build_graph", "recursion_limit", "traced"]
