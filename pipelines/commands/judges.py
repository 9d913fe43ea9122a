"""`synthmed judges train classifier|clip|selector|all`: the scorers of the reward and the evaluation.

Each trains on ``judges.<judge>.data`` manifests, or by default on the phantom set drawn at the
judge's image size (``data/phantoms_<N>px``, the set the default generator learns from; drawn here
when it is absent, with the ``phantoms`` section's seed and count).
"""

from __future__ import annotations

import json
import sys

from generator.errors import UserError

from .common import add_config_argument, classifier_phantoms, phantom_manifest, resolve_config, table

ROLES = ("reward", "verifier", "evaluator")  # rlhf.classifiers.ROLES, spelt here so that the parser imports no torch


def register(groups, formatter) -> None:
    parser = groups.add_parser("judges", help="train the finding classifiers, the CLIP alignment model and the selector",
                               formatter_class=formatter)
    sub = parser.add_subparsers(dest="judges_command", metavar="SUBCOMMAND", required=True)
    train = sub.add_parser("train", help="train one judge (or all) into the shipped folders under rlhf/weights/", formatter_class=formatter)
    kinds = train.add_subparsers(dest="train_judge", metavar="JUDGE", required=True)
    for name, text in (
        ("classifier", "multi-label finding classifiers, every role (reward, verifier, held-out evaluator) for every modality"),
        ("clip", "the image-text alignment model (open_clip, contrastive) on image-report pairs"),
        ("selector", "the quality selector's head on the alignment model's features"),
        ("all", "classifier, then clip, then selector"),
    ):
        p = kinds.add_parser(name, help=text, formatter_class=formatter)
        add_config_argument(p)
        p.add_argument("--data", nargs="+", help="manifests to train on (default: judges.<judge>.data, else phantoms)")
        p.add_argument("--out", help="output folder (default: judges.<judge>.out)")
        p.add_argument("--no-progress", action="store_true")
        if name in ("classifier", "all"):
            p.add_argument("--roles", nargs="+", choices=ROLES, default=list(ROLES))
            p.add_argument("--modalities", nargs="+", help="default: every modality in the data")
        p.set_defaults(handler=_train, judge=name)


def _command(judge: str) -> str:
    """The command line as typed, or (called in-process) the plain command of this judge."""
    return "synthmed " + " ".join(sys.argv[1:]) if sys.argv and sys.argv[0].endswith("synthmed") else f"synthmed judges train {judge}"


def _train(args, extra) -> int:
    cfg = resolve_config(args, extra)
    progress = not args.no_progress
    jobs = ["classifier", "clip", "selector"] if args.judge == "all" else [args.judge]
    for job in jobs:
        {"classifier": _classifier, "clip": _clip, "selector": _selector}[job](cfg, args, progress)
    return 0


def _classifier(cfg, args, progress: bool) -> None:
    import logging

    from generator.modalities import resolve_modality
    from rlhf.classifiers import format_summary, load_rows, train_all

    cc = cfg.judges.classifier
    sources = args.data or cc.data
    if not sources:
        # the classifiers' own phantom set, at a seed of its own: none of its images is one of the
        # evaluation's reference phantoms (judges.eval.seed), the benchmark's or the generator's training set's
        clash = {"judges.eval.seed": cfg.judges.eval.seed, "judges.classifier.benchmark_seed": cc.benchmark_seed}
        for name, value in clash.items():
            if cc.phantoms_seed == value:
                raise UserError(f"judges.classifier.phantoms_seed ({value}) equals {name}: the classifiers would be trained "
                                "on the images they are judged on; choose another seed")
        if cc.phantoms_seed == cfg.phantoms.seed:
            logging.getLogger(__name__).warning(
                "judges.classifier.phantoms_seed equals phantoms.seed: the classifiers train on the generator's training phantoms")
        sources = [classifier_phantoms(cfg, progress)]
    rows = load_rows(sources, cfg.data.modalities)
    modalities = [resolve_modality(m, cfg.data.modalities) for m in args.modalities] if getattr(args, "modalities", None) else None
    summaries = train_all(cc, rows, args.out if args.judge == "classifier" else None, roles=args.roles, modalities=modalities,
                          progress=progress, command=_command(args.judge), data_description=[str(s) for s in sources])
    print(format_summary(summaries))


def _clip(cfg, args, progress: bool) -> None:
    from generator.training import split_rows
    from rlhf.alignment import manifest_rows, train_alignment

    ac = cfg.judges.alignment
    if ac.model:
        raise UserError(f"judges.alignment.model is {ac.model!r}: a named open_clip model is used as it is, not trained here; "
                        "unset it to train the project's own model")
    sources = args.data or ac.data or [phantom_manifest(cfg.phantoms, ac.image_size, progress)]
    rows = manifest_rows(sources, cfg.data)
    train_rows, val_rows = split_rows(rows, ac.val_fraction, ac.seed)
    summary = train_alignment(ac, train_rows, val_rows, args.out if args.judge == "clip" else None, progress, cfg.data)
    metrics = summary.get("metrics", summary)
    print(table([[k, v] for k, v in metrics.items() if not isinstance(v, (dict, list))], ["CLIP (held-back pairs)", "value"]))


def _selector(cfg, args, progress: bool) -> None:
    from generator.training import split_rows
    from rlhf.alignment import load_alignment, manifest_rows
    from rlhf.selector import train_selector

    sc, ac = cfg.judges.selector, cfg.judges.alignment
    alignment = load_alignment(ac if ac.model else ac.out, device=sc.device)
    kwargs = {}
    if sc.source == "bootstrap":
        sources = args.data or ac.data or [phantom_manifest(cfg.phantoms, ac.image_size, progress)]
        # the alignment model's own split, so the selector's validation images are new to both
        train_rows, val_rows = split_rows(manifest_rows(sources, cfg.data), ac.val_fraction, ac.seed)
        kwargs = {"train_rows": train_rows, "val_rows": val_rows}
    summary = train_selector(sc, alignment, args.out if args.judge == "selector" else None, data=cfg.data, progress=progress, **kwargs)
    metrics = summary.get("metrics", summary)
    print(json.dumps(metrics, indent=2, default=str))
