"""`synthmed eval`: a per-modality table of generated against real images, written into a run folder."""

from __future__ import annotations

import json
import sys
import time

from generator.errors import UserError
from generator.fileio import write_text_atomic
from generator.paths import shipped

from .common import add_config_argument, resolve_config, resolve_device


def register(groups, formatter) -> None:
    e = groups.add_parser(
        "eval", help="generated vs real images per modality: FD, diversity, CLIP score, held-out finding accuracy, memorisation",
        formatter_class=formatter,
        description="Without --model and --data: the profile's shipped model against its data's validation split (--config real),\n"
                    "or against fresh phantoms drawn with judges.eval.seed (the default profile).\n"
        "Writes runs/<name>-eval-<time>/ with eval.md, eval.json, config.yaml, metadata.json and samples/.",
    )
    add_config_argument(e)
    e.add_argument("--model", help="generator folder (default: train.out, the shipped model)")
    e.add_argument("--lora", nargs="+", help="LoRA adapters on the generator: files, a run's final/ or best/, a "
                   "`synthmed improve` run folder, or a run's steered/ (`synthmed runs steer`: the run's offset table moves "
                   "every sampling step by the findings each request states) (default: sample.lora)")
    e.add_argument("--data", nargs="+", help="manifests of real images to compare with (default: the profile's data.manifests, "
                   "their validation split where they tag one; else fresh phantoms)")
    e.add_argument("--modalities", nargs="+", help="default: every modality of the data that the model knows")
    e.add_argument("--n-per-prompt", type=int, help="generated images per prompt (config: judges.eval.n_per_prompt)")
    e.add_argument("--prompts", type=int, help="prompts per modality (config: judges.eval.prompts_per_modality)")
    e.add_argument("--reference-per-finding", type=int, default=8,
                   help="phantom reference studies per finding (default data only); manifests give up to 8x this per modality")
    e.add_argument("--train-data", nargs="+", help="manifests of the generator's training images, for the memorisation check "
                   "(default: those its metadata.json names, or its phantom set, drawn again if absent)")
    e.add_argument("--steps", type=int, help="denoising steps (config: judges.eval.steps)")
    e.add_argument("--guidance", type=float, help="guidance scale (config: judges.eval.guidance)")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(handler=_eval)


def _eval(args, extra) -> int:
    from generator.modalities import resolve_modality
    from generator.models import LatentDiffusion
    from generator.training import environment, make_run_dir
    from pipelines.config import save_config
    from rlhf.evaluate import (
        evaluate,
        load_judges,
        manifest_cases,
        markdown_table,
        model_training_images,
        phantom_cases,
        to_json,
    )

    cfg = resolve_config(args, extra, {"judges.eval.n_per_prompt": args.n_per_prompt, "judges.eval.prompts_per_modality": args.prompts,
                                       "judges.eval.steps": args.steps, "judges.eval.guidance": args.guidance})
    ec = cfg.judges.eval
    device = resolve_device(cfg.run.device)
    model_dir = shipped(args.model or cfg.train.out)  # its metadata.json names the training images, from any folder
    model = LatentDiffusion.load(model_dir, device=device)
    from generator.models import apply_model_adapters

    adapters = list(args.lora or cfg.sample.lora)
    apply_model_adapters(model, adapters)
    size = model.cfg.image_size
    wanted = [resolve_modality(m, cfg.data.modalities) for m in args.modalities] if args.modalities else None
    data = args.data or list(cfg.data.manifests)  # a profile of real images (--config real) compares with its own
    if data:
        cases = manifest_cases(data, cfg.data, size, wanted, 8 * args.reference_per_finding, ec.seed)
    else:
        from generator.phantoms import phantom_modalities

        modalities = wanted or [m for m in model.modalities if m in phantom_modalities()]
        cases = phantom_cases(modalities, size, args.reference_per_finding, ec.seed)
    if not cases:
        raise UserError("nothing to evaluate: the data holds no rows of the requested modalities")
    modalities = sorted({c.modality for c in cases})
    judges = load_judges(cfg.judges, modalities, device=device)
    run = make_run_dir(cfg.run.runs_dir, f"{cfg.run.name}-eval")
    save_config(cfg, run.root / "config.yaml")
    started = time.time()
    result = evaluate(model, cases, judges, ec, train_images=model_training_images(model_dir, size, cfg, not (args.no_progress or args.json),
                                                                                  args.train_data),
                      channels={m: s.channels for m, s in cfg.data.modalities.items()}, sample_dir=run.samples,
                      progress=not (args.no_progress or args.json), batch_size=cfg.sample.batch_size)
    result |= {"model": str(model_dir), "lora": adapters, "data": data or f"phantoms (seed {ec.seed}, {args.reference_per_finding} per finding)",
               "run": str(run.root), **({"steering": model.steering.describe()} if model.steering is not None else {})}
    table = markdown_table(result)
    from ..runs import steering_text

    steered = (f" (steered by its offset table {steering_text(model.steering.gamma, model.steering.gammas)})"
               if model.steering is not None else "")
    write_text_atomic(run.root / "eval.md", f"# synthmed eval\n\nmodel: `{model_dir}`{' + LoRA ' + ', '.join(adapters) if adapters else ''}"
                      f"{steered}; data: {result['data']}\n\n" + table)
    write_text_atomic(run.root / "eval.json", to_json(result))
    write_text_atomic(run.root / "metadata.json", json.dumps({
        "kind": "synthmed eval", "model": str(model_dir), "data": result["data"], "seed": ec.seed,
        "seconds": round(time.time() - started, 1), "environment": environment(),
        "command": "synthmed " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("synthmed") else "synthmed eval",
    }, indent=2) + "\n")
    if args.json:
        print(to_json(result))
    else:
        print(table)
        print(f"-> {run.root}/eval.md, eval.json")
    return 0
