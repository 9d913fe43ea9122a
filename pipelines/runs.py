"""Reading the run directories of ``synthmed improve``: plain data for ``synthmed runs`` and the plots.

A run directory (``runs/<id>/``) is written by the loop and only read here:

- ``metadata.json``: ``{"kind": "synthmed improve run", "status", "started", "epochs_planned", ...}``;
- ``metrics.jsonl``: append-only, one object per line, each with a ``kind``: ``step`` (one optimiser
  step), ``epoch`` (reward statistics and timing), ``eval`` (held-out metrics; epoch 0 is the base
  model), ``reference`` (once, at epoch 0: the same metrics for images that truly show each held-out
  request, phantoms drawn to it or real images with its labels: how far the held-out share can rise),
  ``guard`` (reward hacking suspected) and ``end``;
- ``grids/epoch_NNNN.png``, ``plots/*.png``, ``checkpoints/epoch_NNNN/``, ``final/``, ``best/``.

A line counts once its newline is written: the loop appends whole lines, newline included, in one
write, so a last line without one is being written now (or the run was killed mid-write) and is left
out, silently: a reader polling a running run never sees half a record. A complete line that is not
a JSON object is an error that names the file and line. Where a resumed run logged an epoch twice,
the later line wins.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

from generator.errors import UserError

log = logging.getLogger(__name__)

RUN_KIND = "synthmed improve run"  # metadata.json "kind" of a run directory
LINE_KINDS = ("step", "epoch", "eval", "reference", "guided", "test", "guard", "end")  # the "kind"s of metrics.jsonl lines
TIMING_PARTS = ("sampling", "reward", "update", "guided", "selection", "total")  # an epoch line's "seconds"


# -- files ------------------------------------------------------------------------------------
def complete_lines(path: Path) -> list[str]:
    """The lines of ``path`` that end in a newline; a last line without one (a writer mid-append) is left out."""
    data = path.read_bytes()
    try:
        return data[:data.rfind(b"\n") + 1].decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}); the file was damaged or written by something else") from None


def _read_jsonl(path: Path) -> list[dict]:
    """The objects of the complete lines of a JSON-lines file."""
    records = []
    for number, line in enumerate(complete_lines(path), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number}: not valid JSON ({exc.msg}); only a line still being written may be "
                            "incomplete, so this file was damaged or written by something else") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        records.append(record)
    return records


def _load_metrics(run_dir: Path) -> list[dict]:
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory {run_dir}")
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []  # started, nothing logged yet
    return _read_jsonl(path)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every line of ``run_dir/metrics.jsonl`` in order ([] when the run has logged nothing yet)."""
    return _load_metrics(Path(run_dir))


def _read_metadata(run_dir: Path) -> dict | None:
    path = run_dir / "metadata.json"
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg})") from None
    return meta if isinstance(meta, dict) else None


def is_run_dir(folder: Path) -> bool:
    """A ``synthmed improve`` run: its metadata.json says so, or, before the metadata is written, its
    metrics.jsonl starts with one of the loop's lines. (``synthmed train`` runs share ``runs/`` and
    also keep a metrics.jsonl, without ``kind``s.)"""
    try:
        meta = _read_metadata(folder)
    except ValueError:
        meta = None
    if meta is not None:
        return meta.get("kind") == RUN_KIND
    metrics = folder / "metrics.jsonl"
    if not metrics.is_file():
        return False
    with open(metrics, encoding="utf-8") as f:
        first = f.readline()
    try:
        return json.loads(first).get("kind") in LINE_KINDS
    except (json.JSONDecodeError, AttributeError):
        return False


# -- one run ----------------------------------------------------------------------------------
def lines_by_epoch(records: list[dict], kind: str) -> list[dict]:
    """The ``kind`` lines, one per epoch (the later of two wins), by epoch."""
    out = {r["epoch"]: r for r in records if r.get("kind") == kind and isinstance(r.get("epoch"), int)}
    return [out[e] for e in sorted(out)]


def keys_in_order(dicts: list[dict], skip: tuple[str, ...] = ()) -> list[str]:
    seen: dict[str, None] = {}
    for d in dicts:
        for key in d or {}:
            if key not in skip:
                seen.setdefault(key, None)
    return list(seen)


def _mean(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return sum(numbers) / len(numbers) if numbers else None


def best_epoch(evals: list[dict]) -> int | None:
    # An eval line is marked best when it beat every earlier one, so the last mark is the best.
    marked = [e["epoch"] for e in evals if e.get("best")]
    return marked[-1] if marked else None


def _status(meta: dict, end: dict | None) -> str:
    if end is not None and end.get("status"):
        return end["status"]
    return meta.get("status") or "unknown"


def summarise(run_dir: Path, records: list[dict], meta: dict) -> dict[str, Any]:
    """The parts of a run both ``list_runs`` and ``show_run`` report."""
    epochs, evals = lines_by_epoch(records, "epoch"), lines_by_epoch(records, "eval")
    ends = [r for r in records if r.get("kind") == "end"]
    end = ends[-1] if ends else None
    base = next((e for e in evals if e["epoch"] == 0), None)
    last = evals[-1] if evals else None

    def overall(record: dict | None, key: str) -> Any:
        return (record.get("overall") or {}).get(key) if record else None

    return {
        "id": run_dir.name, "path": str(run_dir), "status": _status(meta, end),
        "started": meta.get("started"), "finished": meta.get("finished"),
        "epochs_done": epochs[-1]["epoch"] if epochs else 0, "epochs_planned": meta.get("epochs_planned"),
        "last_eval_epoch": last["epoch"] if last else None,
        "all_requested_shown": overall(last, "all_requested_shown"), "fd": overall(last, "fd"),
        "base_all_requested_shown": overall(base, "all_requested_shown"), "base_fd": overall(base, "fd"),
        "best_epoch": best_epoch(evals),
        "policy": kept_policy(run_dir, evals),
    }


def kept_policy(run_dir: Path, evals: list[dict]) -> dict[str, Any] | None:
    """The run's adapter with the highest held-out share of images showing every requested finding, among what it
    keeps, each already chosen on the held-out set within the gain's terms: best/ (its best evaluation), scaled/
    (`synthmed runs scale`) and steered/ (`synthmed runs steer`); a later one only where it is strictly higher. None
    before best/ moved past the base. ``{"name", "label", "folder", "heldout_all_requested_shown"}``."""
    found = []
    best = best_epoch(evals)
    line = next((e for e in evals if e["epoch"] == best), None)
    if best and (run_dir / "best").is_dir() and line is not None:
        found.append(("best", f"best/ (epoch {best})", (line.get("overall") or {}).get("all_requested_shown")))
    for name, file, key in ((SCALED_ADAPTER, SCALE_FILE, "scale"), (STEERED_ADAPTER, STEER_FILE, "gamma")):
        record = _read_json(run_dir / file) if (run_dir / name).is_dir() else None
        if isinstance(record, dict) and isinstance(record.get(key), (int, float)):
            on = record.get("adapter") if record.get("adapter") not in (None, "none") else ("base" if name == STEERED_ADAPTER else None)
            label = f"{name}/ (" + ("a gamma per modality" if record.get("modality_gammas") else f"x{record[key]:g}") + (f" on {on}" if on else "") + ")"
            found.append((name, label, ((record.get("heldout") or {}).get("chosen") or {}).get("all_requested_shown")))
    kept = None
    for name, label, share in found:
        if isinstance(share, (int, float)) and (kept is None or share > kept["heldout_all_requested_shown"]):
            kept = {"name": name, "label": label, "folder": str(run_dir / name), "heldout_all_requested_shown": share}
    return kept


def _paths(run_dir: Path, best: int | None) -> dict[str, Any]:
    def files(folder: str, pattern: str) -> list[str]:
        return [str(p) for p in sorted((run_dir / folder).glob(pattern)) if p.is_file()]

    def folder(name: str) -> str | None:
        return str(run_dir / name) if (run_dir / name).is_dir() else None

    def existing(name: str) -> str | None:
        return str(run_dir / name) if (run_dir / name).is_file() else None

    # checkpoints/epoch_NNNN only: a checkpoint still being written has another name
    checkpoints = sorted(p for p in (run_dir / "checkpoints").glob("epoch_*") if p.is_dir() and p.name[6:].isdigit())
    return {
        "config": existing("config.yaml"), "metadata": existing("metadata.json"), "metrics": existing("metrics.jsonl"),
        "samples": existing("samples.jsonl"), "plots": files("plots", "*.png"), "grids": files("grids", "epoch_*.png"),
        "final": folder("final"), "best": folder("best"), "best_epoch": best, "guidance": existing(GUIDANCE_FILE),
        "scale": existing(SCALE_FILE), "scaled": folder(SCALED_ADAPTER),  # `synthmed runs scale` (pipelines.adapter_scale)
        "offset_table": existing(OFFSET_TABLE_FILE),
        "steer": existing(STEER_FILE), "steered": folder(STEERED_ADAPTER),  # `synthmed runs steer` (pipelines.table_steer)
        "tests": [str(p) for p in sorted(run_dir.glob("test*.json")) if p.is_file()],  # `synthmed runs test [--split N]`
        "checkpoints": [str(p) for p in checkpoints],
    }


def _read_json(path: Path) -> Any:
    """A JSON file of the run folder, None when it is absent or unreadable (said once, in the log)."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("%s is unreadable (%s); it is left out", path, exc)
        return None


def _mean_of(stats: Any) -> Any:
    return stats.get("mean") if isinstance(stats, dict) else stats


def _epoch_row(epoch: dict, steps: list[dict], modalities: list[str]) -> dict[str, Any]:
    reward = epoch.get("reward") or {}
    per_modality = epoch.get("per_modality") or {}
    ddpo = [s for s in steps if s.get("stage", "ddpo") == "ddpo"]
    return {
        "epoch": epoch["epoch"], "n_samples": epoch.get("n_samples"), "selected": epoch.get("selected"),
        "reward": {name: _mean_of(stats) for name, stats in reward.items()},
        # stage 2's reward-guided drafts (improve.selection.source=guided), judged by the same reward; None otherwise
        "guided_reward": ({name: _mean_of(stats) for name, stats in epoch["guided_reward"].items()}
                          if epoch.get("guided_reward") else None),
        # improve.selection.target=table: the guided drafts the offset table is fitted to so far, and its R2 per step
        "offset_table": epoch.get("offset_table"),
        # the verifier's own classifiers on the rollouts (agreement, pass share); None when the verifier is the reward's
        "verifier": {name: _mean_of(stats) for name, stats in epoch["verifier"].items()} if epoch.get("verifier") else None,
        "per_modality_total": {m: _mean_of((per_modality.get(m) or {}).get("total")) for m in modalities},
        "steps": len(steps), "approx_kl": _mean([s.get("approx_kl") for s in ddpo]),
        "clipfrac": _mean([s.get("clipfrac") for s in ddpo]), "seconds": (epoch.get("seconds") or {}).get("total"),
    }


def _eval_row(record: dict, modalities: list[str], best: int | None) -> dict[str, Any]:
    per_modality = record.get("per_modality") or {}
    return {
        "epoch": record["epoch"], "base": record["epoch"] == 0, "best": record["epoch"] == best,
        "overall": dict(record.get("overall") or {}),
        "all_requested_shown": {m: (per_modality.get(m) or {}).get("all_requested_shown") for m in modalities},
        "seconds": record.get("seconds"),
    }


def resolve_run(run: str | Path, runs_dir: str | Path = "runs") -> Path:
    """A run directory from a path or an id under ``runs_dir``; FileNotFoundError names the known runs."""
    as_path = Path(run)
    # A bare id is looked up under runs_dir first; anything with a separator is a path.
    candidates = [as_path] if len(as_path.parts) > 1 else [Path(runs_dir) / as_path, as_path]
    for candidate in candidates:
        if (candidate / "metrics.jsonl").is_file() or (candidate / "metadata.json").is_file():
            if not is_run_dir(candidate):
                raise UserError(f"{candidate} is not a synthmed improve run (its metadata.json kind is not "
                                f"{RUN_KIND!r}, or its metrics.jsonl has no loop lines)")
            return candidate
    empty = next((c for c in candidates if c.is_dir()), None)
    if empty is not None:
        raise FileNotFoundError(f"{empty} holds neither metrics.jsonl nor metadata.json: not a run directory")
    known = [r["id"] for r in list_runs(runs_dir)]
    listing = ", ".join(known[:20]) + (f", ... ({len(known)} in all)" if len(known) > 20 else "")
    raise FileNotFoundError(f"no run {str(run)!r} in {runs_dir}; "
                            + (f"known runs (newest first): {listing}" if known else "it holds no runs yet"))


def show_run(run: str | Path, runs_dir: str | Path = "runs") -> dict[str, Any]:
    """Everything about one run: its epochs (reward means), evaluations (held-out metrics), guard
    messages, how it ended, where its files are and where the time went."""
    run_dir = resolve_run(run, runs_dir)
    meta = _read_metadata(run_dir) or {}
    records = _load_metrics(run_dir)
    summary = summarise(run_dir, records, meta)
    epochs, evals = lines_by_epoch(records, "epoch"), lines_by_epoch(records, "eval")
    steps = [r for r in records if r.get("kind") == "step"]
    components = keys_in_order([e.get("reward") for e in epochs], skip=("total",))
    modalities = keys_in_order([e.get("per_modality") for e in epochs + evals])
    ends = [r for r in records if r.get("kind") == "end"]
    reference = reference_line(records)
    steps_by_epoch: dict[int, list[dict]] = {}
    for s in steps:
        steps_by_epoch.setdefault(s.get("epoch"), []).append(s)
    timed = [e.get("seconds") or {} for e in epochs]
    guided = guided_lines(records)
    return {
        **summary,
        "metadata": meta, "components": components, "modalities": modalities,
        "epochs": [_epoch_row(e, steps_by_epoch.get(e["epoch"], []), modalities) for e in epochs],
        "evals": [_eval_row(e, modalities, summary["best_epoch"]) for e in evals],
        "reference": reference,
        "guided": guided_line(records),
        # the calibration's scales (improve.eval.guidance_scales), each marked calibrated or why not; None without one
        "calibration": guided if any(r.get("calibrated") is not None for r in guided) else None,
        "gain": gain_table(evals, summary["best_epoch"], reference),
        "findings": finding_table(evals, summary["best_epoch"], reference),
        "test": test_rows(records, modalities),
        "scale": _read_json(run_dir / SCALE_FILE),  # `synthmed runs scale`: the adapter's strength chosen on the held-out set
        "steer": _read_json(run_dir / STEER_FILE),  # `synthmed runs steer`: the offset table's gamma chosen on the held-out set
        # `synthmed runs test`: the test prompts, every adapter kept (test.json; else the run's own test lines)
        "test_reading": test_reading(run_dir, modalities, records),
        "splits": split_readings(run_dir, modalities),  # `synthmed runs test --split N`: further untouched splits
        "guards": [{"epoch": r.get("epoch"), "message": r.get("message", "")} for r in records if r.get("kind") == "guard"],
        "end": {k: ends[-1].get(k) for k in ("epoch", "status", "message")} if ends else None,
        "steps": {"count": len(steps),
                  "last_step": max((s["step"] for s in steps if isinstance(s.get("step"), int)), default=None)},
        "timing": {"epochs": len(timed), **{part: _mean([t.get(part) for t in timed]) for part in TIMING_PARTS},
                   "eval": _mean([e.get("seconds") for e in evals])},
        "paths": _paths(run_dir, summary["best_epoch"]),
    }


SHARE_METRICS = ("all_requested_shown", "requested_shown", "finding_accuracy")  # shares with a ceiling the reference measures
GAIN_METRICS = ("all_requested_shown", "requested_shown", "finding_accuracy", "fd", "ms_ssim", "clip_score", "selector_quality",
                "memorised_share")


def test_rows(records: list[dict], modalities: list[str]) -> list[dict[str, Any]]:
    """The untouched test prompts' figures (``test`` lines: the base at epoch 0, with guided drafts or a guidance
    calibration also the base drawn by the guided sampler (adapter ``guided``, with its ``scale``), final/ and best/ at the
    end; the last line per adapter counts), base first: ``[{"adapter", "epoch", "scale", "overall", "all_requested_shown":
    {modality: share}}]``."""
    last: dict[str, dict] = {}
    for r in records:
        if r.get("kind") == "test":
            last[r.get("adapter", "?")] = r
    order = {"base": 0, "guided": 1, "best": 2, "final": 3, "scaled": 4, "steered": 5}
    return [{"adapter": a, "epoch": r.get("epoch"), "scale": r.get("scale"), "overall": dict(r.get("overall") or {}),
             **({"gamma": r["gamma"], **({"gammas": r["gammas"]} if r.get("gammas") else {}), "steers": r.get("steers"),
                 "table_epoch": r.get("table_epoch")} if "gamma" in r else {}),
             "all_requested_shown": {m: ((r.get("per_modality") or {}).get(m) or {}).get("all_requested_shown") for m in modalities}}
            for a, r in sorted(last.items(), key=lambda kv: order.get(kv[0], len(order)))]


def _gain_terms(run_dir: Path) -> tuple[float, float | None]:
    """The run's gain terms (improve.guard: FD no more than ``fd_tolerance`` worse than the base's, MS-SSIM within a
    prompt no more than ``best_ms_ssim_rise`` above it), read from its config.yaml; the defaults where it says nothing."""
    import yaml

    from rlhf.config import GuardConfig

    default = GuardConfig()
    try:
        guard = ((yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("improve") or {}).get("guard") or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError, AttributeError) as exc:  # AttributeError: not a mapping
        log.warning("%s/config.yaml is unreadable (%s); the gain's default terms are used", run_dir, exc)
        guard = {}
    fd = guard.get("fd_tolerance", default.fd_tolerance)
    rise = guard.get("best_ms_ssim_rise", default.best_ms_ssim_rise)
    return float(fd), (None if rise is None else float(rise))


def outside_gain_terms(fd: float | None, ms_ssim: float | None, base_fd: float | None, base_ms_ssim: float | None,
                       fd_tolerance: float, ms_ssim_rise: float | None) -> str | None:
    """Which of the gain's terms images break against the base's (FD more than ``fd_tolerance`` worse, MS-SSIM within a
    prompt more than ``ms_ssim_rise`` above; None: no MS-SSIM term), or None when they keep both; an unknown figure breaks
    nothing."""
    if fd is not None and base_fd is not None and fd > base_fd * (1 + fd_tolerance):
        return f"FD {fd:.2f} more than {fd_tolerance:.0%} worse than the base's {base_fd:.2f}"
    if ms_ssim_rise is not None and ms_ssim is not None and base_ms_ssim is not None and ms_ssim > base_ms_ssim + ms_ssim_rise:
        return f"MS-SSIM {ms_ssim:.3f} more than {ms_ssim_rise} above the base's {base_ms_ssim:.3f}"
    return None


def split_readings(run_dir: Path, modalities: list[str]) -> list[dict[str, Any]]:
    """The run's further untouched splits (``test_splitN.json``, by N), each adapter against the split's own base:
    ``[{"split", "prompts", "images_per_prompt", "path", "rows": [test_rows' row + "change" (the share of images
    showing every requested finding, minus the base's), "fd_change" (relative), "ms_ssim_change", "within_terms" (FD and
    MS-SSIM within the run's gain terms, None for the base), "outside" (which term it broke, :func:`outside_gain_terms`)]}]``."""
    found = []
    for path in run_dir.glob("test_split*.json"):
        n = path.stem[len("test_split"):]
        data = _read_json(path) if n.isdigit() else None
        if isinstance(data, dict) and isinstance(data.get("results"), list):
            found.append((int(n), path, data))
    if not found:
        return []
    terms = _gain_terms(run_dir)
    return [_reading(n, path, data, modalities, *terms) for n, path, data in sorted(found, key=lambda f: f[0])]


def test_reading(run_dir: Path, modalities: list[str], records: list[dict] | None = None) -> dict[str, Any] | None:
    """The run's own test prompts as ``synthmed runs test`` last judged them (``test.json``: its base, best/ and final/,
    and scaled/ and steered/ where ``runs scale`` and ``runs steer`` kept them), in :func:`split_readings`' form with
    ``split`` "test"; before ``runs test`` ran, the run's own ``test`` lines of ``records`` (its metrics.jsonl, with
    ``path`` naming it), else None."""
    path = run_dir / "test.json"
    data = _read_json(path)
    if not (isinstance(data, dict) and isinstance(data.get("results"), list)):
        lines = [r for r in records or () if r.get("kind") == "test"]
        if not lines:
            return None
        path, data = run_dir / "metrics.jsonl", {"results": lines}
    return _reading("test", path, data, modalities, *_gain_terms(run_dir))


def _reading(split: int | str, path: Path, data: dict, modalities: list[str], fd_tolerance: float | None,
             ms_ssim_rise: float | None) -> dict[str, Any]:
    mods = modalities or list(dict.fromkeys(m for r in data["results"] for m in (r.get("per_modality") or {})))
    rows = test_rows([{"kind": "test", **r} for r in data["results"] if isinstance(r, dict)], mods)
    base = next((r["overall"] for r in rows if r["adapter"] == "base"), {})
    for row in rows:
        now = row["overall"]

        def diff(key: str, relative: bool = False) -> float | None:
            a, b = now.get(key), base.get(key)
            if not isinstance(a, (int, float)) or not isinstance(b, (int, float)) or (relative and not b):
                return None
            return a / b - 1 if relative else a - b

        row.update(change=diff("all_requested_shown"), fd_change=diff("fd", True), ms_ssim_change=diff("ms_ssim"))
        outside = outside_gain_terms(now.get("fd"), now.get("ms_ssim"), base.get("fd"), base.get("ms_ssim"),
                                     fd_tolerance, ms_ssim_rise)
        row["within_terms"] = None if row["adapter"] == "base" else outside is None
        row["outside"] = outside
    return {"split": split, "prompts": data.get("prompts"), "images_per_prompt": data.get("images_per_prompt"),
            "path": str(path), "rows": rows}


def fmt_number(value: Any) -> str:
    """Three decimals, fewer for large values, three significant digits for small ones (approx_kl ~ 1e-4)."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.3g}"
    return str(value)


def steering_text(gamma: float, gammas: dict[str, float] | None = None) -> str:
    """A steering's strength as the tables and printouts name it: "x1.25", or with a gamma per modality (``runs steer
    --per-modality``) "a gamma per modality (cxr x0, oct x4)"."""
    if not gammas:
        return f"x{gamma:g}"
    return "a gamma per modality (" + ", ".join(f"{m} x{g:g}" for m, g in gammas.items()) + ")"


def adapter_label(r: dict) -> str:
    """A test row's adapter as the tables name it: the guided sampler's scale, a scaled adapter's scale, a steered
    folder's gamma and what it steers."""
    if r["adapter"] == "guided":
        return f"base, reward-guided {fmt_number(r.get('scale'))} (epoch 0)"
    if isinstance(r.get("gamma"), (int, float)):
        steers = r.get("steers") if r.get("steers") not in (None, "none") else "base"
        return (f"{r['adapter']}: {steers} + table {steering_text(r['gamma'], r.get('gammas'))} "
                f"(table of epoch {fmt_number(r.get('table_epoch'))})")
    if isinstance(r.get("scale"), (int, float)):
        return f"{r['adapter']} x{r['scale']:g} (epoch {r['epoch']})"
    return f"{r['adapter']} (epoch {r['epoch']})"


def reading_table(reading: dict, modalities: list[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of one untouched reading (:func:`test_reading`, :func:`split_readings`): each adapter's share of
    images showing every requested finding and its change in points against the reading's base, its FD and MS-SSIM
    against the base's, and whether both stay within the gain's terms; ``synthmed runs show`` and the dashboard's Runs
    page print it."""
    f = fmt_number
    mods = modalities or list(dict.fromkeys(m for r in reading["rows"] for m in r["all_requested_shown"]))
    rows = []
    for r in reading["rows"]:
        o, base = r["overall"], r["adapter"] == "base"
        terms = "-" if r["within_terms"] is None else ("yes" if r["within_terms"] else f"no: {r['outside']}")
        rows.append([adapter_label(r), f(o.get("all_requested_shown")),
                     "-" if r["change"] is None or base else f"{r['change'] * 100:+.1f}",
                     f(o.get("requested_shown")), f(o.get("finding_accuracy")),
                     f(o.get("fd")) + ("" if r["fd_change"] is None or base else f" ({r['fd_change']:+.0%})"),
                     f(o.get("ms_ssim")) + ("" if r["ms_ssim_change"] is None or base else f" ({r['ms_ssim_change']:+.3f})"),
                     f(o.get("clip_score")), *(f(r["all_requested_shown"].get(m)) for m in mods), terms])
    header = ["adapter", "all shown ↑", "points", "req. shown ↑", "finding acc ↑", "FD ↓", "MS-SSIM ↓", "CLIP ↑",
              *(f"{m} shown" for m in mods), "FD, MS-SSIM within the gain's terms"]
    return header, rows


def reference_line(records: list[dict]) -> dict[str, Any] | None:
    """The held-out metrics of images that truly show each request (the loop's ``reference`` line), or None."""
    lines = [r for r in records if r.get("kind") == "reference"]
    if not lines:
        return None
    r = lines[-1]
    return {k: r.get(k) for k in ("source", "per_request", "overall", "per_modality", "missing", "seconds")}


GUIDANCE_FILE = "guidance.json"  # a run's calibrated reward guidance (improve.eval.guidance_scales)
SCALE_FILE, SCALED_ADAPTER = "scale.json", "scaled"  # a run's adapter strength chosen on its held-out set, and that adapter
OFFSET_TABLE_FILE = "offset_table.safetensors"  # improve.selection.target=table: the table as of the last epoch (rlhf.amortised)
STEER_FILE, STEERED_ADAPTER = "steer.json", "steered"  # `synthmed runs steer`: gamma x the table chosen on the held-out set


def read_guidance(folder: str | Path) -> dict[str, Any] | None:
    """A run folder's ``guidance.json`` (its ``reward_guidance``: the calibrated scale, None when every scale was
    refused), or None when the run calibrated nothing; a file that is not JSON raises ValueError."""
    path = Path(folder) / GUIDANCE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


GUIDED_KEYS = ("scale", "views", "overall", "per_modality", "seconds", "calibrated", "not_calibrated_because")


def guided_lines(records: list[dict]) -> list[dict[str, Any]]:
    """The held-out metrics of the base drawn by the reward-guided sampler (the loop's ``guided`` lines: stage 2's scale
    and the calibration's, ``improve.eval.guidance_scales``), one per scale (its last line), ascending."""
    last: dict[float, dict] = {}
    for r in records:
        if r.get("kind") == "guided":
            last[r.get("scale")] = r
    return [{k: r.get(k) for k in GUIDED_KEYS} for _, r in sorted(last.items(), key=lambda kv: kv[0] or 0)]


def guided_line(records: list[dict]) -> dict[str, Any] | None:
    """The ``guided`` line a run is read by: the calibrated scale's, else the last drawn (stage 2's drafts), or None."""
    lines = guided_lines(records)
    return next((r for r in lines if r.get("calibrated")), lines[-1] if lines else None)


def _base_and_after(evals: list[dict], best: int | None) -> tuple[dict | None, dict | None]:
    """The base's evaluation (epoch 0) and the one a run is judged by: the best, else the last."""
    base = next((e for e in evals if e["epoch"] == 0), None)
    after = next((e for e in evals if e["epoch"] == best), None) if best not in (None, 0) else None
    return base, after or (evals[-1] if evals and evals[-1]["epoch"] != 0 else None)


def finding_table(evals: list[dict], best: int | None, reference: dict | None = None) -> dict[str, Any] | None:
    """Per finding the held-out prompts request: the share of the images asking for it that show it (the evaluator, at its
    operating point), at the base (epoch 0), at the best evaluation (else the last; None before there is one) and in the
    reference. ``{"epoch", "rows": [{"modality", "finding", "asked", "base", "after", "reference"}], "never": {"base",
    "after", "reference", "of"}}`` (``never``: how many of the ``of`` requested findings no image shows), or None for a run
    logged before evaluations recorded findings one by one."""
    base, after = _base_and_after(evals, best)

    def by_finding(record: dict | None) -> dict[str, dict]:
        return {m: row.get("requested_shown_by_finding") or {} for m, row in ((record or {}).get("per_modality") or {}).items()}

    first = by_finding(base)
    if not any(first.values()):
        return None
    later, ref = by_finding(after), by_finding(reference)

    def share(table: dict, m: str, name: str) -> float | None:
        return ((table.get(m) or {}).get(name) or {}).get("shown")

    rows = [{"modality": m, "finding": name, "asked": findings[name].get("asked"), "base": share(first, m, name),
             "after": share(later, m, name) if after is not None else None,
             "reference": share(ref, m, name) if reference else None}
            for m, findings in first.items() for name in sorted(findings)]

    def never(key: str) -> int | None:
        values = [r[key] for r in rows]
        return None if any(v is None for v in values) else sum(v == 0 for v in values)

    return {"epoch": after["epoch"] if after is not None else None, "rows": rows,
            "never": {"base": never("base"), "after": never("after"), "reference": never("reference"), "of": len(rows)}}


def never_shown_text(findings: dict) -> str:
    """How many of the requested findings no held-out image shows, at the base, the compared epoch and the reference."""
    never, epoch = findings["never"], findings["epoch"]
    said = [f"{never['base']} at the base"] + ([f"{never['after']} at epoch {epoch}"] if never["after"] is not None else [])
    if never["reference"] is not None:
        said.append(f"{never['reference']} in the reference")
    return f"never shown, of {never['of']} requested findings: " + ", ".join(said)


def gain_table(evals: list[dict], best: int | None, reference: dict | None = None) -> dict[str, Any] | None:
    """Base (epoch 0) against the best evaluation (else the last), per modality and averaged over them:
    ``{"base_epoch", "epoch", "rows": {modality or "mean": {metric: {"base", "after", "change", "reference",
    "gap_closed"}}}}``. ``reference``: what images that truly show the requests score (:func:`reference_line`);
    ``gap_closed``: the change as a share of the distance from the base to it, where the base is below it."""
    base, after = _base_and_after(evals, best)
    if base is None or after is None:
        return None
    rows: dict[str, dict] = {}
    for name in list(base.get("per_modality") or {}) + ["mean"]:
        b = base["overall"] if name == "mean" else (base.get("per_modality") or {}).get(name, {})
        a = after["overall"] if name == "mean" else (after.get("per_modality") or {}).get(name, {})
        ref = {} if reference is None else (reference.get("overall") if name == "mean" else (reference.get("per_modality") or {}).get(name)) or {}
        rows[name] = {}
        for m in GAIN_METRICS:
            change = (a[m] - b[m]) if isinstance(a.get(m), (int, float)) and isinstance(b.get(m), (int, float)) else None
            r = ref.get(m) if isinstance(ref.get(m), (int, float)) else None
            gap = (change / (r - b[m])) if change is not None and r is not None and m in SHARE_METRICS and r > b[m] else None
            rows[name][m] = {"base": b.get(m), "after": a.get(m), "change": change, "reference": r, "gap_closed": gap}
    return {"base_epoch": 0, "epoch": after["epoch"], "rows": rows}


# -- all runs ---------------------------------------------------------------------------------
def _started_at(run_dir: Path, meta: dict) -> float:
    started = meta.get("started")
    if isinstance(started, str):
        try:
            return datetime.fromisoformat(started.replace("Z", "+00:00")).timestamp()
        except ValueError:
            pass
    return run_dir.stat().st_mtime


def list_runs(runs_dir: str | Path = "runs") -> list[dict[str, Any]]:
    """One summary per ``synthmed improve`` run under ``runs_dir``, newest first. A run whose files
    cannot be read is listed with status "unreadable" and the reason under "error", so one damaged
    run does not hide the others."""
    root = Path(runs_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not is_run_dir(folder):
            continue
        try:
            meta = _read_metadata(folder) or {}
            row = summarise(folder, _load_metrics(folder), meta) | {"error": None}
        except (ValueError, OSError) as exc:
            meta = {}
            row = summarise(folder, [], meta) | {"status": "unreadable", "error": str(exc)}
        found.append((_started_at(folder, meta), folder.name, row))
    found.sort(key=lambda item: (item[0], item[1]), reverse=True)
    return [row for _, _, row in found]

