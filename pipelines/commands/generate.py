"""`synthmed generate "text" --modality cxr` and `synthmed trace list|show`: one image through the agent graph, and its trace."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from generator.errors import UserError

from .common import add_config_argument, calibrated_guidance_note, resolve_config, reward_guidance_flag, table


def register(groups, formatter) -> None:
    p = groups.add_parser(
        "generate", formatter_class=formatter,
        help="one request through the agent graph: grounded report, images, verdict, trace id",
        description="Parses the request (negation, laterality, severity, location), grounds it in the knowledge base, "
                    "composes a structured report and the generator's prompt, draws candidates, has the verifier check them "
                    "and refines until they pass or the rounds run out. Every step is kept in the trace database "
                    "(agents.traces); inspect it with `synthmed trace show ID`.",
    )
    p.add_argument("text", help="the clinical description, e.g. \"large left pleural effusion, no pneumothorax\"")
    p.add_argument("--modality", required=True, help="modality id or alias: cxr (\"chest x-ray\"), chest_ct, brain_mri, fundus, oct")
    p.add_argument("--n", type=int, default=None, help="images to return (default 1); each round draws max(n, agents.candidates)")
    p.add_argument("--seed", type=int, default=None, help="seed of the first candidate (default: agents.seed)")
    p.add_argument("--max-rounds", type=int, default=None, help="generate-verify rounds in all (default: agents.max_rounds)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: agents.steps, else sample.steps)")
    p.add_argument("--guidance", type=float, default=None, help="first round's guidance scale (default: sample.guidance)")
    p.add_argument("--reward-guidance", type=float, default=None, metavar="SCALE",
                   help="draw every candidate with reward guidance at SCALE (0.1 is the loop's measured setting; 0: off; "
                        "config: agents.reward_guidance). Each step moves the image towards the stated findings by the "
                        "reward's classifier; the verifier judges with its own (agents.verifier.role)")
    p.add_argument("--out", default=None, help="folder for the images (default: agents.out/<trace id>)")
    p.add_argument("--model", default=None, help="generator folder (default: train.out, the shipped model)")
    p.add_argument("--lora", nargs="+", help="LoRA adapters on the generator: files, a run's final/ or best/, a "
                   "`synthmed improve` run folder, or a run's steered/ (`synthmed runs steer`: the run's offset table moves "
                   "every sampling step by the findings each request states) (default: sample.lora)")
    p.add_argument("--dry-run", action="store_true", help="reason and compose only: report and prompt, no images")
    p.add_argument("--json", action="store_true", help="print one JSON object (trace_id, images, report, verdict, findings, ...)")
    add_config_argument(p)
    p.set_defaults(handler=_generate)

    t = groups.add_parser("trace", help="inspect the agent graph's traces (synthmed generate)", formatter_class=formatter)
    sub = t.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)
    ls = sub.add_parser("list", help="one line per request: id, time, modality, status, rounds, text", formatter_class=formatter)
    ls.add_argument("--limit", type=int, default=20, help="the newest N (0: all)")
    ls.add_argument("--json", action="store_true")
    add_config_argument(ls)
    ls.set_defaults(handler=_trace_list)
    show = sub.add_parser("show", help="every stage of one request: retrievals, decisions, prompts, verdicts, images",
                          formatter_class=formatter)
    show.add_argument("trace_id")
    show.add_argument("--json", action="store_true")
    show.add_argument("--hits", type=int, default=3, help="retrieval hits shown per query (text view)")
    add_config_argument(show)
    show.set_defaults(handler=_trace_show)


def _generate(args, extra) -> int:
    from ..agent import build_agent

    reward_guidance_flag(args.reward_guidance)  # checked before anything is built
    cfg = resolve_config(args, extra, {"sample.lora": args.lora})
    note = calibrated_guidance_note(cfg.sample.lora, args.reward_guidance if args.reward_guidance is not None
                                    else cfg.agents.reward_guidance)
    if note:
        print(note, file=sys.stderr)
    started = time.perf_counter()
    agent = build_agent(cfg, args.model, draw=not args.dry_run)
    try:
        settings = {"n": args.n, "seed": args.seed, "max_rounds": args.max_rounds, "steps": args.steps, "guidance": args.guidance,
                    "out": args.out, "stop_after": "compose_prompt" if args.dry_run else None, "reward_guidance": args.reward_guidance}
        if args.n is not None and args.n < 1:
            raise UserError(f"--n must be at least 1, got {args.n}")
        state = agent.run(args.text, args.modality, **settings)
    finally:
        agent.close()
    seconds = time.perf_counter() - started
    result = state.get("result") or {}
    trace_id = state["settings"]["trace_id"]
    record = {"trace_id": trace_id, "status": state.get("status"), "error": state.get("error"),
              "images": result.get("images", []), "report": result.get("report"), "prompt": result.get("prompt"),
              "negative": result.get("negative"), "verdict": result.get("verdict"), "findings": result.get("findings", []),
              "assumed": result.get("assumed", []), "warnings": state.get("warnings", []), "modality": result.get("modality"),
              "seconds": round(seconds, 2), "traces": cfg.agents.traces}
    if args.json:
        print(json.dumps(record, indent=2, default=str))
    else:
        _print_result(record)
    if state.get("status") == "refused":
        if not args.json:
            print(f"synthmed generate: error: {state.get('error')}", file=sys.stderr)
        return 2
    return 0


def _print_result(record: dict) -> None:
    print(f"trace {record['trace_id']}: {record['status']} ({record['seconds']} s)")
    if record["status"] == "refused":
        return
    for w in record["warnings"]:
        print(f"warning: {w}")
    rows = [[f["name"], "present" if f["present"] else "absent", f.get("laterality", ""), f.get("severity", ""),
             f.get("location", ""), "yes" if f.get("uncertain") else ""] for f in record["findings"]]
    if rows:
        print(table(rows, ["finding", "stated", "laterality", "severity", "location", "hedged"]))
    if record["report"]:
        print(record["report"]["text"])
    verdict = record["verdict"] or {}
    for c in verdict.get("candidates", []):
        checks = ", ".join(f"{f['name']} {f['probability']}" + ("" if f["pass"] is None else " ok" if f["pass"] else " FAIL")
                           for f in c["findings"])
        print(f"{c['path']}: {'pass' if c['passed'] else 'fail'}, score {c['score']}; {checks}")
    if verdict:
        print(f"{verdict['rounds']} round(s); inspect with `synthmed trace show {record['trace_id']}`")


def _trace_list(args, extra) -> int:
    from agents.traces import list_traces

    cfg = resolve_config(args, extra)
    rows = list_traces(cfg.agents.traces, args.limit or None)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no traces in {cfg.agents.traces}; run `synthmed generate` first")
        return 0
    print(table([[r["trace_id"], (r["started"] or "")[:19], r["modality"], r["status"], r["rounds"], r["steps"],
                  _short(r["text"])] for r in rows], ["trace", "started", "modality", "status", "rounds", "steps", "request"]))
    return 0


def _short(text: str, n: int = 60) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def _trace_show(args, extra) -> int:
    from agents.traces import format_trace, show_trace, trace_json

    cfg = resolve_config(args, extra)
    trace = show_trace(Path(cfg.agents.traces), args.trace_id)  # an unknown id is a TraceNotFoundError (a UserError)
    print(trace_json(trace) if args.json else format_trace(trace, args.hits))
    return 0
