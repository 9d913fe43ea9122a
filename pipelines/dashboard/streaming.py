"""One request through the agent graph, stage by stage, for the Generate page.

``stream_request`` runs ``agent.graph.stream`` (LangGraph) with the same settings ``Agent.run`` uses and
yields the whole state after each step, so the page can show each stage as it finishes; the trace is
the same as ``synthmed generate``'s (the agent's checkpointer keeps every step). The ``*_rows`` and
``*_markdown`` helpers turn a state into what the page shows; they are plain Python.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agents.graph import recursion_limit
from agents.nodes import settings_from

from ..agent import new_trace_id
from .data import retrieval_rows

FINDING_COLUMNS = ["finding", "stated", "laterality", "severity", "location", "hedged", "codes"]
CANDIDATE_COLUMNS = ["round", "image", "passed", "score", "checks", "quality"]


def stream_request(agent, text: str, modality: str, trace_id: str | None = None, **settings) -> Iterator[tuple[list[str], dict]]:
    """(nodes finished in this step, the state after it), step by step until the graph ends."""
    trace_id = trace_id or new_trace_id()
    cfg = agent.cfg
    s = settings_from(cfg.agents, trace_id, cfg.sample.steps, cfg.sample.guidance, cfg.sample.negative, **settings)
    config = {"configurable": {"thread_id": trace_id}, "recursion_limit": recursion_limit(s["max_rounds"])}
    nodes: list[str] = []
    for mode, chunk in agent.graph.stream({"text": text, "modality": modality, "settings": s}, config,
                                          stream_mode=["updates", "values"]):
        if mode == "updates":
            nodes += list(chunk)
        elif nodes:  # the first "values" is the input, before any node ran
            yield nodes, dict(chunk)
            nodes = []


def finding_rows(state: dict) -> list[list[Any]]:
    findings = (state.get("pathology") or {}).get("findings") or []
    rows = []
    for f in findings:
        codes = ", ".join(f"{k}:{v}" for k, v in (f.get("codes") or {}).items())
        rows.append([f.get("name"), "present" if f.get("present") else "absent", f.get("laterality") or "",
                     f.get("severity") or "", f.get("location") or "", "yes" if f.get("uncertain") else "", codes])
    return rows


def candidate_rows(state: dict) -> list[list[Any]]:
    rows = []
    for verdict in state.get("verdicts") or []:
        for c in verdict.get("candidates") or []:
            checks = "; ".join(f"{f['name']} {f.get('expected', '')} p={'?' if f.get('probability') is None else round(f['probability'], 3)}"
                               + ("" if f.get("pass") is None else " ok" if f["pass"] else " FAIL") for f in c.get("findings") or [])
            quality = "ok" if (c.get("quality") or {}).get("ok", True) else "; ".join((c.get("quality") or {}).get("reasons") or [])
            rows.append([verdict.get("round"), Path(c["path"]).name if c.get("path") else c.get("candidate"),
                         bool(c.get("passed")), _r(c.get("score")), checks, quality])
    return rows


def candidate_images(state: dict) -> list[tuple[str, str]]:
    """(path, caption) of every verified candidate, rounds in order."""
    out = []
    for verdict in state.get("verdicts") or []:
        for c in verdict.get("candidates") or []:
            if c.get("path"):
                out.append((c["path"], f"round {verdict.get('round')}: {'pass' if c.get('passed') else 'fail'}, "
                                       f"score {_r(c.get('score'))}" + (" (best)" if c.get("candidate") == verdict.get("best") else "")))
    return out


def progress_markdown(state: dict) -> str:
    """One line per node run so far: node, seconds, what it decided."""
    lines = [f"**trace** `{(state.get('settings') or {}).get('trace_id', '')}` · status **{state.get('status', 'running')}**"]
    for e in state.get("events") or []:
        lines.append(f"- `{e['node']}` ({e.get('seconds', 0) * 1000:.0f} ms){' round ' + str(e['round']) if e['node'] in ('generate', 'verify', 'refine') else ''}"
                     + (f": {e['summary']}" if e.get("summary") else ""))
    if state.get("error"):
        lines.append(f"\n**refused**: {state['error']}")
    for w in state.get("warnings") or []:
        lines.append(f"\n_warning_: {w}")
    return "\n".join(lines)


def composition_texts(state: dict) -> tuple[str, str, str]:
    """(report, prompt, negative) once compose_prompt has run, else empty strings."""
    c = state.get("composition") or {}
    return ((c.get("report") or {}).get("text", ""), c.get("prompt", ""), c.get("negative", "") or "")


def final_image(state: dict) -> str | None:
    images = (state.get("result") or {}).get("images") or []
    return images[0] if images else None


def _r(value: Any, digits: int = 3) -> Any:
    return round(float(value), digits) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


__all__ = ["CANDIDATE_COLUMNS", "FINDING_COLUMNS", "candidate_images", "candidate_rows", "composition_texts", "final_image",
           "finding_rows", "progress_markdown", "retrieval_rows", "stream_request"]
