"""What the dashboard shows, as plain data: runs, traces, manifests, ratings, and which files may be served.

Nothing here imports Gradio; the app only calls these functions, and so can the CLI and the tests.
Every function that takes a path from a page checks it with :class:`FileGuard` first: a file is served
only from the run and data folders the app was given, never the traces database or the ratings CSV.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import math
import os
import random
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from generator.fileio import write_bytes_atomic
from pipelines.runs import (RUN_KIND, SHARE_METRICS, is_run_dir, lines_by_epoch, list_runs, read_metrics, reading_table, resolve_run,
                           show_run)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")  # what the pages show (DICOM is read, not served)
RATINGS_COLUMNS = ("image_path", "rating", "modality", "expert_level", "prompt")  # MINIM's format, rlhf.selector reads it
RATINGS_HEADER = (*RATINGS_COLUMNS, "comment")  # the selector reads the five it needs; the comment rides along
RATING_RANGE = (1, 5)


class PathRefused(ValueError):
    """A path outside the folders the app was given (or a file it never serves)."""


# -- path safety ------------------------------------------------------------------------------
@dataclass
class FileGuard:
    """The folders files may come from, and the files never served even inside them.

    ``check`` decodes URL escapes (repeatedly: ``%252e`` is ``..`` twice encoded), refuses ``..``
    parts and NUL bytes, resolves symlinks and then requires the real path to lie inside a real
    root; ``denied`` files (the traces database with its journals, the ratings CSV with its lock)
    are refused wherever they are."""

    roots: Sequence[Path]
    denied: Sequence[Path] = ()
    _roots: list[Path] = field(init=False, repr=False)
    _denied: set[Path] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._roots = [Path(r).resolve() for r in self.roots]
        denied: set[Path] = set()
        for d in self.denied:
            base = Path(d).resolve()
            denied |= {base, base.with_name(base.name + "-wal"), base.with_name(base.name + "-shm"),
                       base.with_name(base.name + "-journal"), base.with_name(base.name + ".lock")}
        self._denied = denied

    @property
    def real_roots(self) -> list[Path]:
        return list(self._roots)

    def check(self, path: str | os.PathLike, image: bool = False, must_exist: bool = True) -> Path:
        """The real path of ``path`` if it may be served; :class:`PathRefused` otherwise. Relative paths
        are taken relative to each root in turn."""
        text = str(path)
        for _ in range(5):  # undo URL encoding, however many times it was applied
            decoded = unquote(text)
            if decoded == text:
                break
            text = decoded
        if not text or "\x00" in text:
            raise PathRefused("refused: empty path or NUL byte")
        raw = Path(text)
        if ".." in raw.parts:
            raise PathRefused(f"refused: {text!r} climbs out of its folder ('..')")
        candidates = [raw] if raw.is_absolute() else [root / raw for root in self._roots]
        inside = []
        for candidate in candidates:
            real = Path(os.path.realpath(candidate))
            if any(real == root or real.is_relative_to(root) for root in self._roots):
                inside.append(real)
            elif raw.is_absolute() or os.path.lexists(candidate):
                inside = []  # an absolute path elsewhere, or a symlink out of its root
                break
        existing = [real for real in inside if real.exists()]
        if existing or (inside and not must_exist):
            real = (existing or inside)[0]
            if real in self._denied:
                raise PathRefused(f"refused: {text!r} is never served (traces database or ratings file)")
            if image and real.suffix.lower() not in IMAGE_SUFFIXES:
                raise PathRefused(f"refused: {text!r} is not an image ({', '.join(IMAGE_SUFFIXES)})")
            return real
        if inside:
            raise PathRefused(f"not found: {text!r}")
        roots = ", ".join(str(r) for r in self._roots) or "(none)"
        raise PathRefused(f"refused: {text!r} is outside the folders this dashboard serves ({roots})")

    def image(self, path: str | os.PathLike) -> Path:
        return self.check(path, image=True)


def images_in(folder: Path, limit: int = 2000) -> list[Path]:
    """Image files under ``folder``, sorted, symlinks not followed out of it."""
    found = []
    for p in sorted(folder.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.is_symlink():
            found.append(p)
            if len(found) >= limit:
                break
    return found


# -- runs -------------------------------------------------------------------------------------
def list_all_runs(runs_dir: str | Path) -> list[dict[str, Any]]:
    """Every run under ``runs_dir``: the loop's runs (``pipelines.runs.list_runs``: status, epochs,
    held-out figures) first, then other run folders that keep a metrics.jsonl or metadata.json
    (``synthmed train``, ``synthmed eval``), each with its ``kind``."""
    root = Path(runs_dir)
    rows = [r | {"kind": "improve"} for r in list_runs(root)]
    seen = {r["id"] for r in rows}
    others = []
    for folder in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), reverse=True) if root.is_dir() else []:
        if folder.name in seen or not ((folder / "metrics.jsonl").is_file() or (folder / "metadata.json").is_file()):
            continue
        meta, error = {}, None
        try:
            if (folder / "metadata.json").is_file():
                meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
                meta = meta if isinstance(meta, dict) else {}
        except (ValueError, OSError) as exc:
            error = f"{folder / 'metadata.json'}: {exc}"
        others.append({"id": folder.name, "path": str(folder), "kind": _run_kind(folder, meta),
                       "status": "unreadable" if error else meta.get("status") or "-", "started": meta.get("started"),
                       "finished": meta.get("finished"), "epochs_done": None, "epochs_planned": meta.get("epochs_planned"),
                       "last_eval_epoch": None, "all_requested_shown": None, "fd": None, "base_all_requested_shown": None,
                       "base_fd": None, "best_epoch": None, "error": error})
    return rows + others


def _run_kind(folder: Path, meta: dict) -> str:
    text = " ".join(str(meta.get(k, "")) for k in ("kind", "command")).lower()
    for kind in ("eval", "train", "improve", "synthesize"):
        if kind in text or folder.name.startswith(kind) or f"-{kind}-" in folder.name:
            return kind
    return "train"


def run_choices(runs_dir: str | Path) -> list[tuple[str, str]]:
    """(label, id) pairs for a run picker, newest improve runs first."""
    return [(f"{r['id']}  [{r['kind']}, {r['status']}]", r["id"]) for r in list_all_runs(runs_dir)]


def run_folder(run_id: str, runs_dir: str | Path) -> Path:
    """The folder of run ``run_id`` under ``runs_dir``: an id only, never a path out of it (PathRefused);
    ValueError / FileNotFoundError when there is none."""
    if not run_id:
        raise ValueError("choose a run")
    if "/" in run_id or "\\" in run_id or run_id in (".", ".."):
        raise PathRefused(f"refused: {run_id!r} is not a run id")
    folder = Path(runs_dir) / run_id
    if not folder.is_dir():
        raise FileNotFoundError(f"no run {run_id!r} in {runs_dir}")
    return folder


def open_run(run_id: str, runs_dir: str | Path) -> dict[str, Any]:
    """One run for the Runs page. A loop run: ``pipelines.runs.show_run`` plus the plot series.
    Another run: its metadata and every numeric series of its metrics.jsonl against step or epoch.
    A missing or damaged run raises FileNotFoundError / ValueError with one clear message."""
    folder = run_folder(run_id, runs_dir)
    if is_run_dir(folder):
        run = show_run(run_id, runs_dir)
        run["kind"] = "improve"
        run["series"] = improve_series(run)
        run["grids"] = epoch_images(folder / "grids")
        run["heldout_grids"] = epoch_images(folder / "heldout")
        return run
    return generic_run(folder)


UNTOUCHED_NOTE = ("what the run keeps, judged on prompts nothing that decides read (`synthmed runs test [--split N]`); each "
                  "adapter against its reading's base")


def untouched_table(run: dict) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a loop run's untouched readings for the Runs page: its test prompts as ``synthmed runs test``
    judged every adapter it keeps (``test.json``; else the run's own test lines), then each further split, a row per
    adapter (``pipelines.runs.reading_table``, with the reading in front). No rows for a run without test prompts."""
    readings = ([run["test_reading"]] if run.get("test_reading") else []) + list(run.get("splits") or [])
    mods = list(run.get("modalities") or [])
    header, out = [], []
    for reading in readings:
        header, rows = reading_table(reading, mods)
        name = "test prompts" if reading["split"] == "test" else f"split {reading['split']}"
        out += [[name, *row] for row in rows]
    return (["reading", *header] if out else ["reading"]), out


def epoch_images(folder: Path) -> list[tuple[int, str]]:
    """(epoch, path) of ``epoch_NNNN.png`` files in ``folder``, by epoch."""
    out = []
    for p in sorted(folder.glob("epoch_*.png")) if folder.is_dir() else []:
        digits = p.stem[6:]
        if digits.isdigit():
            out.append((int(digits), str(p)))
    return out


def improve_series(run: dict) -> dict[str, dict[str, list]]:
    """Plot series of a loop run: ``reward`` (each component's mean, and the total, against epoch; with the verifier's
    own classifiers, their agreement on the same rollouts as ``verifier agreement``),
    ``heldout`` (each held-out metric against epoch), ``per_modality`` (total reward per modality).
    Each is ``{name: [(epoch, value), ...]}`` with missing values left out."""
    reward: dict[str, list] = {}
    per_modality: dict[str, list] = {}
    for e in run["epochs"]:
        for name, value in e["reward"].items():
            if _is_number(value):
                reward.setdefault(name, []).append((e["epoch"], float(value)))
        value = (e.get("verifier") or {}).get("agreement")  # the verifier's own classifiers on the same rollouts, beside findings
        if _is_number(value):
            reward.setdefault("verifier agreement", []).append((e["epoch"], float(value)))
        for m, value in e["per_modality_total"].items():
            if _is_number(value):
                per_modality.setdefault(m, []).append((e["epoch"], float(value)))
    heldout: dict[str, list] = {}
    for e in run["evals"]:
        for name, value in e["overall"].items():
            if _is_number(value):
                heldout.setdefault(name, []).append((e["epoch"], float(value)))
    # what images that truly show each request score (the run's reference line): a level line across the evaluations
    reference = (run.get("reference") or {}).get("overall") or {}
    # the base drawn by the reward-guided sampler (the calibrated scale's line, else stage 2's): a level line too
    guided = run.get("guided") or {}
    levels = {"reference": reference}
    if guided:
        levels[f"reward-guided {guided.get('scale'):g}"] = guided.get("overall") or {}
    epochs = [e["epoch"] for e in run["evals"]]
    for name in SHARE_METRICS:
        for what, overall in levels.items():
            if epochs and _is_number(overall.get(name)):
                heldout[f"{name} ({what})"] = [(min(epochs), float(overall[name])), (max(epochs), float(overall[name]))]
    return {"reward": reward, "heldout": heldout, "per_modality": per_modality}


def generic_run(folder: Path) -> dict[str, Any]:
    """A run that is not the loop's: metadata and numeric series of metrics.jsonl by step (or epoch)."""
    meta = {}
    if (folder / "metadata.json").is_file():
        try:
            meta = json.loads((folder / "metadata.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ValueError(f"{folder / 'metadata.json'}: not valid JSON ({exc})") from None
    records = read_metrics(folder) if (folder / "metrics.jsonl").is_file() else []
    series: dict[str, list] = {}
    for i, r in enumerate(records):
        x = r.get("step", r.get("epoch", i))
        if not _is_number(x):
            continue
        for key, value in r.items():
            if key not in ("step", "epoch") and _is_number(value):
                series.setdefault(key, []).append((x, float(value)))
    return {"id": folder.name, "path": str(folder), "kind": _run_kind(folder, meta if isinstance(meta, dict) else {}),
            "status": (meta or {}).get("status", "-") if isinstance(meta, dict) else "-", "metadata": meta,
            "series": {"metrics": series}, "lines": len(records),
            "grids": epoch_images(folder / "grids") or [(i, str(p)) for i, p in enumerate(images_in(folder / "samples", 200))],
            "heldout_grids": [], "warnings": []}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


@dataclass
class _SamplesIndex:
    """Where each epoch's lines of one samples.jsonl are: the log is append-only, so a later look reads only
    what was appended since; a log that shrank (a resume cut it back) or was replaced is indexed anew."""

    identity: tuple[int, int]  # (device, inode)
    end: int = 0  # bytes indexed: whole lines up to here
    last: bytes = b""  # the last line indexed, ending at ``end``: still there, the log was only appended to
    lines: int = 0  # lines indexed
    epochs: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # epoch -> (offset, length, line number)


_SAMPLES_INDEX: dict[str, _SamplesIndex] = {}
_EPOCH_FIRST = re.compile(rb'\{"epoch": (\d+)[,}]')  # how the loop writes a line: its epoch first


def _samples_index(path: Path) -> _SamplesIndex:
    stat = path.stat()
    identity = (stat.st_dev, stat.st_ino)
    index = _SAMPLES_INDEX.get(str(path))
    with open(path, "rb") as f:
        if index is not None and index.identity == identity and stat.st_size >= index.end:
            f.seek(index.end - len(index.last))
            if f.read(len(index.last)) == index.last:
                if stat.st_size == index.end:
                    return index
            else:
                index = None  # cut back and written again past where it was (a resume)
        else:
            index = None
        if index is None:
            index = _SAMPLES_INDEX[str(path)] = _SamplesIndex(identity)
        f.seek(index.end)
        data = f.read(stat.st_size - index.end)
    whole = data.rfind(b"\n") + 1  # a last line without its newline is being written now
    pos = 0
    while pos < whole:
        stop = data.index(b"\n", pos)
        line, index.lines = data[pos:stop], index.lines + 1
        if line.strip():
            match = _EPOCH_FIRST.match(line)
            epoch = int(match[1]) if match else _parse_sample(line, path, index.lines).get("epoch")
            if isinstance(epoch, int) and not isinstance(epoch, bool):
                index.epochs.setdefault(epoch, []).append((index.end + pos, stop - pos, index.lines))
        pos = stop + 1
    if whole:
        index.last = data[data.rfind(b"\n", 0, whole - 1) + 1 : whole]
    index.end += whole
    return index


def read_samples(run_dir: str | Path, epoch: int | None = None, limit: int | None = None) -> list[dict]:
    """The records of a loop run's samples.jsonl, of ``epoch`` (else of every epoch), in the file's order, at most
    ``limit``: whole lines only (a line being written is left out), only those lines read and parsed."""
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return []
    index = _samples_index(path)
    spans = sorted(s for e in ([epoch] if epoch is not None else index.epochs) for s in index.epochs.get(e, []))[:limit]
    records = []
    with open(path, "rb") as f:
        for offset, length, number in spans:
            f.seek(offset)
            records.append(_parse_sample(f.read(length), path, number))
    return records


def _parse_sample(line: bytes, path: Path, number: int) -> dict:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}:{number}: not valid JSON; the samples log is damaged") from None
    if not isinstance(record, dict):
        raise ValueError(f"{path}:{number}: not a JSON object; the samples log is damaged")
    return record


def thin_points(points: Sequence[tuple[float, float]], limit: int) -> list[tuple[float, float]]:
    """At most ``limit`` of a line's points, chosen so the line looks the same: largest-triangle-three-buckets
    (Steinarsson 2013). The first and last points stay; of each bucket between, the point that makes the largest
    triangle with the point kept before it and the mean of the next bucket (peaks and dips survive)."""
    points = list(points)
    n = len(points)
    if n <= limit or limit < 3:
        return points
    every = (n - 2) / (limit - 2)
    kept, a = [points[0]], 0
    for i in range(limit - 2):
        start, end = int(i * every) + 1, int((i + 1) * every) + 1
        following = points[end : min(int((i + 2) * every) + 1, n)] or points[-1:]
        mx = sum(p[0] for p in following) / len(following)
        my = sum(p[1] for p in following) / len(following)
        ax, ay = points[a]
        a = max(range(start, end), key=lambda j: abs((ax - mx) * (points[j][1] - ay) - (ax - points[j][0]) * (my - ay)))
        kept.append(points[a])
    kept.append(points[-1])
    return kept


SAMPLE_COLUMNS = ["epoch", "index", "modality", "reward", "findings", "alignment", "selector", "quality", "advantage",
                  "selected", "request", "prompt"]


def samples_table(run_dir: str | Path, epoch: int | None = None, limit: int = 500) -> tuple[list[str], list[list[Any]], list[int]]:
    """(header, rows, epochs) of the samples log: prompt, reward and each component, advantage, selected;
    of ``epoch`` (default: the last), at most ``limit`` rows; ``epochs`` lists the epochs present."""
    path = Path(run_dir) / "samples.jsonl"
    epochs = sorted(_samples_index(path).epochs) if path.is_file() else []
    if not epochs:
        return SAMPLE_COLUMNS, [], []
    chosen = epochs[-1] if epoch is None or epoch not in epochs else epoch
    rows = []
    for s in read_samples(run_dir, chosen, limit):  # only the chosen epoch's lines are read and parsed
        comps = s.get("components") or {}
        rows.append([s.get("epoch"), s.get("index"), s.get("modality"), _round(s.get("reward")),
                     *(_round(comps.get(c)) for c in ("findings", "alignment", "selector", "quality")),
                     _round(s.get("advantage")), bool(s.get("selected")), s.get("request", ""), s.get("prompt", "")])
    return SAMPLE_COLUMNS, rows, epochs


def _round(value: Any, digits: int = 4) -> Any:
    return round(float(value), digits) if _is_number(value) else None


def compare_runs(first: str, second: str, runs_dir: str | Path) -> dict[str, Any]:
    """Two loop runs side by side: each one's series and a table, one row per run: status, epochs, best
    epoch and, per held-out metric (mean of modalities), "base → best (or last) evaluation"."""
    runs = [open_run(first, runs_dir), open_run(second, runs_dir)]
    table = []
    for run in runs:
        gain = run.get("gain") or {}
        mean = (gain.get("rows") or {}).get("mean", {})
        table.append({"id": run["id"], "status": run["status"], "epochs": run.get("epochs_done"),
                      "best_epoch": run.get("best_epoch"), "compared_epoch": gain.get("epoch"),
                      **{m: f"{_fmt(v.get('base'))} → {_fmt(v.get('after'))}" for m, v in mean.items()}})
    return {"runs": runs, "table": table}


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


# -- traces -----------------------------------------------------------------------------------
class TraceIndex:
    """The rows of ``agents.traces.list_traces`` for one database, kept between page opens: a trace
    whose number of checkpoints has not changed is not read again, so opening the Traces page with
    thousands of traces costs one SQL query plus the new or still-running ones."""

    def __init__(self, db: str | Path):
        self.db = Path(db)
        self._rows: dict[str, tuple[int, dict]] = {}

    def rows(self) -> list[dict]:
        """Every trace, newest first."""
        from agents.traces import checkpointer

        if not self.db.is_file():
            return []
        with checkpointer(self.db) as saver:
            counts = saver.conn.execute(
                "SELECT thread_id, COUNT(*), MIN(checkpoint_id) FROM checkpoints WHERE checkpoint_ns = '' "
                "GROUP BY thread_id ORDER BY MIN(checkpoint_id)").fetchall()
            fresh: dict[str, tuple[int, dict]] = {}
            for trace_id, count, first_id in counts:
                cached = self._rows.get(trace_id)
                if cached and cached[0] == count:
                    fresh[trace_id] = cached
                    continue
                # two checkpoints read per trace (the newest holds the state, the oldest the start time),
                # not every step as walking saver.list would
                newest = saver.get_tuple({"configurable": {"thread_id": trace_id}})
                oldest = saver.get_tuple({"configurable": {"thread_id": trace_id, "checkpoint_ns": "", "checkpoint_id": first_id}})
                state = dict(newest.checkpoint.get("channel_values") or {}) if newest else {}
                fresh[trace_id] = (count, {
                    "trace_id": trace_id, "started": oldest.checkpoint.get("ts") if oldest else None,
                    "finished": newest.checkpoint.get("ts") if newest else None, "steps": count,
                    "modality": (state.get("request") or {}).get("modality") or state.get("modality"),
                    "status": state.get("status", "running"), "rounds": len(state.get("verdicts") or []),
                    "text": state.get("text", "")})
        self._rows = fresh
        return [row for _, row in reversed(list(fresh.values()))]


def filter_traces(rows: Iterable[dict], modality: str | None = None, status: str | None = None, text: str | None = None) -> list[dict]:
    """Rows of one modality and status whose request or id contains ``text`` (case-insensitive)."""
    needle = (text or "").strip().lower()
    return [r for r in rows
            if (not modality or r.get("modality") == modality) and (not status or r.get("status") == status)
            and (not needle or needle in (r.get("text") or "").lower() or needle in r["trace_id"].lower())]


def open_trace(db: str | Path, trace_id: str, guard: FileGuard | None = None) -> dict[str, Any]:
    """``agents.traces.show_trace`` plus the text ``synthmed trace show`` prints and the candidates'
    images that may be served (``images``: (path, caption) pairs; ``missing``: those refused or gone)."""
    from agents.traces import TraceNotFoundError, format_trace, show_trace

    if not trace_id:
        raise ValueError("choose a trace")
    try:
        trace = show_trace(Path(db), trace_id)
    except TraceNotFoundError as exc:
        raise FileNotFoundError(str(exc)) from None
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"{db}: the traces database cannot be read ({exc})") from None
    trace["text_view"] = format_trace(trace, hits_per_query=5)
    images, missing = [], []
    for verdict in trace.get("verdicts") or []:
        by_index = {c["candidate"]: c for c in verdict.get("candidates") or []}
        for c in by_index.values():
            path = c.get("path")
            if not path:
                continue
            caption = (f"round {verdict['round']} · {Path(path).name} · {'pass' if c.get('passed') else 'fail'} · "
                       f"score {c.get('score', 0):.3f}" + (" · best" if c["candidate"] == verdict.get("best") else ""))
            try:
                path = os.path.abspath(path)  # the graph wrote it relative to the folder it ran in
                images.append((str(guard.image(path) if guard else Path(path)), caption))
            except PathRefused as exc:
                missing.append(f"{path}: {exc}")
    trace["images"], trace["missing_images"] = images, missing
    return trace


def retrieval_rows(records: Iterable[dict], hits_per_query: int = 5) -> list[list[Any]]:
    """One row per retrieval hit (``RETRIEVAL_COLUMNS``) of retrieval records (``agents.schema.RetrievalRecord``
    dumped: a state's ``retrievals``, or the values of ``show_trace``'s, flattened)."""
    rows = []
    for r in records:
        for rank, h in enumerate((r.get("hits") or [])[:hits_per_query], 1):
            codes = ", ".join(f"{k}:{v}" for k, v in (h.get("codes") or {}).items())
            rows.append([r.get("stage"), r.get("query", ""), rank, _round(h.get("score")), _round(h.get("dense")),
                         _round(h.get("exact")), h.get("id"), h.get("kind"), h.get("source"), codes])
    return rows


RETRIEVAL_COLUMNS = ["stage", "query", "rank", "score", "dense", "exact", "id", "kind", "source", "codes"]


# -- manifests --------------------------------------------------------------------------------
def find_manifests(data_dirs: Sequence[str | Path], depth: int = 3) -> list[str]:
    """Manifest CSVs (``*.csv`` whose header names a path column) under the data folders, ``depth`` deep."""
    found = []
    for root in (Path(d) for d in data_dirs):
        if root.is_file() and root.suffix.lower() == ".csv":
            found.append(str(root))
            continue
        for level in range(depth + 1):
            for p in sorted(root.glob("/".join(["*"] * level + ["*.csv"]))) if root.is_dir() else []:
                if p.name.endswith(".skipped.csv"):
                    continue
                try:
                    with open(p, encoding="utf-8-sig") as f:
                        header = f.readline().lower()
                except (OSError, UnicodeDecodeError):
                    continue
                if "path" in header and ("text" in header or "report" in header or "caption" in header):
                    found.append(str(p))
    return list(dict.fromkeys(found))


_MANIFEST_CACHE: dict[str, tuple[tuple[int, float], list[dict], list[str]]] = {}


def read_manifest(path: str | Path, guard: FileGuard | None = None) -> tuple[list[dict], list[str]]:
    """Every row of a manifest (``generator.data.sources.iter_manifest``) as a dict (path, text, modality,
    findings, source), with the reasons for rows it skipped. Cached until the file changes."""
    from generator.data.errors import BadRows, DataError
    from generator.data.sources import iter_manifest

    path = guard.check(path) if guard else Path(path)
    if path.suffix.lower() != ".csv":
        raise ValueError(f"{path}: a manifest is a CSV file")
    stat = path.stat()
    key = (stat.st_size, stat.st_mtime)
    cached = _MANIFEST_CACHE.get(str(path))
    if cached and cached[0] == key:
        return cached[1], cached[2]
    bad = BadRows(skip=True)
    try:
        rows = [{"path": r.path, "text": r.text, "modality": r.modality, "findings": r.findings, "source": r.source, "row": r.row}
                for r in iter_manifest(path, bad=bad, check_files=False)]
    except (DataError, UnicodeDecodeError, csv.Error) as exc:
        raise ValueError(f"{path}: cannot read this manifest ({exc})") from None
    skipped = [f"row {s.row}: {s.reason}" for s in bad.rows]
    _MANIFEST_CACHE[str(path)] = (key, rows, skipped)
    return rows, skipped


def finding_names(rows: Iterable[dict]) -> list[str]:
    return sorted({f.get("name") for r in rows for f in r.get("findings") or [] if f.get("present", True) and f.get("name")})


def filter_manifest(rows: Iterable[dict], modality: str | None = None, finding: str | None = None) -> list[dict]:
    """Rows of ``modality`` showing ``finding`` (present); "normal" means no present finding."""
    out = []
    for r in rows:
        if modality and r["modality"] != modality:
            continue
        present = {f.get("name") for f in r.get("findings") or [] if f.get("present", True)}
        if finding == "normal" and present:
            continue
        if finding and finding != "normal" and finding not in present:
            continue
        out.append(r)
    return out


# -- rating -----------------------------------------------------------------------------------
@dataclass
class RateItem:
    path: str  # real path of the image
    modality: str | None
    prompt: str
    origin: str  # generated / real


def generated_image_info(traces: str | Path, outputs: str | Path, images: Sequence[Path]) -> dict[str, tuple[str, str]]:
    """{real image path: (prompt, modality)} for images the agent graph drew under ``outputs/<trace id>/``,
    read from their traces (agents.traces.show_trace); images without a readable trace are left out."""
    from agents.traces import TraceNotFoundError, show_trace

    outputs = Path(os.path.realpath(outputs))
    by_trace: dict[str, list[Path]] = {}
    for image in images:
        real = Path(os.path.realpath(image))
        if real.is_relative_to(outputs) and len(real.relative_to(outputs).parts) > 1:
            by_trace.setdefault(real.relative_to(outputs).parts[0], []).append(real)
    info: dict[str, tuple[str, str]] = {}
    if not by_trace or not Path(traces).is_file():
        return info
    for trace_id in by_trace:
        try:
            trace = show_trace(Path(traces), trace_id)
        except (TraceNotFoundError, sqlite3.DatabaseError):
            continue
        modality = (trace["stages"].get("parse_request") or {}).get("modality") or ""
        for c in trace.get("candidates") or []:
            if c.get("path"):
                info[os.path.realpath(c["path"])] = (c.get("prompt") or (trace.get("composition") or {}).get("prompt", ""), modality)
    return info


def rating_items(source: str, guard: FileGuard, kind: str = "folder", real_manifest: str | None = None, real_count: int = 0,
                 shuffle: bool = False, seed: int = 0, limit: int = 500, traces: str | Path | None = None,
                 outputs: str | Path | None = None) -> list[RateItem]:
    """Images to rate: every image in a folder (``kind="folder"``) or loop run (``"run"``: its grids and
    held-out sheets, plots left out), or the rows of a manifest (``"manifest"``); optionally with
    ``real_count`` rows of ``real_manifest`` mixed in, and shuffled with ``seed``. Images the agent graph
    drew (under ``outputs``) get their prompt and modality from their trace in ``traces``."""
    items: list[RateItem] = []
    if kind == "manifest":
        rows, _ = read_manifest(source, guard)
        items = [RateItem(str(guard.image(r["path"])), r["modality"], r["text"], "real") for r in rows[:limit]
                 if Path(r["path"]).suffix.lower() in IMAGE_SUFFIXES]
    elif kind in ("folder", "run"):
        folder = guard.check(source)
        if not folder.is_dir():
            raise ValueError(f"{source}: not a folder")
        found = [p for p in images_in(folder, limit) if not (kind == "run" and "plots" in p.relative_to(folder).parts)]
        known = generated_image_info(traces, outputs, found) if traces and outputs else {}
        for p in found:
            real = guard.image(p)
            prompt, modality = known.get(str(real), (_sidecar_prompt(p), None))
            items.append(RateItem(str(real), modality, prompt, "generated"))
    else:
        raise ValueError(f"unknown source kind {kind!r}: folder, run or manifest")
    if real_manifest and real_count > 0:
        rows, _ = read_manifest(real_manifest, guard)
        rng = random.Random(seed)
        picked = rng.sample(rows, min(real_count, len(rows)))
        items += [RateItem(str(guard.image(r["path"])), r["modality"], r["text"], "real") for r in picked]
    if shuffle:
        random.Random(seed).shuffle(items)
    if not items:
        raise ValueError(f"no images to rate in {source}")
    return items


def _sidecar_prompt(image: Path) -> str:
    """The prompt written beside an image (``x.txt`` or ``x.json`` with a prompt), else ''."""
    txt = image.with_suffix(".txt")
    if txt.is_file():
        return txt.read_text(encoding="utf-8", errors="replace").strip()
    meta = image.with_suffix(".json")
    if meta.is_file():
        try:
            value = json.loads(meta.read_text(encoding="utf-8"))
            return str(value.get("prompt", "")) if isinstance(value, dict) else ""
        except ValueError:
            return ""
    return ""


def append_rating(csv_path: str | Path, image_path: str | Path, rating: int, modality: str, expert_level: str, prompt: str = "",
                  comment: str = "", expert_levels: Sequence[str] = ("junior", "senior", "expert"),
                  modalities: Any = None) -> dict[str, str]:
    """Add one rating to the ratings CSV (MINIM's ``image_path,rating,modality,expert_level,prompt``, then
    ``comment``), atomically: under an exclusive lock the file is rewritten beside itself with the new
    row, fsynced and renamed into place, so a crash leaves either the old file or the new one, never a
    half row. ``image_path`` is written relative to the CSV's folder, as ``rlhf.selector.read_ratings``
    reads it. Returns the row written."""
    from generator.modalities import resolve_modality

    if not isinstance(rating, int) or isinstance(rating, bool) or not RATING_RANGE[0] <= rating <= RATING_RANGE[1]:
        raise ValueError(f"a rating is a whole number from {RATING_RANGE[0]} to {RATING_RANGE[1]}, got {rating!r}")
    level = (expert_level or "").strip().lower()
    if level not in expert_levels:
        raise ValueError(f"unknown expert level {expert_level!r}; known: {', '.join(expert_levels)}")
    if not modality:
        raise ValueError("choose the image's modality")
    modality = resolve_modality(modality, modalities)
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    image = Path(image_path).resolve()
    relative = os.path.relpath(image, csv_path.parent.resolve())
    row = {"image_path": relative, "rating": str(rating), "modality": modality, "expert_level": level,
           "prompt": " ".join((prompt or "").split()), "comment": " ".join((comment or "").split())}
    lock_path = csv_path.with_name(csv_path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            old = csv_path.read_bytes() if csv_path.is_file() else b""
            buffer = io.StringIO()
            writer = csv.writer(buffer, lineterminator="\n")
            if not old:
                writer.writerow(RATINGS_HEADER)
            elif not old.endswith(b"\n"):
                buffer.write("\n")
            writer.writerow([row[c] for c in RATINGS_HEADER])
            write_bytes_atomic(csv_path, old + buffer.getvalue().encode("utf-8"))
            dir_fd = os.open(csv_path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the rename itself survives a power cut
            finally:
                os.close(dir_fd)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return row


def read_ratings_rows(csv_path: str | Path) -> list[dict[str, str]]:
    """The rows of a ratings CSV as written (no normalisation); [] when there is none yet."""
    from generator.data.sources import csv_encoding, csv_read_error
    from generator.errors import UserError

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        return []
    try:
        with open(csv_path, newline="", encoding=csv_encoding(csv_path)) as f:
            return list(csv.DictReader(f))
    except (UnicodeError, csv.Error) as exc:
        raise UserError(csv_read_error(csv_path, exc, "ratings CSV")) from None


__all__ = [
    "RATINGS_HEADER",
    "RETRIEVAL_COLUMNS",
    "RUN_KIND",
    "SAMPLE_COLUMNS",
    "FileGuard",
    "PathRefused",
    "RateItem",
    "TraceIndex",
    "append_rating",
    "compare_runs",
    "epoch_images",
    "filter_manifest",
    "filter_traces",
    "find_manifests",
    "finding_names",
    "images_in",
    "improve_series",
    "lines_by_epoch",
    "list_all_runs",
    "open_run",
    "open_trace",
    "rating_items",
    "read_manifest",
    "read_ratings_rows",
    "resolve_run",
    "run_folder",
    "retrieval_rows",
    "run_choices",
    "read_samples",
    "samples_table",
    "thin_points",
]
