"""`synthmed kb ...`: build, search, evaluate and benchmark the knowledge base."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from generator.errors import UserError

from knowledge.open import build_from_config, cases_from_manifests, embedder_for, open_knowledge_base

from .common import add_config_argument, resolve_config, table



def register(groups, formatter) -> None:
    parser = groups.add_parser("kb", help="knowledge base: build, search, evaluate, benchmark", formatter_class=formatter)
    sub = parser.add_subparsers(dest="kb_command", metavar="SUBCOMMAND", required=True)

    b = sub.add_parser(
        "build",
        help="embed the lexicon (+ RadLex, SNOMED CT) and case manifests into FAISS indexes",
        formatter_class=formatter,
        description="Reads knowledge.lexicon_dir, knowledge.radlex, knowledge.snomed and knowledge.case_manifests; "
        "writes knowledge.index_dir.",
    )
    add_config_argument(b)
    b.add_argument("--add-cases", nargs="+", metavar="MANIFEST", help="append these manifests' cases to the existing index instead of rebuilding")
    b.set_defaults(handler=_build)

    s = sub.add_parser("search", help="search concepts and cases, with scores and sources", formatter_class=formatter)
    add_config_argument(s)
    s.add_argument("query")
    s.add_argument("--modality", help="restrict to one modality (name or alias)")
    s.add_argument("--k", type=int, default=5, help="hits to return")
    s.add_argument("--kinds", nargs="+", help="anatomy finding appearance modifier cue case")
    s.add_argument("--json", action="store_true")
    s.set_defaults(handler=_search)

    e = sub.add_parser("eval", help="top-1 / top-5 accuracy on a labelled query set", formatter_class=formatter)
    add_config_argument(e)
    e.add_argument("--queries", default=str(Path(__file__).resolve().parents[2] / "tests" / "data" / "kb_queries.yaml"))
    e.add_argument("--json", action="store_true")
    e.add_argument("--show-misses", action="store_true", help="list the queries whose expected concept is not in the top 5")
    e.set_defaults(handler=_eval)

    n = sub.add_parser("bench", help="recall@10, latency and build time of Flat / HNSW / IVF-PQ on synthetic vectors", formatter_class=formatter)
    add_config_argument(n)
    n.add_argument("--sizes", nargs="+", type=int, default=[100_000, 1_000_000], help="vector counts")
    n.add_argument("--dim", type=int, default=384, help="vector dimension (384: the packaged MiniLM embedder)")
    n.add_argument("--factories", nargs="+", default=None, help="FAISS factory strings; {nlist} and {m} are filled per size")
    n.add_argument("--queries", type=int, default=200)
    n.add_argument("--json", action="store_true")
    n.set_defaults(handler=_bench)


def _build(args, extra) -> int:
    from knowledge.build import add_cases

    cfg = resolve_config(args, extra)
    k = cfg.knowledge
    embedder = embedder_for(cfg)
    if args.add_cases:
        added = add_cases(k.index_dir, cases_from_manifests(cfg, args.add_cases), embedder)
        print(f"added {added} cases to {k.index_dir}/cases")
        return 0
    summary = build_from_config(cfg, embedder)
    rows = [[kind, n] for kind, n in sorted(summary["concepts_by_kind"].items())]
    rows += [[f"cases ({m})", n] for m, n in sorted(summary["cases_by_modality"].items())]
    print(table(rows, ["kind", "count"]))
    print(f"{summary['concepts']} concepts, {summary['cases']} cases indexed in {summary['seconds']} s -> {k.index_dir}")
    return 0


def _search(args, extra) -> int:
    from generator.modalities import resolve_modality

    cfg = resolve_config(args, extra)
    modality = resolve_modality(args.modality, cfg.data.modalities) if args.modality else None
    hits = open_knowledge_base(cfg, build_if_absent=False).search(args.query, k=args.k, modality=modality, kinds=args.kinds)
    if args.json:
        print(json.dumps({"query": args.query, "modality": modality, "hits": [h.to_dict() for h in hits]}, indent=2))
        return 0
    rows = [
        [i + 1, f"{h.score:.3f}", f"{h.dense:.3f}", f"{h.exact:.2f}", h.kind, h.id, h.text[:60], h.source,
         " ".join(f"{s}:{c}" for s, c in h.codes.items()) or "-"]
        for i, h in enumerate(hits)
    ]
    print(table(rows, ["#", "score", "dense", "exact", "kind", "id", "text", "source", "codes"]))
    return 0


def evaluate_queries(retriever, queries: list[dict], kind_of: dict[str, str] | None = None) -> dict:
    """Top-1 and top-5 accuracy overall, per category and per modality, and the misses.

    With ``kind_of`` (concept id -> kind) each query is searched as the agent stage that asks it
    would search: restricted to the expected concept's kind (anatomy for localisation, finding
    for pathology assessment). Without it, every kind competes ("left", "no" and "RLL" in a
    finding query are real matches of modifier, cue and anatomy concepts).
    """
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])  # group -> [n, top1, top5]
    misses = []
    for q in queries:
        kinds = [kind_of[q["expected"]]] if kind_of else None
        hits = retriever.search(q["query"], k=5, modality=q.get("modality"), kinds=kinds)
        ids = [h.id for h in hits]
        top1, top5 = int(ids[:1] == [q["expected"]]), int(q["expected"] in ids)
        for group in ("all", f"category:{q.get('category', '-')}", f"modality:{q.get('modality') or 'any'}"):
            totals[group][0] += 1
            totals[group][1] += top1
            totals[group][2] += top5
        if not top5:
            misses.append({"query": q["query"], "expected": q["expected"], "got": ids[:3]})
    groups = {g: {"n": n, "top1": t1 / n, "top5": t5 / n} for g, (n, t1, t5) in sorted(totals.items())}
    return {"groups": groups, "misses": misses}


def _eval(args, extra) -> int:
    import yaml

    cfg = resolve_config(args, extra)
    queries = yaml.safe_load(Path(args.queries).read_text())
    retriever = open_knowledge_base(cfg, build_if_absent=False)
    kind_of = {item["id"]: item["kind"] for item in retriever.concepts.items}
    unknown = sorted({q["expected"] for q in queries} - set(kind_of))
    if unknown:
        raise UserError(f"{args.queries}: expected concepts not in the index: {', '.join(unknown[:10])}")
    results = {"stage": evaluate_queries(retriever, queries, kind_of), "all_kinds": evaluate_queries(retriever, queries)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    stage, free = results["stage"]["groups"], results["all_kinds"]["groups"]
    rows = [[g, v["n"], f"{v['top1']:.3f}", f"{v['top5']:.3f}", f"{free[g]['top1']:.3f}", f"{free[g]['top5']:.3f}"] for g, v in stage.items()]
    print(table(rows, ["group", "queries", "top-1 (stage kind)", "top-5 (stage kind)", "top-1 (all kinds)", "top-5 (all kinds)"]))
    if args.show_misses:
        for m in results["stage"]["misses"]:
            print(f"miss: {m['query']!r} expected {m['expected']} got {m['got']}")
    return 0


def _bench(args, extra) -> int:
    import resource

    from knowledge.bench import DEFAULT_FACTORIES, bench_size

    resolve_config(args, extra)  # validates overrides; the bench itself needs no model
    dim = args.dim
    log_fn = (lambda msg: None) if args.json else print
    rows = []
    for size in args.sizes:
        rows += bench_size(size, dim, tuple(args.factories or DEFAULT_FACTORIES), queries=args.queries, log=log_fn)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        print(json.dumps({"dim": dim, "rows": [r.to_dict() for r in rows], "peak_rss_mb": round(peak_mb, 1)}))
        return 0
    print(table(
        [[f"{r.size:,}", r.factory, f"{r.build_s:.1f}", f"{r.memory_mb:.0f}", f"{r.recall_at_10:.3f}", f"{r.p50_ms:.3f}",
          f"{r.p99_ms:.3f}", f"{r.speedup_vs_exact:.1f}x"] for r in rows],
        ["vectors", "index", "build s", "memory MB", "recall@10", "p50 ms", "p99 ms", "speed-up vs exact"],
    ))
    print(f"dimension {dim}; peak RSS of the run {peak_mb:.0f} MB")
    return 0
