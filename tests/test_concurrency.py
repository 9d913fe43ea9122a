"""Several processes at once: two `synthmed generate` share the traces database (write-ahead log, busy
timeout) and build a missing knowledge base once, a traces file that is not SQLite is one clear error, and readers of the append-only logs
(metrics.jsonl, samples.jsonl) never see half a record while a writer appends."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from agents.traces import BUSY_TIMEOUT_S, NotATracesDatabaseError, checkpointer, connect, list_traces, open_checkpointer, show_trace
from pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent

# -- the traces database ----------------------------------------------------------------------
WRITER = """
import sys, time
from pathlib import Path
from typing import TypedDict
from langgraph.graph import END, START, StateGraph
from agents.traces import open_checkpointer

class State(TypedDict):
    n: int
    status: str

db, name, count, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
builder = StateGraph(State)
builder.add_node("step", lambda s: {"n": s["n"] + 1})
builder.add_node("finish", lambda s: {"status": "passed"})
builder.add_edge(START, "step")
builder.add_edge("step", "finish")
builder.add_edge("finish", END)
graph = builder.compile(checkpointer=open_checkpointer(db))
while not go.exists():
    time.sleep(0.01)
for i in range(count):
    graph.invoke({"n": i, "status": "running"}, {"configurable": {"thread_id": f"{name}-{i:03d}"}})
"""


def test_a_connection_made_while_another_writes_to_a_new_database_waits_for_it(tmp_path):
    """Switching a new database to WAL while another connection holds its write lock: SQLite answers "database is
    locked" at once (no busy wait), which failed a reader polling while two processes created the traces database."""
    db = tmp_path / "traces.sqlite"
    writer = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)  # a rollback-journal database
    writer.execute("CREATE TABLE t (x)")
    writer.execute("BEGIN IMMEDIATE")
    writer.execute("INSERT INTO t VALUES (1)")
    result: dict = {}

    def reader() -> None:
        started = time.monotonic()
        try:
            conn = connect(db)
            result["mode"] = conn.execute("PRAGMA journal_mode").fetchone()[0]
            conn.close()
        except sqlite3.Error as exc:
            result["error"] = str(exc)
        result["waited"] = time.monotonic() - started

    thread = threading.Thread(target=reader)
    thread.start()
    time.sleep(0.5)
    writer.execute("COMMIT")
    thread.join(BUSY_TIMEOUT_S)
    writer.close()
    assert result.get("mode") == "wal", result
    assert result["waited"] >= 0.4  # it waited for the writer instead of failing


def test_every_connection_uses_the_write_ahead_log_and_waits_for_other_writers(tmp_path):
    db = tmp_path / "traces.sqlite"
    conns = [connect(db), open_checkpointer(db).conn]
    with checkpointer(db) as reader:  # as `synthmed trace` and the dashboard open it
        conns.append(reader.conn)
        for conn in conns:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == int(BUSY_TIMEOUT_S * 1000)
    for conn in conns[:2]:
        conn.close()


def test_two_processes_writing_checkpoints_at_once_lose_nothing(tmp_path):
    db, go, count = tmp_path / "traces.sqlite", tmp_path / "go", 25
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), name, str(count), str(go)], cwd=REPO,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for name in ("a", "b")]
    time.sleep(0.5)
    go.touch()
    seen = 0
    while any(w.poll() is None for w in writers):  # a reader polling as the dashboard does, meanwhile
        seen = max(seen, len(list_traces(db)))
    errors = [w.communicate()[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], errors
    assert not any("locked" in e for e in errors)
    rows = list_traces(db)
    assert sorted(r["trace_id"] for r in rows) == sorted(f"{n}-{i:03d}" for n in "ab" for i in range(count))
    assert all(r["status"] == "passed" and r["steps"] == 4 for r in rows)  # input, step, finish and the start
    assert seen <= len(rows)


@pytest.fixture(scope="module")
def lexicon_kb(tmp_path_factory) -> Path:
    """The lexicon-only knowledge base `synthmed generate` opens, built once before the processes start."""
    from knowledge.open import open_knowledge_base
    from pipelines.config import load_config

    folder = tmp_path_factory.mktemp("kb") / "kb"
    open_knowledge_base(load_config(None, [f"--knowledge.index_dir={folder}", "--knowledge.case_manifests=[]"]), build_if_absent=True,
                        progress=False)
    return folder


@pytest.mark.slow
def test_two_generate_commands_at_once_share_the_traces_database(tmp_path):
    """Started together on a fresh workspace: the knowledge base is built once (the other waits for it),
    and both traces land complete in one database."""
    db, kb = tmp_path / "traces.sqlite", tmp_path / "kb"
    args = ["--modality", "cxr", "--steps", "2", "--max-rounds", "1", "--json", f"--knowledge.index_dir={kb}",
            "--knowledge.case_manifests=[]", f"--agents.traces={db}", f"--agents.out={tmp_path / 'images'}", "--agents.candidates=1"]
    texts = ["Chest X-ray: large left pleural effusion.", "Chest X-ray: right pneumothorax, no effusion."]
    procs = [subprocess.Popen([sys.executable, "-m", "pipelines.cli", "generate", text, *args], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for text in texts]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    assert sum("building it now" in err for _, err in outputs) == 1, [err[-2000:] for _, err in outputs]
    assert not list(tmp_path.glob(".kb.tmp*")) and not list(tmp_path.glob(".kb.old*"))
    records = [json.loads(out) for out, _ in outputs]
    rows = {r["trace_id"]: r for r in list_traces(db)}
    assert set(rows) == {r["trace_id"] for r in records}
    for record, text in zip(records, texts):
        row = rows[record["trace_id"]]
        assert row["text"] == text and row["status"] in ("passed", "failed") and row["steps"] >= 9
        trace = show_trace(db, record["trace_id"])
        assert trace["verdicts"] and trace["result"]["images"] == record["images"]


def test_a_traces_file_that_is_not_sqlite_is_one_clear_error(tmp_path, capsys):
    from pipelines.dashboard import data

    db = tmp_path / "traces.sqlite"
    garbage = bytes(range(256)) * 40
    db.write_bytes(garbage)
    for command in (["trace", "list"], ["trace", "show", "t1"]):
        assert main([*command, f"--agents.traces={db}"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err
        assert f"{db} is not a readable SQLite database" in err and f"mv {db} {db}.bad" in err and "empty traces database" in err
    with pytest.raises(NotATracesDatabaseError) as raised:
        open_checkpointer(db)
    assert isinstance(raised.value, sqlite3.DatabaseError)  # the dashboard's readers skip it as before
    image = tmp_path / "images" / "t1" / "a.png"
    assert data.generated_image_info(db, tmp_path / "images", [image]) == {}
    assert db.read_bytes() == garbage  # left for the person to look at
    db.rename(tmp_path / "traces.sqlite.bad")  # the fix the message gives
    assert main(["trace", "list", f"--agents.traces={db}", "--json"]) == 0 and json.loads(capsys.readouterr().out) == []


# -- the append-only logs ---------------------------------------------------------------------
def record(i: int) -> dict:
    return {"kind": "step", "epoch": i, "step": i, "loss": i / 8, "note": "x" * (i % 4 * 3000)}  # some lines span pages


def test_a_last_line_without_its_newline_is_left_out(tmp_path):
    from pipelines.dashboard.data import read_samples
    from pipelines.runs import read_metrics

    whole = "".join(json.dumps(record(i)) + "\n" for i in range(3))
    for tail in (json.dumps(record(3))[:-9], json.dumps(record(3))):  # cut mid-JSON; complete but for its newline
        (tmp_path / "metrics.jsonl").write_text(whole + tail)
        (tmp_path / "samples.jsonl").write_text(whole + tail)
        assert read_metrics(tmp_path) == [record(i) for i in range(3)]
        assert read_samples(tmp_path) == [record(i) for i in range(3)]
    (tmp_path / "metrics.jsonl").write_text(whole + json.dumps(record(3)) + "\n")
    assert read_metrics(tmp_path) == [record(i) for i in range(4)]


def test_readers_polling_a_log_being_appended_never_see_half_a_record(tmp_path):
    from pipelines.dashboard.data import read_samples
    from pipelines.improve import append_lines
    from pipelines.runs import read_metrics

    records = [record(i) for i in range(90)]
    (tmp_path / "metrics.jsonl").touch()
    (tmp_path / "samples.jsonl").touch()
    done = threading.Event()

    def write() -> None:
        for i in range(0, len(records), 3):
            append_lines(tmp_path / "metrics.jsonl", records[i:i + 3])
            append_lines(tmp_path / "samples.jsonl", records[i:i + 3])
        done.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not done.is_set() or reads < 2:
        for got in (read_metrics(tmp_path), read_samples(tmp_path)):
            assert got == records[:len(got)]  # a prefix of what was written, each record whole
        reads += 1
    writer.join()
    assert read_metrics(tmp_path) == records and read_samples(tmp_path) == records
