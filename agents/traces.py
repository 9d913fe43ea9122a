"""Traces: the SQLite checkpointer's record of every request, read back for people.

A trace id is the LangGraph thread id of one request. The checkpointer keeps a checkpoint after
every step; the latest holds the whole state (its append-only logs included: events, retrievals,
candidates, verdicts, refinements), and the number of checkpoints is the number of steps taken.

Several processes (two ``synthmed generate`` at once, the dashboard reading) share one database: every
connection uses SQLite's write-ahead log and waits up to ``BUSY_TIMEOUT_S`` for another's write.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from langgraph.checkpoint.sqlite import SqliteSaver

from generator.errors import UserError


class TraceNotFoundError(UserError, LookupError):
    pass


class NotATracesDatabaseError(UserError, sqlite3.DatabaseError):
    """The traces file is not a SQLite database, or a damaged one. Also a ``sqlite3.DatabaseError``, so readers
    that skip an unreadable database still do."""


BUSY_TIMEOUT_S = 30.0  # how long a connection waits for another process's write before "database is locked"


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the traces database that several processes can share: write-ahead log (readers do
    not block the writer, nor it them) and a busy timeout; usable from LangGraph's worker threads.

    Switching a new database to WAL needs an exclusive lock, and SQLite answers "database is locked" at once, without
    waiting for the busy timeout, when another connection holds a write lock meanwhile (two processes creating the
    database together, a reader among them): the switch is tried again until ``BUSY_TIMEOUT_S`` has passed."""
    path = Path(path)
    conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_S, check_same_thread=False)
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":  # WAL persists: set once
                conn.execute("PRAGMA journal_mode=WAL")
            return conn
        except sqlite3.OperationalError as exc:
            if "locked" in str(exc) and time.monotonic() < deadline:
                time.sleep(0.02)
                continue
            conn.close()
            raise _unreadable(path, exc) from None
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise _unreadable(path, exc) from None


def _unreadable(path: Path, exc: sqlite3.DatabaseError) -> Exception:
    """A file that is not a SQLite database, or a damaged one, as one line saying what to do; other errors as they are."""
    if type(exc) is not sqlite3.DatabaseError:  # OperationalError ("database is locked", no permission, ...) and the like
        return exc
    return NotATracesDatabaseError(f"{path} is not a readable SQLite database ({exc}); move it away (e.g. `mv {path} {path}.bad`) "
                                   "and synthmed starts an empty traces database there, or point --agents.traces elsewhere")


def open_checkpointer(path: str | Path) -> SqliteSaver:
    """A SqliteSaver on ``path`` (created with its folder when absent) over :func:`connect`; the saver
    serialises its own writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    saver = SqliteSaver(connect(path))
    try:
        saver.setup()
    except sqlite3.DatabaseError as exc:
        saver.conn.close()
        raise _unreadable(path, exc) from None
    return saver


@contextmanager
def checkpointer(path: str | Path) -> Iterator[SqliteSaver]:
    saver = open_checkpointer(path)
    try:
        yield saver
    finally:
        saver.conn.close()


def _thread_ids(saver: SqliteSaver) -> list[str]:
    rows = saver.conn.execute(
        "SELECT thread_id, MIN(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = '' GROUP BY thread_id ORDER BY MIN(checkpoint_id)"
    ).fetchall()
    return [r[0] for r in rows]


def _steps(saver: SqliteSaver, trace_id: str) -> tuple[int, str | None, str | None]:
    count, first, last = 0, None, None
    for t in saver.list({"configurable": {"thread_id": trace_id}}):
        count += 1
        ts = t.checkpoint.get("ts")
        last = last or ts  # newest first
        first = ts
    return count, first, last


def trace_state(saver: SqliteSaver, trace_id: str) -> dict:
    found = saver.get_tuple({"configurable": {"thread_id": trace_id}})
    if found is None:
        known = _thread_ids(saver)
        hint = f"; known: {', '.join(known[-5:])}" + (" ..." if len(known) > 5 else "") if known else "; there are no traces yet"
        raise TraceNotFoundError(f"no trace {trace_id!r}{hint} (list them with `synthmed trace list`)")
    return dict(found.checkpoint.get("channel_values") or {})


def list_traces(path: str | Path, limit: int | None = None) -> list[dict]:
    """One row per request, oldest first: id, started, finished, steps, modality, status, rounds, text."""
    path = Path(path)
    if not path.is_file():
        return []
    with checkpointer(path) as saver:
        ids = _thread_ids(saver)
        if limit:
            ids = ids[-limit:]
        rows = []
        for trace_id in ids:
            state = trace_state(saver, trace_id)
            steps, started, finished = _steps(saver, trace_id)
            rows.append({
                "trace_id": trace_id,
                "started": started,
                "finished": finished,
                "steps": steps,
                "modality": (state.get("request") or {}).get("modality") or state.get("modality"),
                "status": state.get("status", "running"),
                "rounds": len(state.get("verdicts") or []),
                "text": state.get("text", ""),
            })
        return rows


def show_trace(path: str | Path, trace_id: str) -> dict:
    """Everything a request left: per stage what was retrieved and decided, the prompts, each
    candidate's verdict, the refinements, the result; and the steps taken."""
    path = Path(path)
    if not path.is_file():
        raise TraceNotFoundError(f"no trace database at {path}; run `synthmed generate` first")
    with checkpointer(path) as saver:
        state = trace_state(saver, trace_id)
        steps, started, finished = _steps(saver, trace_id)
    retrievals: dict[str, list] = {}
    for r in state.get("retrievals") or []:
        retrievals.setdefault(r.get("stage", "?"), []).append(r)
    return {
        "trace_id": trace_id,
        "started": started,
        "finished": finished,
        "steps": steps,
        "status": state.get("status", "running"),
        "error": state.get("error"),
        "text": state.get("text"),
        "settings": state.get("settings"),
        "events": state.get("events") or [],
        "stages": {
            "parse_request": state.get("request"),
            "localize_anatomy": _without(state.get("anatomy"), "retrievals"),
            "assess_pathology": _without(state.get("pathology"), "retrievals"),
            "map_visual_features": _without(state.get("visual"), "retrievals"),
        },
        "retrievals": retrievals,
        "composition": state.get("composition"),
        "candidates": state.get("candidates") or [],
        "verdicts": state.get("verdicts") or [],
        "refinements": state.get("refinements") or [],
        "warnings": state.get("warnings") or [],
        "result": state.get("result"),
    }


def _without(record: dict | None, key: str) -> dict | None:
    return None if record is None else {k: v for k, v in record.items() if k != key}


def format_trace(trace: dict, hits_per_query: int = 3) -> str:
    """The trace as text, stage by stage."""
    out: list[str] = []
    add = out.append
    add(f"trace {trace['trace_id']}  status {trace['status']}  steps {trace['steps']}  started {trace['started']}")
    add(f"request: {trace['text']!r}")
    if trace.get("error"):
        add(f"refused: {trace['error']}")
    for w in trace.get("warnings") or []:
        add(f"warning: {w}")
    events = {}
    for e in trace["events"]:
        events.setdefault(e["node"], []).append(e)
    for stage, record in trace["stages"].items():
        if record is None:
            continue
        backend = (events.get(stage) or [{}])[-1].get("backend", "")
        seconds = sum(e["seconds"] for e in events.get(stage, []))
        add(f"\n== {stage} ({backend}, {seconds * 1000:.0f} ms)")
        for e in events.get(stage, []):
            if e.get("summary"):
                add(f"   decided: {e['summary']}")
        for r in trace["retrievals"].get(stage, []):
            add(f"   retrieved for {r['query']!r} [{', '.join(r.get('kinds') or []) or 'all kinds'}]:")
            for h in (r.get("hits") or [])[:hits_per_query]:
                codes = ", ".join(f"{k}:{v}" for k, v in (h.get("codes") or {}).items())
                add(f"     {h['score']:.3f}  {h['id']}  ({h.get('kind')}, {h.get('source')}{', ' + codes if codes else ''})")
    composition = trace.get("composition")
    if composition:
        add("\n== compose_prompt")
        add("   report:\n     " + composition["report"]["text"].replace("\n", "\n     "))
        add(f"   prompt:   {composition['prompt']}")
        add(f"   negative: {composition['negative'] or '(none)'}")
        for a in composition.get("assumed") or []:
            add(f"   assumed: {a['finding']} {a['severity']} ({a['why']})")
    refinements = {r["round"]: r for r in trace.get("refinements") or []}
    for verdict in trace.get("verdicts") or []:
        folders = sorted({str(Path(c["path"]).parent) for c in verdict["candidates"] if c.get("path")})
        guided = {c.get("reward_guidance") for c in trace.get("candidates") or [] if c.get("round") == verdict["round"]} - {None}
        add(f"\n== round {verdict['round']}: {'pass' if verdict['passed'] else 'fail'}"
            + (f", reward-guided (scale {min(guided):g})" if guided else "") + (f"  (images in {', '.join(folders)})" if folders else ""))
        for c in verdict["candidates"]:
            checks = ", ".join(f"{f['name']}={'?' if f['probability'] is None else f['probability']:}"
                               f"{'' if f['pass'] is None else (' ok' if f['pass'] else ' FAIL')}" for f in c["findings"])
            align = f" cos {c['alignment']['cosine']:.3f}" if c.get("alignment") else ""
            mem = f" ssim {c['memorisation']['nearest_ssim']:.2f}" if c["memorisation"].get("checked") else ""
            mark = "*" if c["candidate"] == verdict["best"] else " "
            add(f"  {mark} {Path(c['path']).name if c.get('path') else c['candidate']}: score {c['score']:.3f}{align}{mem}  {checks}"
                + ("" if c["quality"]["ok"] else "  quality: " + "; ".join(c["quality"]["reasons"])))
        if verdict["round"] + 1 in refinements:
            for a in refinements[verdict["round"] + 1]["actions"]:
                add(f"   refine: {a['action']}: {a.get('applied', '')} ({a.get('why', '')})")
    result = trace.get("result") or {}
    if result.get("images"):
        add("\nimages:\n  " + "\n  ".join(result["images"]))
    return "\n".join(out)


def trace_json(trace: dict) -> str:
    return json.dumps(trace, indent=2, default=_default)


def _default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


__all__ = ["BUSY_TIMEOUT_S", "NotATracesDatabaseError", "TraceNotFoundError", "checkpointer", "connect", "format_trace", "list_traces",
           "open_checkpointer", "show_trace", "trace_json", "trace_state"]
