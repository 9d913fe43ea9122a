"""`synthmed data ...`: phantoms, manifests, the ../shared/meddata adapters, contact sheets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from generator.data import BadRows, iter_manifest, source_rows, write_manifest
from generator.data.meddata import MEDDATA_ADAPTERS
from generator.phantoms import get_spec, phantom_modalities
from generator.phantoms.dataset import contact_sheet, write_phantoms

from ..config import config_to_dict, save_config
from .common import add_config_argument, resolve_config, table

DEFAULT_MEDDATA = Path("../shared/meddata")


def register(groups, formatter) -> None:
    parser = groups.add_parser("data", help="make phantoms, build manifests, inspect data", formatter_class=formatter)
    sub = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    p = sub.add_parser(
        "phantoms",
        help="write procedural phantoms of every modality with ground truth",
        formatter_class=formatter,
        description="Writes images/, manifest.csv, labels.jsonl, config.yaml and metadata.json to --out.",
    )
    add_config_argument(p)
    p.add_argument("--out", help="output folder (config: phantoms.out)")
    p.add_argument("--per-finding", type=int, help="studies per modality x finding, normal included (config: phantoms.per_finding)")
    p.add_argument("--size", type=int, help="image side in pixels (config: phantoms.size)")
    p.add_argument("--seed", type=int, help="seed; the same seed gives identical images (config: phantoms.seed)")
    p.add_argument("--modalities", nargs="+", help=f"subset of {' '.join(phantom_modalities())} (config: phantoms.modalities)")
    p.add_argument("--contact-sheet", default=None, help="also write a contact sheet PNG to this path")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_phantoms)

    m = sub.add_parser(
        "manifest",
        help="build a manifest CSV from a data folder or file",
        formatter_class=formatter,
        description="SOURCE: a ../shared/meddata folder, a manifest CSV (aliases such as path,Text,modal "
        "accepted), a folder of class sub-folders, a parquet file or Hugging Face image folder, or hf:<dataset>.",
    )
    add_config_argument(m)
    m.add_argument("source", help="data folder or file")
    m.add_argument("--out", required=True, help="manifest CSV to write")
    m.add_argument("--modality", help="modality for sources without a modality column (name or alias)")
    m.add_argument("--template", default="{label}", help="text for class-folder or label sources, e.g. 'Chest radiograph. Findings: {label}.'")
    m.add_argument("--label-names", help="class names of a MedMNIST .npz by label index, comma-separated, e.g. normal,pneumonia")
    m.add_argument("--skip-bad", action="store_true", help="skip bad rows, count them and list them in OUT.skipped.csv")
    m.add_argument("--verify", action="store_true", help="decode every image, not only its header (slower; finds truncated files)")
    m.set_defaults(handler=_manifest)

    md = sub.add_parser("meddata", help="manifests for every folder of ../shared/meddata", formatter_class=formatter)
    add_config_argument(md)
    md.add_argument("--root", default=str(DEFAULT_MEDDATA), help="the meddata folder")
    md.add_argument("--out", default="data/meddata", help="folder for the manifests (one CSV per dataset)")
    md.add_argument("--verify", action="store_true", help="decode every image")
    md.set_defaults(handler=_meddata)

    c = sub.add_parser("contact-sheet", help="PNG grid of every modality x finding", formatter_class=formatter)
    c.add_argument("--out", default="docs/phantom_contact_sheet.png")
    c.add_argument("--size", type=int, default=128)
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--modalities", nargs="+", default=phantom_modalities())
    c.set_defaults(handler=_contact_sheet)

    cat = sub.add_parser("catalogue", help="phantom findings per modality, with sides, locations, severities", formatter_class=formatter)
    cat.add_argument("--json", action="store_true")
    cat.set_defaults(handler=_catalogue)

    chk = sub.add_parser("check", help="stream a manifest through the loader and transforms; report counts", formatter_class=formatter)
    add_config_argument(chk)
    chk.add_argument("manifest")
    chk.add_argument("--skip-bad", action="store_true")
    chk.add_argument("--limit", type=int, default=None, help="stop after this many records")
    chk.set_defaults(handler=_check)


def _phantoms(args, extra) -> int:
    cfg = resolve_config(
        args,
        extra,
        {
            "phantoms.out": args.out,
            "phantoms.per_finding": args.per_finding,
            "phantoms.size": args.size,
            "phantoms.seed": args.seed,
            "phantoms.modalities": args.modalities,
        },
    )
    pc = cfg.phantoms
    out = Path(pc.out)
    summary = write_phantoms(
        out, pc.modalities, pc.per_finding, pc.size, pc.seed, pc.negatives, progress=not args.no_progress,
        extra_metadata={"config": config_to_dict(cfg), "command": "synthmed " + " ".join(sys.argv[1:])},
    )
    save_config(cfg, out / "config.yaml")
    rows = [[m, len(c), sum(c.values())] for m, c in summary.counts.items()]
    print(table(rows, ["modality", "findings (incl. normal)", "images"]))
    print(f"{summary.images} images in {summary.seconds:.1f} s -> {out}/manifest.csv, labels.jsonl, metadata.json")
    if args.contact_sheet:
        print(f"contact sheet -> {contact_sheet(args.contact_sheet, pc.modalities, size=pc.size, seed=pc.seed)}")
    return 0


def _manifest(args, extra) -> int:
    cfg = resolve_config(args, extra)
    bad = BadRows(skip=args.skip_bad or cfg.data.skip_bad)
    names = [n.strip() for n in args.label_names.split(",")] if args.label_names else None
    rows = source_rows(args.source, cfg.data.modalities, modality=args.modality, template=args.template, bad=bad, label_names=names)
    summary = write_manifest(rows, args.out, bad=bad, verify_images=args.verify, modalities=cfg.data.modalities)
    print(table([[m, n] for m, n in sorted(summary.by_modality.items())], ["modality", "rows"]))
    print(f"{summary.rows} rows -> {summary.path}")
    if summary.skipped:
        print(f"{summary.skipped} bad rows skipped, listed in {summary.skipped_file}")
    return 0


def _meddata(args, extra) -> int:
    cfg = resolve_config(args, extra)
    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"meddata folder not found: {root}; pass --root")
    rows = []
    for name in MEDDATA_ADAPTERS:
        folder = root / name
        if not folder.is_dir():
            rows.append([name, "absent", "", ""])
            continue
        summary = write_manifest(
            source_rows(folder, cfg.data.modalities), Path(args.out) / f"{name}.csv",
            verify_images=args.verify, modalities=cfg.data.modalities, progress=False,
        )
        rows.append([name, summary.rows, ", ".join(f"{m} {n}" for m, n in summary.by_modality.items()), summary.path])
    print(table(rows, ["dataset", "rows", "modalities", "manifest"]))
    return 0


def _contact_sheet(args, extra) -> int:
    print(contact_sheet(args.out, args.modalities, size=args.size, seed=args.seed))
    return 0


def _catalogue(args, extra) -> int:
    cat = {}
    for name in phantom_modalities():
        spec = get_spec(name)
        cat[name] = {
            f.name: {"terms": list(f.terms), "sides": list(f.sides), "locations": list(f.locations), "severities": list(f.severities)}
            for f in spec.findings.values()
        }
    if args.json:
        print(json.dumps(cat, indent=2))
        return 0
    rows = [
        [m, f, "/".join(v["sides"]) or "-", ", ".join(v["locations"]) or "-", "/".join(v["severities"]) or "-"]
        for m, fs in cat.items()
        for f, v in fs.items()
    ]
    print(table(rows, ["modality", "finding", "sides", "locations", "severities"]))
    return 0


def _check(args, extra) -> int:
    from collections import Counter
    from itertools import islice

    from generator.data import StreamingRecords

    cfg = resolve_config(args, extra)
    bad = BadRows(skip=args.skip_bad or cfg.data.skip_bad)
    dataset = StreamingRecords(lambda: iter_manifest(args.manifest, cfg.data.modalities, bad=bad), cfg.data, bad=bad)
    counts: Counter = Counter()
    shape = None
    for record in islice(iter(dataset), args.limit):
        counts[record["modality"]] += 1
        shape = tuple(record["image"].shape)
    print(table([[m, n] for m, n in sorted(counts.items())], ["modality", "records"]))
    print(f"{sum(counts.values())} records, image tensor {shape}, {len(bad)} bad rows skipped")
    if bad.rows:
        print(f"bad rows listed in {bad.write(args.manifest)}")
    return 0
