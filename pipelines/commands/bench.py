"""`synthmed bench manifest|generate|graph|improve`: data streaming memory and speed; sampler speed against diffusers;
the agent graph; the self-improvement loop against trl's DDPOTrainer.

`generate` times synthmed's sampler against the stock diffusers pipeline assembled from the same
weights (see generator/bench.py for what makes the two like for like). `improve` runs `synthmed
improve` and trl 0.23.1's DDPOTrainer side by side (see pipelines/trl_bench.py).

It writes a manifest of ``--rows`` rows whose images cycle through a small pool of phantom PNGs,
then streams it through the data layer (CSV parsing, validation and, unless --rows-only, image
decoding and the full training transform), sampling resident memory as it goes. Bounded memory
means the peak stays near the baseline however many rows there are.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import psutil
from tqdm import tqdm

from generator.data import iter_manifest
from generator.phantoms import make_phantom, phantom_modalities
from generator.phantoms.dataset import study_seed
from PIL import Image

from .common import add_config_argument, resolve_config, resolve_device, reward_guidance_flag, table

FAULT_COMMANDS = ("train-vae", "train-unet", "improve", "kb-build", "synthesize", "judges-train")  # pipelines.faults.SCENARIOS


def register(groups, formatter) -> None:
    parser = groups.add_parser("bench", help="benchmarks (data streaming memory, ...)", formatter_class=formatter)
    sub = parser.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    m = sub.add_parser("manifest", help="peak memory and rows/s streaming a large manifest", formatter_class=formatter)
    add_config_argument(m)
    m.add_argument("--rows", type=int, default=1_000_000, help="manifest rows")
    m.add_argument("--pool", type=int, default=64, help="distinct image files the rows point at")
    m.add_argument("--rows-only", action="store_true", help="parse and validate rows without decoding images")
    m.add_argument("--workdir", default=None, help="where to write the manifest (default: a temporary folder)")
    m.add_argument("--json", action="store_true", help="print one JSON object")
    m.set_defaults(handler=_manifest_bench)
    g = sub.add_parser("generate", help="images/s and peak memory: synthmed's sampler against stock diffusers, same weights",
                       formatter_class=formatter)
    add_config_argument(g)
    g.add_argument("--model", default=None, help="model folder (default: train.out, the shipped model)")
    g.add_argument("--n", type=int, default=16, help="images per run (modalities in turn)")
    g.add_argument("--batch", type=int, default=None, help="images per forward pass (default: sample.batch_size)")
    g.add_argument("--steps", type=int, default=None, help="denoising steps (default: sample.steps)")
    g.add_argument("--guidance", type=float, default=None, help="guidance scale, at least 1 (default: sample.guidance)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs of each, after one warm-up; the median is reported")
    g.add_argument("--device", default=None, help="cpu, cuda, ... (default: run.device)")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(handler=_generate_bench)
    a = sub.add_parser("graph", help="agent graph overhead (p50/p95, nothing drawn); with --compare, graph against the raw text "
                       "judged by the held-out evaluator", formatter_class=formatter)
    add_config_argument(a)
    a.add_argument("--requests", default=None, help="YAML of requests with expected findings (default: tests/data/parse_requests.yaml)")
    a.add_argument("--repeats", type=int, default=3, help="overhead: passes over the requests")
    a.add_argument("--compare", action="store_true", help="also draw: graph (n=1, verified, refined) against the same text sent straight to the generator")
    a.add_argument("--per-modality", type=int, default=10, help="compare: requests per modality (those with a finding the evaluator knows)")
    a.add_argument("--skip-per-modality", type=int, default=0, help="compare: leave out the first N eligible requests of each modality (a second, disjoint sample)")
    a.add_argument("--direct-seeds", type=int, default=4, help="compare: images per request drawn from the raw text")
    a.add_argument("--model", default=None, help="generator folder (default: train.out, the shipped model)")
    a.add_argument("--reward-guidance", type=float, default=None, metavar="SCALE",
                   help="compare: the graph draws its candidates with reward guidance at SCALE (config: agents.reward_guidance); "
                        "the raw text is drawn without it")
    a.add_argument("--out", default=None, help="compare: folder for images, traces and bench.json (default: runs/bench-graph-<time>)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.set_defaults(handler=_graph_bench)
    i = sub.add_parser("improve", help="seconds per epoch and held-out gain: synthmed improve against trl 0.23.1's DDPOTrainer, "
                       "same weights, prompts, reward and settings", formatter_class=formatter,
                       description="Runs trl 0.23.1's DDPOTrainer (in its own virtual environment, made on first use and reusing this "
                       "one's packages) and `synthmed improve` for the same epochs on the same model, prompts, reward and "
                       "DDPO settings, then judges both adapters on the same held-out requests. Batch sizes are lowered where "
                       "trl's divisibility rules need it, for both sides alike. See pipelines/trl_bench.py.")
    add_config_argument(i)
    i.add_argument("--epochs", type=int, default=2, help="epochs on each side")
    i.add_argument("--prompts-per-epoch", type=int, default=8, help="distinct requests per epoch (improve.ddpo.prompts_per_epoch)")
    i.add_argument("--images-per-prompt", type=int, default=4, help="K, images per request (improve.ddpo.images_per_prompt)")
    i.add_argument("--steps", type=int, default=None, help="DDIM steps of a rollout (default: improve.ddpo.steps)")
    i.add_argument("--threads", type=int, default=1, help="torch CPU threads of each side (improve.num_threads); 0: torch's "
                   "default. One thread keeps a shared CPU from stalling multi-threaded kernels, which distorts the timings")
    i.add_argument("--no-selection", action="store_true", help="our side without stage 2 (trl has none)")
    i.add_argument("--skip-trl", action="store_true", help="our side only")
    i.add_argument("--env", default=None, help="the trl environment's folder (default: .synthmed/envs/trl-0.23.1)")
    i.add_argument("--out", default=None, help="folder for both runs and bench.json (default: runs/bench-improve-<time>)")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(handler=_improve_bench)
    f = sub.add_parser("faults", help="kill commands with SIGKILL at random moments, resume them and check their files (see pipelines/faults.py)",
                       formatter_class=formatter,
                       description="For train vae, train unet, improve, kb build, synthesize and judges train (tiny, offline settings): "
                       "an uninterrupted reference run, then per round a fresh run killed after a random (seeded) number of progress "
                       "events, resumed (sometimes killed again) to the end, and checked: metrics lines none lost, doubled or torn; "
                       "checkpoints, indexes and images load; no temporary or empty file left; the result equals the reference's.")
    f.add_argument("--kill", action="store_true", required=True, help="the fault injected: SIGKILL (the only one so far)")
    f.add_argument("--rounds", type=int, default=3, help="kill rounds per command")
    f.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    f.add_argument("--commands", nargs="+", default=None, metavar="COMMAND",
                   help="subset of: " + " ".join(FAULT_COMMANDS) + " (default: all)")
    f.add_argument("--out", default=None, help="work folder and faults.json (default: runs/bench-faults-<time>)")
    f.add_argument("--keep", action="store_true", help="keep the folders of rounds that passed (failed ones are always kept)")
    f.add_argument("--json", action="store_true", help="print one JSON object")
    f.set_defaults(handler=_faults_bench)
    d = sub.add_parser("downstream", help="AUROC per modality of the finding classifier trained on real, real + synthetic and "
                       "synthetic images, with bootstrap 95%% intervals (see pipelines/downstream.py)", formatter_class=formatter)
    add_config_argument(d)
    d.add_argument("--test", nargs="+", required=True, help="held-out test manifests (e.g. `synthmed data phantoms` at another "
                   "seed, or the validation rows of `synthmed data meddata`'s with --test-split val)")
    d.add_argument("--train", nargs="+", default=None, help="training manifests (default: judges.classifier.data, else the "
                   "classifiers' own phantom set)")
    d.add_argument("--train-split", default=None, metavar="NAME", help="keep only the training rows whose source names this split "
                   "(e.g. train)")
    d.add_argument("--test-split", default=None, metavar="NAME", help="keep only the test rows whose source names this split (e.g. val)")
    d.add_argument("--synthetic-per-label", type=int, default=20, help="synthetic images per label and normal studies, per modality")
    d.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the test images")
    d.add_argument("--out", default=None, help="spec, synthetic set, table.md, metadata.json (default: runs/bench-downstream-<time>)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(handler=_downstream_bench)


def _downstream_bench(args, extra) -> int:
    from ..downstream import markdown_table, run_downstream

    cfg = resolve_config(args, extra)
    result = run_downstream(cfg, args.test, args.train, args.synthetic_per_label, args.out, args.bootstrap, progress=not args.json,
                            train_split=args.train_split, test_split=args.test_split)
    print(json.dumps(result, indent=2, default=str) if args.json else f"{markdown_table(result)}\n-> {result['out']}/metadata.json")
    return 0


def _rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


def _write_bench_manifest(folder: Path, rows: int, pool: int) -> Path:
    modalities = phantom_modalities()
    images = []
    for i in range(pool):
        modality = modalities[i % len(modalities)]
        study = make_phantom(modality, [], size=128, seed=study_seed(0, modality, "bench", i))
        path = folder / f"img_{i:04d}.png"
        Image.fromarray(study.image).save(path)
        images.append((path.name, modality, study.text))
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "Text", "modal"])  # MINIM's header, read through the aliases
        for i in range(rows):
            name, modality, text = images[i % pool]
            writer.writerow([name, f"{text} (case {i})", modality])
    return manifest


def _manifest_bench(args, extra) -> int:
    from generator.data import StreamingRecords  # needs torch: imported only when streaming records

    cfg = resolve_config(args, extra)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        manifest = _write_bench_manifest(folder, args.rows, args.pool)
        size_mb = os.path.getsize(manifest) / 2**20
        if args.rows_only:
            stream = iter_manifest(manifest, cfg.data.modalities)
        else:
            stream = iter(StreamingRecords(lambda: iter_manifest(manifest, cfg.data.modalities), cfg.data, train=True))
        baseline = _rss_mb()
        peak = baseline
        samples = []
        start = time.perf_counter()
        n = 0
        for n, _ in enumerate(tqdm(stream, total=args.rows, desc="streaming", unit=" rows", mininterval=1.0), 1):
            if n % 10_000 == 0:
                rss = _rss_mb()
                peak = max(peak, rss)
                samples.append((n, round(rss, 1)))
        seconds = time.perf_counter() - start
    result = {
        "rows": n,
        "manifest_mb": round(size_mb, 1),
        "decoded_images": not args.rows_only,
        "image_size": cfg.data.image_size,
        "seconds": round(seconds, 1),
        "rows_per_second": round(n / seconds, 1),
        "rss_baseline_mb": round(baseline, 1),
        "rss_peak_sampled_mb": round(peak, 1),
        "rss_growth_mb": round(peak - baseline, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_at_rows": samples[:: max(1, len(samples) // 10)],
    }
    if args.json:
        print(json.dumps(result))
    else:
        keys = ["rows", "manifest_mb", "decoded_images", "seconds", "rows_per_second", "rss_baseline_mb", "rss_peak_sampled_mb", "rss_growth_mb", "ru_maxrss_mb"]
        print(table([[k, result[k]] for k in keys], ["measure", "value"]))
    return 0


def _generate_bench(args, extra) -> int:
    from generator.bench import bench_generate
    from generator.models import LatentDiffusion

    cfg = resolve_config(args, extra)
    sc = cfg.sample
    device = resolve_device(args.device or cfg.run.device)
    model = LatentDiffusion.load(args.model or cfg.train.out, device=device)
    result = bench_generate(model, n=args.n, batch_size=args.batch or sc.batch_size, steps=args.steps or sc.steps,
                            guidance=sc.guidance if args.guidance is None else args.guidance, repeats=args.repeats,
                            seed=sc.seed, progress=not args.json, modalities=cfg.data.modalities, precision=sc.precision)
    result["model"] = str(args.model or cfg.train.out)
    if args.json:
        print(json.dumps(result))
        return 0
    rows = [[name, result[name]["seconds_per_image"], result[name]["images_per_second"], result[name]["peak_memory_mb"]]
            for name in ("synthmed", "diffusers")]
    print(table(rows, ["sampler", "s/image", "images/s", "peak memory MiB"]))
    print(f"speedup_vs_diffusers {result['speedup_vs_diffusers']:.3f} (stock s/image / synthmed s/image); "
          f"{result['n']} images, batch {result['batch_size']}, {result['steps']} steps, guidance {result['guidance']}, "
          f"{result['device']}, {result['torch_threads']} threads, synthmed in {result['precision']}; |difference| between their "
          f"images (in [-1, 1]) max {result['max_abs_diff']:.2e}, mean {result['mean_abs_diff']:.2e}; in fp32 max {result['fp32_max_abs_diff']:.2e}")
    return 0


def _graph_bench(args, extra) -> int:
    from ..agent import build_agent
    from ..graph_bench import compare, load_requests, overhead

    cfg = resolve_config(args, extra, {"agents.reward_guidance": reward_guidance_flag(args.reward_guidance)})
    requests = load_requests(args.requests)
    out = Path(args.out or f"runs/bench-graph-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    agent = build_agent(cfg, args.model, draw=args.compare, traces=str(out / "traces.sqlite"), progress=not args.json)
    try:
        agent.run(requests[0]["text"], requests[0]["modality"], trace_id="warm-up", stop_after="compose_prompt")
        report = {"overhead": overhead(agent, requests, args.repeats, progress=not args.json), "build_seconds": agent.timings,
                  "reward_guidance": cfg.agents.reward_guidance, "verifier_role": cfg.agents.verifier.role}
        if args.compare:
            from rlhf.classifiers import load_finding_scorer

            evaluator = load_finding_scorer("evaluator", cfg.judges.classifier.out)
            report["compare"] = compare(agent, evaluator, requests, args.direct_seeds, args.per_modality, out, progress=not args.json,
                                        skip_per_modality=args.skip_per_modality)
    finally:
        agent.close()
    report["command"] = "synthmed " + " ".join(__import__("sys").argv[1:])
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    o = report["overhead"]
    print(f"graph overhead, nothing drawn: p50 {o['p50_ms']} ms, p95 {o['p95_ms']} ms over {o['requests']} requests x {o['repeats']}"
          f" ({o['refused']} refused)")
    print(table([[k, v] for k, v in o["per_node_p50_ms"].items()], ["node", "p50 ms"]))
    if "compare" in report:
        rows = [[m, s["requests"], s["graph"], s["composed_only"], s["direct"], s["difference"], s["difference_95ci"], s["mean_rounds"]]
                for m, s in report["compare"]["summary"].items()]
        print("share of images showing the requested findings (held-out evaluator)"
              + (f"; the graph's candidates reward-guided at scale {cfg.agents.reward_guidance:g}, the raw text's not:"
                 if cfg.agents.reward_guidance else ":"))
        print(table(rows, ["modality", "requests", "graph", "composed prompt only", "raw text", "graph - raw", "95% CI", "rounds"]))
    print(f"-> {out / 'bench.json'}")
    return 0


def _improve_bench(args, extra) -> int:
    from ..trl_bench import bench_batches, bench_improve, bench_table

    flags = {"improve.ddpo.epochs": args.epochs, "improve.ddpo.prompts_per_epoch": args.prompts_per_epoch,
             "improve.ddpo.images_per_prompt": args.images_per_prompt, "improve.ddpo.steps": args.steps,
             "improve.selection.enabled": False if args.no_selection else None, "improve.report_to": "none",
             "improve.eval.every": args.epochs,  # held-out evaluations at epoch 0 and at the end only
             "improve.num_threads": args.threads}
    cfg = resolve_config(args, extra, flags)
    d = cfg.improve.ddpo
    batches = bench_batches(d.prompts_per_epoch * d.images_per_prompt, d.sample_batch_size, d.train_batch_size, d.grad_accum_steps)
    adjusted = {k: {"configured": getattr(d, k), "bench": v} for k, v in batches.items() if getattr(d, k) != v}
    if adjusted:
        print("batch sizes lowered for trl's divisibility rules, on both sides: "
              + ", ".join(f"{k} {v['configured']} -> {v['bench']}" for k, v in adjusted.items()), file=sys.stderr)
        cfg = resolve_config(args, extra, {**flags, **{f"improve.ddpo.{k}": v for k, v in batches.items()}})
    out = Path(args.out or f"runs/bench-improve-{time.strftime('%Y%m%d-%H%M%S')}")
    # with --json, stdout carries the JSON alone: what the loop prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        summary = bench_improve(cfg, out, Path(args.env) if args.env else None, skip_trl=args.skip_trl, progress=not args.json,
                                adjusted=adjusted)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    rows, header = bench_table(summary)
    print(table(rows, header))
    s = summary["settings"]
    print(f"{s['epochs']} epochs of {s['prompts_per_epoch']} requests x {s['images_per_prompt']} images, {s['steps']} steps "
          f"({s['trained_timesteps']} trained), guidance {s['guidance']}, {s['threads']} threads; held-out: "
          f"{summary['heldout_metric']} on {s['heldout_prompts']} requests x {s['heldout_images_per_prompt']} images")
    if summary["epoch_speedup_vs_trl"] is not None:
        goal = summary["goal"]
        print(f"epoch_speedup_vs_trl {summary['epoch_speedup_vs_trl']:.2f} (trl s/epoch / ours; goal >= 2: "
              f"{'met' if goal['speedup_at_least_2x'] else 'not met'}); gain ours - trl "
              f"{'n/a' if summary['gain_difference'] is None else format(summary['gain_difference'], '+.3f')} (goal >= 0: "
              f"{'n/a' if goal['gain_at_least_trl'] is None else ('met' if goal['gain_at_least_trl'] else 'not met')})")
    print(f"-> {out / 'bench.json'}")
    return 0


def _faults_bench(args, extra) -> int:
    from generator.errors import UserError

    from ..faults import run_bench, report_rows

    wanted = [c.replace(" ", "-") for c in (args.commands or FAULT_COMMANDS)]
    unknown = [c for c in wanted if c not in FAULT_COMMANDS]
    if unknown:
        raise UserError(f"--commands: unknown {' '.join(unknown)}; choose from {' '.join(FAULT_COMMANDS)}")
    if args.rounds < 1:
        raise UserError(f"--rounds must be at least 1, not {args.rounds}")
    out = Path(args.out or f"runs/bench-faults-{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    report = run_bench(wanted, args.rounds, args.seed, out, progress=True, keep=args.keep)
    report["command"] = "synthmed " + " ".join(sys.argv[1:])
    (out / "faults.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        rows, header = report_rows(report)
        print(table(rows, header))
        for c in report["commands"].values():
            for failure in c["failures"]:
                print(f"{c['command']} round {failure['round']} ({failure['folder']}):")
                for problem in failure["problems"][:5]:
                    print(f"  - {problem}")
        print(f"-> {out / 'faults.json'}")
    return 1 if report["failed_rounds"] else 0
