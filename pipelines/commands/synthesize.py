"""`synthmed synthesize SPEC --out DIR`: a spec (CSV or YAML mix) drawn into a synthetic data set (pipelines/synthesize.py)."""

from __future__ import annotations

import json
import sys

from .common import add_config_argument, calibrated_guidance_note, resolve_config, reward_guidance_flag


def register(groups, formatter) -> None:
    p = groups.add_parser(
        "synthesize", formatter_class=formatter,
        help="a spec of requests drawn into a synthetic data set: images, manifest.csv, checks.jsonl",
        description="SPEC is a CSV with the columns text,modality,n or a YAML mix (per modality: findings or a+b pairs\n"
                    "with counts or shares, the normal share, severities, sides; see docs/specs/example_mix.yaml).\n"
                    "Every image is checked against the generator's training images (a draw too close is redrawn with a\n"
                    "new seed, synthesize.max_tries in all), judged by the verifier and the evaluator (reported in\n"
                    "checks.jsonl), and marked as synthetic (PNG text chunks; DICOM Secondary Capture, synthetic patient).\n"
                    "Writes images/, manifest.csv (path,text,modality,findings,source), checks.jsonl, summary.json.\n"
                    "An interrupted run finishes with --resume.\n"
                    "Several processes: accelerate launch --multi_gpu --num_processes N -m pipelines.cli synthesize ... (on a\n"
                    "machine without GPUs the ranks meet over gloo); each draws every N-th image, rank 0 merges checks and manifest.",
    )
    p.add_argument("spec", metavar="SPEC", help="spec file: .csv (text,modality,n) or .yaml (a mix)")
    p.add_argument("--out", required=True, help="output folder (new or empty; or this spec's folder with --resume)")
    p.add_argument("--format", choices=["png", "dicom"], default=None, help="image files (config: synthesize.format, png)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run of the same spec in --out")
    p.add_argument("--seed", type=int, default=None, help="seed of the wording and of image 0 (config: synthesize.seed)")
    p.add_argument("--lora", nargs="+", help="LoRA adapters on the generator: files, a run's final/ or best/, a "
                   "`synthmed improve` run folder, or a run's steered/ (`synthmed runs steer`: the run's offset table moves "
                   "every sampling step by the findings each request states) (default: sample.lora)")
    p.add_argument("--through-graph", action="store_true",
                   help="draw each request through the agent graph (grounding, verify, refine) instead of straight from the sampler")
    p.add_argument("--reward-guidance", type=float, default=None, metavar="SCALE",
                   help="draw every image with reward guidance at SCALE (0.1 is the loop's measured setting; 0: off): each step moves "
                        "it towards its request's findings by the reward-role classifiers; the verifier judges with its own "
                        "(agents.verifier.role) (config: synthesize.reward_guidance; agents.reward_guidance with --through-graph)")
    p.add_argument("--model", default=None, help="generator folder (default: train.out, the shipped model)")
    p.add_argument("--train-data", nargs="+", help="manifests of the generator's training images for the memorisation gate "
                   "(default: those its metadata.json names, or its phantom set, drawn again if absent)")
    p.add_argument("--batch-size", type=int, default=None, help="images per sampler call (config: synthesize.batch_size, else sample.batch_size)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    add_config_argument(p)
    p.set_defaults(handler=_synthesize)


def _synthesize(args, extra) -> int:
    from ..synthesize import synthesize

    guidance_key = "agents.reward_guidance" if args.through_graph else "synthesize.reward_guidance"
    cfg = resolve_config(args, extra, {"synthesize.seed": args.seed, "synthesize.format": args.format,
                                       "synthesize.batch_size": args.batch_size, "sample.lora": args.lora,
                                       guidance_key: reward_guidance_flag(args.reward_guidance)})
    note = calibrated_guidance_note(cfg.sample.lora, cfg.agents.reward_guidance if args.through_graph else cfg.synthesize.reward_guidance)
    if note:
        print(note, file=sys.stderr)
    result = synthesize(cfg, args.spec, args.out, model_dir=args.model, train_data=args.train_data, through_graph=args.through_graph,
                        resume=args.resume, progress=not (args.no_progress or args.json))
    if result.get("rank"):  # another process's shard: rank 0 reports the run
        return 0
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    rate = f"{result['images_per_s']:.2f} images/s" if result["images_per_s"] else "nothing drawn"
    print(f"{result['accepted']}/{result['images']} images -> {result['out']} ({result['draws']} draws, {result['rejected']} rejected, "
          f"acceptance {result['acceptance_rate']:.0%}; {rate})")
    if result["unfilled"]:
        print(f"warning: {len(result['unfilled'])} image(s) left out after synthesize.max_tries rejected draws: "
              f"{', '.join(map(str, result['unfilled'][:10]))}{' ...' if len(result['unfilled']) > 10 else ''} (see checks.jsonl)")
    print(f"manifest: {result['manifest']}; checks: {result['checks']}")
    return 0
