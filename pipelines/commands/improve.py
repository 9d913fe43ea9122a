"""`synthmed improve`: the self-improvement loop (DDPO + active selection, judged by a held-out evaluator)."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import add_config_argument, resolve_config


def register(groups, formatter) -> None:
    p = groups.add_parser(
        "improve", formatter_class=formatter,
        help="the self-improvement loop: sample -> reward -> DDPO + active selection -> held-out evaluation, resumable",
        description="Draws requests from the findings each modality knows, has the generator (base model + LoRA) draw K images "
                    "per request, scores them with the reward-role judges against each request's structured expectation, "
                    "updates the LoRA with DDPO (PPO-clip on group-normalised advantages) and a reward-weighted update on the "
                    "samples the selector and verifier keep, and evaluates on fixed held-out requests with the evaluator "
                    "classifier, which never enters the reward. Everything lands in runs/<id>/ (metrics.jsonl, samples.jsonl, "
                    "grids, plots, checkpoints, final/, best/); inspect it with `synthmed runs show`.\n\n"
                    "Several processes: `accelerate launch --multi_gpu --num_processes N -m pipelines.cli improve ...` (GPUs; on a "
                    "machine without GPUs the same command runs N CPU processes that meet over gloo).",
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs to run (improve.ddpo.epochs)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run folder RUN from its last complete epoch")
    p.add_argument("--run-dir", default=None, help="the run folder to create (default: runs/<run.name>-improve-<time>)")
    p.add_argument("--report-to", default=None, choices=["auto", "none", "tensorboard", "trackio", "wandb"],
                   help="trackers beside metrics.jsonl (improve.report_to)")
    p.add_argument("--no-selection", action="store_true", help="stage 1 only (improve.selection.enabled=false)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_config_argument(p)
    p.set_defaults(handler=_improve)


def _improve(args, extra) -> int:
    from ..improve import resume_config, run_improve

    flags = {"improve.ddpo.epochs": args.epochs, "improve.report_to": args.report_to,
             "improve.selection.enabled": False if args.no_selection else None}
    if args.resume:
        run = Path(args.resume)
        if not run.is_dir():
            raise FileNotFoundError(f"--resume {run}: no such run folder; list runs with `synthmed runs list`")
        given = args.config is not None or extra or any(v is not None for v in flags.values())
        if given and args.config is None:  # overrides apply to the run's own settings, not to the default profile's
            args.config = str(run / "config.yaml")
        cfg = resume_config(run, resolve_config(args, extra, flags) if given else None)
        end = run_improve(cfg, run, resume=True, progress=not args.no_progress, command="synthmed " + " ".join(sys.argv[1:]))
    else:
        cfg = resolve_config(args, extra, flags)
        end = run_improve(cfg, Path(args.run_dir) if args.run_dir else None, progress=not args.no_progress,
                          command="synthmed " + " ".join(sys.argv[1:]))
    from pipelines.runs import GUIDANCE_FILE, read_guidance, read_metrics, reference_line, test_rows

    root = Path(end["run"])
    if end["status"] != "finished":
        print(f"\n{end['message']}")
    best = end.get("best") or {}
    print(f"\nrun: {root}  ({end['status']}, {end['epoch']} epochs)")
    if best:
        overall = best.get("overall") or {}
        share = overall.get("all_requested_shown")
        ceiling = ((reference_line(read_metrics(root)) or {}).get("overall") or {}).get("all_requested_shown")
        print(f"best held-out epoch: {best.get('epoch')}" + ("" if share is None else f" (every requested finding shown: {share:.3f}"
              + ("" if ceiling is None else f"; images that truly show the requests: {ceiling:.3f}") + ")"))
    rows = test_rows(read_metrics(root), [])
    if rows:
        def label(t: dict) -> str:
            return f"base reward-guided at {t['scale']:g}" if t["adapter"] == "guided" and t.get("scale") is not None else (
                "base reward-guided" if t["adapter"] == "guided" else t["adapter"])

        print("untouched test prompts, every requested finding shown: " + ", ".join(
            f"{label(t)} {'-' if t['overall'].get('all_requested_shown') is None else format(t['overall']['all_requested_shown'], '.3f')}"
            for t in rows))
    saved = read_guidance(root)
    if saved is not None:
        calibrated = saved.get("reward_guidance")
        print(f"guidance: {root / GUIDANCE_FILE}  (" + (f"calibrated reward guidance {calibrated:g}: --reward-guidance {calibrated:g} "
              "with synthmed generate or synthesize" if calibrated is not None else "no scale stayed within the gain's terms") + ")")
    steered = end.get("steered")
    if steered is not None:  # improve.eval.steer_gammas: the run's table as its policy
        test = steered.get("test") or {}
        shares = " ".join(f"{name} {values.get('all_requested_shown'):.3f}" for name, values in test.items()
                          if values and values.get("all_requested_shown") is not None)
        from ..runs import steering_text

        by = steering_text(steered["gamma"], steered.get("modality_gammas")) if steered.get("gamma") is not None else ""
        print(f"steered:  {steered['adapter_folder']}  (the base steered by the run's offset table {by}, "
              f"gamma chosen on the held-out set; untouched test prompts, every requested finding shown: {shares}; "
              f"--lora it in sample, generate, eval, synthesize)" if steered.get("gamma") is not None else
              f"steered:  none ({steered.get('use')})")
    print(f"logs:     {root / 'metrics.jsonl'}, {root / 'samples.jsonl'}")
    print(f"plots:    {root / 'plots'}  (reward.png, heldout.png, training.png)")
    print(f"grids:    {root / 'grids'}, {root / 'heldout'}")
    print(f"adapters: {root / 'final'}, {root / 'best'}")
    print(f"inspect:  synthmed runs show {root}")
    return 0
