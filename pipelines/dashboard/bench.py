"""How long each dashboard page takes to open, and a folder big enough to make that a fair question.

``time_pages`` builds the app and calls, for each page, the functions its opening runs (the tab's
``select`` handler and, for Runs and Traces, opening the newest run / trace), twice: the first open
(nothing cached) and again. ``make_bench_folder`` writes 1,000 traces (real checkpoints of real
requests, composed by the configured agent graph without drawing, copied under new ids), a 200-epoch
loop run (metrics, 64 samples per epoch, a grid per epoch) and a 500-row manifest.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REQUESTS = [("large left pleural effusion, no pneumothorax", "cxr"), ("right upper lobe consolidation", "cxr"),
            ("ground-glass opacity in the left lower lobe", "chest_ct"), ("acute left MCA infarct", "brain_mri"),
            ("optic disc cupping, cup-to-disc ratio 0.8", "fundus"), ("full-thickness macular hole", "oct")]


def time_pages(settings, repeats: int = 2) -> dict[str, dict[str, float]]:
    """{page: {"first_s", "again_s"}} for every page's opening functions."""
    from .app import build_app

    app = build_app(settings)
    opens = app.synthmed_page_openers
    out = {}
    for page, fn in opens.items():
        seconds = []
        for _ in range(repeats):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        out[page] = {"first_s": round(seconds[0], 4), "again_s": round(min(seconds[1:] or seconds), 4)}
    return out


def make_bench_folder(root: Path, traces: int = 1000, epochs: int = 200, per_epoch: int = 64, manifest_rows: int = 500,
                      cfg=None) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    db = root / "runs" / "traces.sqlite"
    _write_traces(db, traces, cfg)
    run = _write_run(root / "runs" / "bench-improve-200", epochs, per_epoch)
    data = _write_manifest(root / "data" / "bench", manifest_rows)
    return {"runs": root / "runs", "traces": db, "data": root / "data", "run": run, "traces_count": traces, "epochs": epochs,
            "manifest": data}


def _write_traces(db: Path, count: int, cfg=None) -> None:
    from pipelines.agent import build_agent
    from pipelines.config import load_config

    cfg = cfg or load_config(None)
    agent = build_agent(cfg, draw=False, traces=str(db), progress=False)
    try:
        for i, (text, modality) in enumerate(REQUESTS):
            agent.run(text, modality, trace_id=f"seed-{i}", stop_after="compose_prompt")
    finally:
        agent.close()
    from agents.traces import connect

    conn = connect(db)  # WAL and a busy timeout, as every traces connection
    with conn:
        for n in range(count - len(REQUESTS)):
            source, new = f"seed-{n % len(REQUESTS)}", f"bench-{n:05d}"
            conn.execute("INSERT INTO checkpoints SELECT ?, checkpoint_ns, checkpoint_id, parent_checkpoint_id, type, checkpoint, "
                         "metadata FROM checkpoints WHERE thread_id = ?", (new, source))
            conn.execute("INSERT INTO writes SELECT ?, checkpoint_ns, checkpoint_id, task_id, task_path, idx, channel, type, value "
                         "FROM writes WHERE thread_id = ?", (new, source))
    conn.close()


COMPONENTS = ("findings", "alignment", "selector", "quality")
MODALITIES = ("cxr", "chest_ct", "brain_mri", "fundus", "oct")


def _write_run(run: Path, epochs: int, per_epoch: int) -> Path:
    from pipelines.runs import RUN_KIND

    rng = np.random.default_rng(0)
    (run / "grids").mkdir(parents=True, exist_ok=True)
    (run / "heldout").mkdir(parents=True, exist_ok=True)
    (run / "metadata.json").write_text(json.dumps({"kind": RUN_KIND, "status": "running", "started": "2026-01-01T00:00:00",
                                                   "epochs_planned": epochs, "base_model": "generator/weights/default"}))
    (run / "config.yaml").write_text("run:\n  name: bench\n")

    def stats(mean):
        return {"mean": round(float(mean), 4), "std": 0.1}

    def overall():
        return {"all_requested_shown": float(rng.uniform(0, 0.1)), "requested_shown": float(rng.uniform(0.2, 0.5)),
                "finding_accuracy": float(rng.uniform(0.3, 0.5)), "all_findings_agree": 0.1, "fd": float(rng.uniform(400, 800)),
                "ms_ssim": 0.8, "clip_score": 0.6, "selector_quality": 0.03, "memorised_share": 0.0}

    metrics, samples = [], []
    for epoch in range(epochs + 1):
        if epoch % 5 == 0:
            metrics.append({"kind": "eval", "epoch": epoch, "overall": overall(), "per_modality": {m: overall() for m in MODALITIES},
                            "seconds": 20.0, "best": epoch == 15})
            Image.fromarray(rng.integers(0, 255, (320, 640), dtype=np.uint8)).save(run / "heldout" / f"epoch_{epoch:04d}.png")
        if epoch == 0:
            continue
        for s in range(4):
            metrics.append({"kind": "step", "epoch": epoch, "step": epoch * 5 + s, "stage": "ddpo", "loss": 0.1, "approx_kl": 1e-4,
                            "clipfrac": 0.1, "grad_norm": 1.0, "lr": 3e-3})
        total = 1.2 + 0.001 * epoch
        metrics.append({"kind": "epoch", "epoch": epoch, "n_samples": per_epoch, "selected": 8,
                        "reward": {"total": stats(total), **{c: stats(total / 4) for c in COMPONENTS}},
                        "per_modality": {m: {"total": stats(total + 0.01 * i)} for i, m in enumerate(MODALITIES)},
                        "seconds": {"sampling": 16.8, "reward": 0.2, "update": 17.9, "selection": 0.6, "total": 35.5}})
        for i in range(per_epoch):
            comps = {c: round(float(rng.uniform()), 6) for c in COMPONENTS}
            comps.update({f"findings/prob/finding_{k}": round(float(rng.uniform()), 6) for k in range(30)})
            samples.append({"epoch": epoch, "index": i, "rank": 0, "prompt": "Chest radiograph, PA view. Findings: large left pleural "
                            "effusion with compressive atelectasis. Impression: as above." * 2, "negative": "Pneumothorax.",
                            "request": "Large left pleural effusion. No pneumothorax.", "modality": MODALITIES[i % 5],
                            "key": "cxr:pleural_effusion", "expected": {"pleural_effusion": {"present": True}}, "seed": i,
                            "reward": round(sum(comps[c] for c in COMPONENTS), 6), "components": comps,
                            "advantage": round(float(rng.normal()), 5), "selected": bool(i % 7 == 0)})
        Image.fromarray(rng.integers(0, 255, (256, 512), dtype=np.uint8)).save(run / "grids" / f"epoch_{epoch:04d}.png")
    (run / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (run / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return run


def _write_manifest(folder: Path, rows: int) -> Path:
    import csv

    rng = np.random.default_rng(1)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "modality", "findings"])
        for i in range(rows):
            name = f"images/img_{i:04d}.png"
            Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(folder / name)
            present = i % 3 == 0
            w.writerow([name, "Large left pleural effusion." if present else "Normal chest radiograph.", "cxr",
                        json.dumps([{"name": "pleural_effusion", "present": True, "side": "left"}]) if present else ""])
    return folder / "manifest.csv"


__all__ = ["make_bench_folder", "time_pages"]
