"""`synthmed bench graph`: the agent graph's overhead, and whether going through it helps.

- **Overhead**: requests run through the stages and the composition with the real retriever and
  the real SQLite checkpointer but nothing drawn (``stop_after=compose_prompt``); wall time per
  request, p50 / p95, and per node.
- **Comparison** (``--compare``): for each request with a finding the held-out evaluator knows,
  the image the graph returns (``n=1``, after verification and refinement) against images drawn
  from the same text sent straight to the generator (what ``synthmed sample`` does), seeds
  0..k-1. The held-out evaluator, which neither path ever sees, says whether each image shows
  the requested findings (calibrated probability >= 0.5 for every requested present finding it
  has a label for). Expected findings come from the request file's labels, not from the graph's
  parse, so a parse error counts against the graph.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from generator.errors import UserError

DEFAULT_REQUESTS = Path(__file__).resolve().parent.parent / "tests" / "data" / "parse_requests.yaml"


def load_requests(path: str | Path | None = None) -> list[dict]:
    path = Path(path or DEFAULT_REQUESTS)
    if not path.is_file():
        raise FileNotFoundError(f"no request file at {path}; give --requests FILE (YAML: requests: [{{text, modality, expected}}])")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    requests = data.get("requests") if isinstance(data, dict) else data
    if not isinstance(requests, list) or not requests:
        raise UserError(f"{path}: expected a list of requests under 'requests:'")
    return requests


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def overhead(agent, requests: list[dict], repeats: int = 1, progress: bool = True) -> dict:
    """Wall seconds per request through the stages and the composition, nothing drawn."""
    times, per_node = [], defaultdict(list)
    refused = 0
    with tqdm(total=len(requests) * repeats, desc="graph overhead", unit=" req", disable=not progress) as bar:
        for r in range(repeats):
            for i, req in enumerate(requests):
                started = time.perf_counter()
                state = agent.run(req["text"], req["modality"], trace_id=f"bench-{r}-{i}-{time.time_ns()}", stop_after="compose_prompt")
                times.append(time.perf_counter() - started)
                refused += state.get("status") == "refused"
                for e in state["events"]:
                    per_node[e["node"]].append(e["seconds"])
                bar.update()
    return {"requests": len(requests), "repeats": repeats, "refused": refused,
            "p50_ms": round(1000 * percentile(times, 50), 2), "p95_ms": round(1000 * percentile(times, 95), 2),
            "mean_ms": round(1000 * statistics.fmean(times), 2),
            "per_node_p50_ms": {k: round(1000 * percentile(v, 50), 3) for k, v in per_node.items()}}


def _shown(evaluator, images, modality: str, present: list[str], negated: list[str]) -> tuple[list[bool], list[float]]:
    """Per image: every requested present finding at p >= 0.5; and the mean finding-level agreement."""
    expected = {**{n: True for n in present}, **{n: False for n in negated}}
    _, details = evaluator.score(images, [""] * len(images), [modality] * len(images), expected=[expected] * len(images))
    seen = np.stack([np.asarray(details[f"prob/{n}"]) >= 0.5 for n in present])  # (findings, images)
    return [bool(s) for s in seen.all(axis=0)], [float(h) for h in seen.mean(axis=0)]


def paired_bootstrap(a: np.ndarray, b: np.ndarray, rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(a - b) over requests (paired)."""
    rng = np.random.default_rng(seed)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    means = [d[rng.integers(0, len(d), len(d))].mean() for _ in range(rounds)]
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(agent, evaluator, requests: list[dict], direct_seeds: int = 4, per_modality: int | None = None,
            out: str | Path | None = None, progress: bool = True, skip_per_modality: int = 0) -> dict:
    """Graph against the raw text, judged by the held-out evaluator (the eligible requests of each modality
    after the first ``skip_per_modality``, at most ``per_modality`` of them)."""
    from agents.drawing import read_images
    from generator.modalities import resolve_modality

    out = Path(out or tempfile.mkdtemp(prefix="synthmed-bench-graph-"))
    chosen, count, skipped = [], defaultdict(int), defaultdict(int)
    for req in requests:
        modality = resolve_modality(req["modality"], agent.cfg.data.modalities)  # aliases as users write them
        labels = set(evaluator.classifiers[modality].label_names) if modality in evaluator.classifiers else set()
        present = [f["name"] for f in req.get("expected", []) if f.get("present", True) and f["name"] in labels]
        negated = [f["name"] for f in req.get("expected", []) if not f.get("present", True) and f["name"] in labels]
        if present and modality in agent.generator.modalities and skipped[modality] < skip_per_modality:
            skipped[modality] += 1
        elif present and (per_modality is None or count[modality] < per_modality) and modality in agent.generator.modalities:
            count[modality] += 1
            chosen.append({**req, "modality_id": modality, "present": present, "negated": negated})
    rows = []
    steps, guidance = agent.cfg.agents.steps or agent.cfg.sample.steps, agent.cfg.agents.guidance or agent.cfg.sample.guidance
    for i, req in enumerate(tqdm(chosen, desc="graph vs direct", unit=" req", disable=not progress)):
        modality = req["modality_id"]
        started = time.perf_counter()
        state = agent.run(req["text"], req["modality"], trace_id=f"compare-{i}-{time.time_ns()}", n=1,
                          out=str(out / f"graph/{i:03d}"))
        graph_seconds = time.perf_counter() - started
        if state.get("status") == "refused" or not state["result"]["images"]:
            graph_shown, graph_hits, first_shown, first_hits = [False], [0.0], [False], [0.0]
            rounds = 0
        else:
            graph_shown, graph_hits = _shown(evaluator, read_images(state["result"]["images"]), modality, req["present"], req["negated"])
            first = [c["path"] for c in state["candidates"] if c["round"] == 0][:1]  # composed prompt, first seed, no selection
            first_shown, first_hits = _shown(evaluator, read_images(first), modality, req["present"], req["negated"])
            rounds = len(state["verdicts"])
        started = time.perf_counter()
        paths, images, _ = agent.generator.draw(req["text"], modality, list(range(direct_seeds)), out / f"direct/{i:03d}",
                                                guidance=guidance, steps=steps)
        direct_seconds = time.perf_counter() - started
        direct_shown, direct_hits = _shown(evaluator, images, modality, req["present"], req["negated"])
        rows.append({"text": req["text"], "modality": modality, "present": req["present"], "status": state.get("status"),
                     "rounds": rounds, "graph": float(graph_shown[0]), "graph_findings": graph_hits[0],
                     "composed_only": float(first_shown[0]), "composed_only_findings": first_hits[0],
                     "direct": float(np.mean(direct_shown)), "direct_findings": float(np.mean(direct_hits)),
                     "graph_seconds": round(graph_seconds, 2), "direct_seconds": round(direct_seconds, 2),
                     "trace_id": state["settings"]["trace_id"]})
    return {"requests": len(rows), "direct_seeds": direct_seeds, "out": str(out), "rows": rows,
            "summary": summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    groups = defaultdict(list)
    for r in rows:
        groups[r["modality"]].append(r)
    groups["all"] = rows
    out = {}
    for name, rs in groups.items():
        g, d, c = (np.array([r[k] for r in rs]) for k in ("graph", "direct", "composed_only"))
        lo, hi = paired_bootstrap(g, d) if len(rs) > 1 else (float("nan"), float("nan"))
        out[name] = {"requests": len(rs), "graph": round(float(g.mean()), 3), "composed_only": round(float(c.mean()), 3),
                     "direct": round(float(d.mean()), 3), "difference": round(float((g - d).mean()), 3),
                     "difference_95ci": [round(lo, 3), round(hi, 3)],
                     "graph_findings": round(float(np.mean([r["graph_findings"] for r in rs])), 3),
                     "direct_findings": round(float(np.mean([r["direct_findings"] for r in rs])), 3),
                     "mean_rounds": round(float(np.mean([r["rounds"] for r in rs])), 2),
                     "graph_seconds": round(float(np.mean([r["graph_seconds"] for r in rs])), 2)}
    return out


__all__ = ["DEFAULT_REQUESTS", "compare", "load_requests", "overhead", "paired_bootstrap", "percentile", "summarise"]
