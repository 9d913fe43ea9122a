"""`synthmed train vae|unet|lora|default` and `synthmed sample`."""

from __future__ import annotations

import json
import logging
import os
import sys
from contextlib import nullcontext
from pathlib import Path

from generator.errors import UserError

from .common import add_config_argument, phantom_manifest, resolve_config, resolve_device, table

log = logging.getLogger("synthmed.train")


def register(groups, formatter) -> None:
    parser = groups.add_parser("train", help="train the VAE, the UNet, LoRA adapters, or the whole default model", formatter_class=formatter)
    sub = parser.add_subparsers(dest="train_command", metavar="SUBCOMMAND", required=True)
    for name, text in (
        ("vae", "train the autoencoder (reconstruction + KL) on a manifest"),
        ("unet", "train the UNet and conditioning on VAE latents"),
        ("lora", "train a LoRA adapter on a base model (only adapter weights are saved)"),
        ("default", "reproduce a profile's shipped model: the VAE, then the UNet, on its data (phantoms for the default profile)"),
    ):
        p = sub.add_parser(name, help=text, formatter_class=formatter)
        add_config_argument(p)
        p.add_argument("--data", nargs="+", help="manifest(s) to train on (default: data.manifests, else phantoms.out/manifest.csv)")
        p.add_argument("--resume", help="a run folder (runs/<name>-...) to continue from its newest checkpoint")
        p.add_argument("--no-progress", action="store_true")
        if name == "unet":
            p.add_argument("--init-from", metavar="MODEL", help="start from an exported model folder's UNet, conditioner and VAE "
                           "(e.g. generator/weights/default) with a fresh optimiser and schedule, instead of from scratch")
        if name == "lora":
            p.add_argument("--model", default=None, help="base model folder (default: train.out)")
            p.add_argument("--adapter-out", required=True, help="adapter file to write (.safetensors)")
        p.set_defaults(handler=_train, train_kind=name)

    s = groups.add_parser("sample", help="draw images straight from the generator (no agents)", formatter_class=formatter)
    add_config_argument(s)
    s.add_argument("text", help="the description to draw")
    s.add_argument("--modality", required=True, help="modality id or alias, e.g. cxr, 'chest x-ray'")
    s.add_argument("--n", type=int, default=4, help="images to draw")
    s.add_argument("--steps", type=int, help="denoising steps (config: sample.steps)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (config: sample.guidance)")
    s.add_argument("--negative", help="negative prompt (config: sample.negative)")
    s.add_argument("--sampler", choices=["ddim", "dpmpp"], help="config: sample.sampler")
    s.add_argument("--seed", type=int, help="image i uses seed + i (config: sample.seed)")
    s.add_argument("--model", help="model folder (default: the shipped model, train.out)")
    s.add_argument("--lora", nargs="*", default=[], help="LoRA adapters to apply: files, a run's final/ or best/, or a "
                   "`synthmed improve` run folder (its best/), or a steered folder (`synthmed runs steer`: its offset "
                   "table moves every step by what the request states: --finding, else the text as the graph reads it); "
                   "default: sample.lora")
    s.add_argument("--finding", action="append", default=[], metavar="NAME[:key=value,...]",
                   help="a finding the images must state, for a model with finding tokens (model.finding_tokens) or a steered "
                   "folder in --lora, which "
                   "reads it as the graph and the loop give it: e.g. pleural_effusion:laterality=left,severity=moderate or "
                   "pneumothorax:present=false; repeat for more (keys: present, laterality, severity, location)")
    s.add_argument("--out", default="samples", help="output folder")
    s.add_argument("--no-progress", action="store_true", help="no progress bars (a steered folder reading the text builds "
                   "the knowledge base the graph reads with, the first time, with bars)")
    s.set_defaults(handler=_sample)

    c = groups.add_parser("sample-sheet", help="contact sheet of generated images for every modality x finding",
                          formatter_class=formatter)
    add_config_argument(c)
    c.add_argument("--model", help="model folder (default: the shipped model, train.out)")
    c.add_argument("--modalities", nargs="+", help="default: every modality the model knows that has phantoms")
    c.add_argument("--per-cell", type=int, default=2, help="generated images per finding (one seed each)")
    c.add_argument("--steps", type=int, help="denoising steps (config: sample.steps)")
    c.add_argument("--guidance", type=float, help="classifier-free guidance scale (config: sample.guidance)")
    c.add_argument("--seed", type=int, help="config: sample.seed")
    c.add_argument("--data", nargs="+", help="manifests whose validation images and captions head the columns (default: "
                   "data.manifests, e.g. --config real; none: phantoms)")
    c.add_argument("--out", default="docs/generated_contact_sheet.png", help="PNG to write")
    c.set_defaults(handler=_sample_sheet)


def _rows(cfg, data: list[str] | None):
    from generator.data import iter_manifest

    manifests = data or cfg.data.manifests or [str(Path(cfg.phantoms.out) / "manifest.csv")]
    rows = []
    for manifest in manifests:
        if not Path(manifest).is_file():
            raise FileNotFoundError(f"training manifest {manifest} not found; build it with `synthmed data meddata` (the real profile's "
                                    "manifests, from ../shared/meddata), make phantoms with `synthmed data phantoms`, or pass --data")
        rows += list(iter_manifest(manifest, cfg.data.modalities))
    return rows


def _run_dir(cfg, kind: str, resume: str | None):
    from generator.training import RunDir, make_run_dir
    from pipelines.config import save_config

    if resume:
        run = RunDir(Path(resume))
        if not run.checkpoints.is_dir():
            raise FileNotFoundError(f"{resume} is not a run folder (no checkpoints/)")
        if int(os.environ.get("RANK", "0")) == 0:
            from generator.fileio import sweep_temporaries

            sweep_temporaries(run.root)
        return run
    run = make_run_dir(cfg.run.runs_dir, f"{cfg.run.name}-{kind}")
    save_config(cfg, run.root / "config.yaml")
    return run


def _run_lock(run):
    """The run folder's lock (``generator.runlock``), held for the run's life by the main process (rank 0 under accelerate)."""
    from generator.runlock import RunLock

    return RunLock(run.root) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


def _train(args, extra) -> int:
    from generator.training import split_rows

    cfg = resolve_config(args, extra)
    progress = not args.no_progress
    out = Path(cfg.train.out)
    if args.train_kind == "default":
        return _train_default(cfg, args, progress)
    rows = _rows(cfg, args.data)
    train_rows, val_rows = split_rows(rows, cfg.train.val_fraction, cfg.train.seed)
    run = _run_dir(cfg, args.train_kind, args.resume)
    with _run_lock(run):
        print(f"run folder: {run.root}  ({len(train_rows)} training, {len(val_rows)} validation images)")
        if args.train_kind == "vae":
            from generator.trainers import train_vae

            summary = train_vae(cfg.model, cfg.vae_train, cfg.data, train_rows, val_rows, run, out / "vae", progress)
        elif args.train_kind == "unet":
            summary = _train_unet(cfg, train_rows, run, out, progress, init_from=getattr(args, "init_from", None))
        else:
            summary = _train_lora(cfg, args, train_rows, run, progress)
    summary["command"] = "synthmed " + " ".join(sys.argv[1:])
    print(json.dumps({k: v for k, v in summary.items() if k != "environment"}, indent=2))
    return 0


def _load_vae(cfg):
    import torch
    from diffusers import AutoencoderKL

    if cfg.model.vae_pretrained:  # a folder or hub id (with model.vae_subfolder)
        from generator.models import build_vae

        return build_vae(cfg.model)
    folder = Path(cfg.train.out) / "vae"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no trained VAE in {folder}; run `synthmed train vae` first or set model.vae_pretrained")
    return AutoencoderKL.from_pretrained(folder, torch_dtype=torch.float32)


# model fields a continued model may change (``--init-from``): no weight depends on them
RETUNABLE_MODEL_FIELDS = ("text_max_length", "finding_tokens")


def _train_unet(cfg, train_rows, run, out, progress, init_from: str | None = None):
    from generator.conditioning import finding_vocabulary
    from generator.models import LatentDiffusion
    from generator.trainers import train_unet
    from generator.training import seed_everything

    seed_everything(cfg.train.seed)  # the UNet's and the conditioner's initial weights: a rerun (or a resume before the first checkpoint) draws the same
    if init_from:
        from generator.paths import shipped

        init_from = str(shipped(init_from))
        if not (Path(init_from) / "model.json").is_file():
            raise FileNotFoundError(f"--init-from {init_from}: not an exported model folder (no model.json); give e.g. generator/weights/default")
        vae_dir = Path(init_from) / "vae"
        model = LatentDiffusion.load(init_from, list(cfg.data.modalities), findings=finding_vocabulary(train_rows),
                                     finding_tokens=cfg.model.finding_tokens)
        saved, wanted = model.cfg.model_dump(mode="json"), cfg.model.model_dump(mode="json")
        differ = [f"model.{k}: {saved.get(k)!r} there, {wanted.get(k)!r} here" for k in sorted(set(saved) | set(wanted))
                  if saved.get(k) != wanted.get(k) and k not in RETUNABLE_MODEL_FIELDS]
        if differ:
            raise UserError(f"--init-from {init_from}: its architecture differs from this config's ({'; '.join(differ[:4])}); "
                            "use the profile it was trained with")
        # no weight's shape depends on how many prompt tokens the UNet attends to: a longer limit continues the same weights;
        # a finding table may be added to a model conditioned on text alone (it starts where the text leaves off)
        model.cfg = model.cfg.model_copy(update={"text_max_length": cfg.model.text_max_length})
        model.conditioner.text_encoder.max_length = cfg.model.text_max_length
    else:
        vae_dir = Path(cfg.model.vae_pretrained or Path(out) / "vae")
        model = LatentDiffusion(cfg.model, list(cfg.data.modalities), vae=_load_vae(cfg),
                                findings=finding_vocabulary(train_rows) if cfg.model.finding_tokens else None)
    vae_meta = json.loads((vae_dir / "metadata.json").read_text()) if (vae_dir / "metadata.json").is_file() else None
    cut = _warn_truncated(model, train_rows)
    provenance = {
        "config": cfg.model_dump(mode="json"),
        "data": sorted({r.source for r in train_rows}),
        "seed": cfg.train.seed,
        "vae": vae_meta,
        "command": "synthmed " + " ".join(sys.argv[1:]),
        "captions_truncated": cut,
    } | ({"init_from": init_from} if init_from else {})
    return train_unet(model, cfg.train, cfg.data, train_rows, run, out, progress, lora_cfg=cfg.lora, metadata=provenance)


def _warn_truncated(model, rows) -> int:
    """Counts the training captions longer than the model's token limit and says so on stderr: the UNet learns
    nothing from their ends (a finding stated late in a long report is cut off)."""
    encoder = model.conditioner.text_encoder
    lengths = encoder.token_lengths([r.text for r in rows])
    cut = sum(n > encoder.max_length for n in lengths)
    if cut:
        print(f"warning: {cut} of {len(rows)} training captions ({cut / len(rows):.1%}) are longer than model.text_max_length="
              f"{encoder.max_length} tokens and are cut there; --model.text_max_length={max(lengths)} keeps them whole",
              file=sys.stderr)
    return cut


def _train_lora(cfg, args, train_rows, run, progress):
    from generator.lora_training import train_lora_adapter
    from generator.models import LatentDiffusion

    model = LatentDiffusion.load(args.model or cfg.train.out, list(cfg.data.modalities))
    _warn_truncated(model, train_rows)
    return train_lora_adapter(model, cfg.lora, cfg.train, cfg.data, train_rows, run, args.adapter_out, progress)


def _train_default(cfg, args, progress) -> int:
    """The profile's shipped model: the VAE, then the UNet, on the profile's manifests (``data.manifests``, e.g.
    ``--config real``), else on phantoms drawn at the model's image size (the default profile)."""
    from generator.training import split_rows

    if args.data or cfg.data.manifests:
        rows = _rows(cfg, args.data)
    else:  # drawn at the model's size, beside the 128 px set
        rows = _rows(cfg, [phantom_manifest(cfg.phantoms, cfg.model.image_size, progress)])
    train_rows, val_rows = split_rows(rows, cfg.train.val_fraction, cfg.train.seed)
    from generator.trainers import train_vae

    out = Path(cfg.train.out)
    vae_run = _run_dir(cfg, "vae", None)
    with _run_lock(vae_run):
        vae_summary = train_vae(cfg.model, cfg.vae_train, cfg.data, train_rows, val_rows, vae_run, out / "vae", progress)
    print(table([[k, v] for k, v in vae_summary["val_metrics"].items()], ["VAE validation", "value"]))
    unet_run = _run_dir(cfg, "unet", None)
    with _run_lock(unet_run):
        summary = _train_unet(cfg, train_rows, unet_run, out, progress)
    print(f"model -> {out} ({summary['steps']} UNet steps, {summary['seconds']} s)")
    return 0


def _sample_sheet(args, extra) -> int:
    from generator.contact_sheet import generated_contact_sheet
    from generator.models import LatentDiffusion
    from generator.modalities import resolve_modality
    from generator.phantoms import PHANTOM_MODULES

    cfg = resolve_config(args, extra, {"sample.steps": args.steps, "sample.guidance": args.guidance, "sample.seed": args.seed})
    model = LatentDiffusion.load(args.model or cfg.train.out, device=resolve_device(cfg.run.device))
    modalities = ([resolve_modality(m, cfg.data.modalities) for m in args.modalities] if args.modalities
                  else [m for m in model.modalities if m in PHANTOM_MODULES])
    channels = {m: spec.channels for m, spec in cfg.data.modalities.items()}
    sc = cfg.sample
    rows = _rows(cfg, args.data) if (args.data or cfg.data.manifests) else None  # real images head the columns
    if rows is not None and not args.modalities:
        modalities = [m for m in model.modalities if any(r.modality == m for r in rows)]
    path = generated_contact_sheet(model, args.out, modalities, channels, per_cell=args.per_cell, steps=sc.steps,
                                   guidance=sc.guidance, seed=sc.seed, sampler=sc.sampler, rows=rows, data_cfg=cfg.data)
    print(f"contact sheet -> {path}")
    return 0


def _finding_arguments(texts: list[str], model, modality: str) -> list[dict]:
    """``--finding`` values as structured findings, each one the model's finding table knows for ``modality`` (or, for a
    model without finding tokens steered by an offset table, one the table has an offset for)."""
    from generator.conditioning import finding_key, parse_finding

    if not texts:
        return []
    steering = model.steering
    if model.finding_keys is None and steering is None:
        raise UserError("--finding needs a model with finding tokens (trained with --model.finding_tokens=true) or a "
                        "steered folder in --lora (synthmed runs steer); this model reads the text alone: state the "
                        "findings in the text")
    findings = [parse_finding(t) for t in texts]
    if model.finding_keys is not None:
        known = sorted(k.split(":", 1)[1] for k in model.finding_keys if k.startswith(modality + ":"))
        unknown = [f["name"] for f in findings if finding_key(modality, f["name"]) not in model.finding_keys]
        source = "the model has"
    else:
        names = {feature.split("|")[1] for feature in steering.table.features if feature.startswith(modality + "|")} - {"_bias"}
        known = sorted(names)
        unknown = [f["name"] for f in findings if f["name"] not in names]
        source = f"the steering table of {steering.source} has an offset for"
    if unknown:
        raise UserError(f"--finding {', '.join(unknown)}: {source} no {modality} finding of that name; it knows "
                        f"{', '.join(known) or 'none for this modality'}")
    return findings


def _text_findings(cfg, model, text: str, modality: str, progress: bool = True) -> list[dict]:
    """What ``text`` states, read by the graph's one reader of findings (hedged findings state nothing): a steered
    model's request features when ``--finding`` names none (a kind of finding the table lacks takes its parent's)."""
    from ..agent import finding_reader

    reader = finding_reader(cfg, progress=progress)  # builds the knowledge base where none is cached (a minute, with bars)
    model.steering.lineage = reader.lineage
    pathology = reader.read(text, modality)
    keep = ("name", "present", "laterality", "severity", "location")
    return [{k: v for k, v in f.model_dump().items() if k in keep and v is not None} for f in pathology.findings if not f.uncertain]


def _sample(args, extra) -> int:
    import time

    import torch
    from PIL import Image

    from generator.modalities import resolve_modality
    from generator.models import LatentDiffusion
    from generator.fileio import append_whole
    from generator.sampling import sample, sampling_dtype

    cfg = resolve_config(args, extra, {"sample.steps": args.steps, "sample.guidance": args.guidance,
                                       "sample.negative": args.negative, "sample.sampler": args.sampler, "sample.seed": args.seed})
    modality = resolve_modality(args.modality, cfg.data.modalities)
    model = LatentDiffusion.load(args.model or cfg.train.out, list(cfg.data.modalities), device=resolve_device(cfg.run.device))
    from generator.models import apply_model_adapters

    apply_model_adapters(model, list(args.lora) or list(cfg.sample.lora))
    findings = _finding_arguments(args.finding, model, modality)
    read_from_text = model.steering is not None and not findings
    if read_from_text:  # the table steers by what the request states: the text's findings, as the graph reads them
        findings = _text_findings(cfg, model, args.text, modality, progress=not args.no_progress)
    sc = cfg.sample
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    channels = {m: spec.channels for m, spec in cfg.data.modalities.items()}
    started = time.perf_counter()
    paths = []
    for start in range(0, args.n, sc.batch_size):
        n = min(sc.batch_size, args.n - start)
        with torch.inference_mode():
            output = sample(model, [args.text] * n, [modality] * n, negative=sc.negative or None, guidance=sc.guidance,
                            steps=sc.steps, seed=sc.seed + start, sampler=sc.sampler, eta=sc.eta,
                            guidance_schedule=sc.guidance_schedule, precision=sc.precision,
                            findings=[findings] * n if findings else None)
        for i, image in enumerate(output.to_uint8([modality] * n, channels)):
            path = out / f"{modality}_{sc.seed + start + i:05d}.png"
            Image.fromarray(image).save(path)
            paths.append(str(path))
    seconds = time.perf_counter() - started
    record = {"text": args.text, "modality": modality, **({"findings": findings} if findings else {}),
              **({"findings_read_from_text": True} if read_from_text else {}),
              **({"steering": {**model.steering.describe(),  # the table's features the images were steered by
                                "steered_by": model.steering.features([modality], [findings])[0]}}
                 if model.steering is not None else {}), "images": paths,
              "steps": sc.steps, "guidance": sc.guidance, "sampler": sc.sampler, "precision": str(sampling_dtype(sc.precision, model.device)).removeprefix("torch."),
              "negative": sc.negative, "seed": sc.seed, "seconds": round(seconds, 2),
              "seconds_per_image": round(seconds / max(1, args.n), 3), "model": str(args.model or cfg.train.out)}
    append_whole(out / "samples.jsonl", (json.dumps(record) + "\n").encode("utf-8"))
    print(f"{args.n} images in {seconds:.1f} s ({seconds / max(1, args.n):.2f} s/image) -> {out}")
    return 0
