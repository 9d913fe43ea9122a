"""Probe: average a run's adapters of several epochs (a "soup": each LoRA matrix, A and B, averaged over the adapters,
all of one run and so of one initialisation) and judge the average as `synthmed runs test` judges an adapter.

A table-stage run's held-out share moves by a few images from one evaluation to the next (docs/improve/long_runs.md),
and each epoch fits new requests: an average of the late epochs' weights is the cheapest check of whether that motion
is noise around a better adapter (stochastic weight averaging) before building an EMA into the loop.

The run's held-out set (its prompts, seeds and sampler: the run's own evaluation, figure for figure at one adapter) is
read for every average; an untouched split (`synthmed runs test RUN --split N` wrote its prompts) is read for the
averages named by --split-for, with the split's own seeds (the test set's + 100,000 N).

From the repository root:
    python docs/improve/probes/adapter_soup.py RUN OUT NAME=FOLDER[+FOLDER...] ... [--split N] [--split-for NAME,...]
e.g. RUN/best (epoch 28) + RUN/checkpoints/epoch_0031 + RUN/checkpoints/epoch_0032. Writes OUT/soup.json and each
average as a peft adapter OUT/NAME/ (what --lora loads)."""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from agents.requests import load_prompts
from generator.lora import load_lora, merged_for_sampling, read_lora_metadata
from pipelines.config import load_config
from pipelines.improve import build_parts, judge_test_set, save_adapter, split_paths, split_seed
from rlhf.heldout import heldout_evaluation

args = sys.argv[1:]
split, split_for = None, []
if "--split" in args:
    i = args.index("--split")
    split = int(args[i + 1])
    del args[i:i + 2]
if "--split-for" in args:
    i = args.index("--split-for")
    split_for = args[i + 1].split(",")
    del args[i:i + 2]
run, out = Path(args[0]), Path(args[1])
soups = {name: [Path(f) for f in folders.split("+")] for name, folders in (a.split("=", 1) for a in args[2:])}
out.mkdir(parents=True, exist_ok=True)

cfg = load_config(run / "config.yaml")
ic = cfg.improve
parts = build_parts(cfg, progress=True)
model = parts.model
heldout = load_prompts(run / "heldout_prompts.jsonl")
test = load_prompts(split_paths(run, split)[0]) if split else []
KEYS = ("all_requested_shown", "requested_shown", "finding_accuracy", "fd", "ms_ssim", "clip_score")
results = {}
for name, folders in soups.items():
    weights = [load_file(str(f / "lora.safetensors")) for f in folders]
    keys = sorted(weights[0])
    assert all(sorted(w) == keys for w in weights), f"{name}: the adapters' tensors differ"
    mean = {k: torch.stack([w[k].float() for w in weights]).mean(0) for k in keys}
    tmp = out / f"{name}.safetensors"  # the averaged tensors onto the model's adapter, as a saved file loads
    save_file({k: v.contiguous() for k, v in mean.items()}, str(tmp), metadata=read_lora_metadata(folders[0] / "lora.safetensors"))
    load_lora(model.unet, tmp, "default")
    tmp.unlink()
    with merged_for_sampling(model.unet):
        held = heldout_evaluation(model, heldout, parts.judges, parts.reference, ic.eval, cfg.judges.eval, ic.ddpo.guidance,
                                  parts.train_images, ic.ddpo.sample_batch_size, True, label=f"held-out eval ({name})")
    held.pop("images")
    row = {"folders": [str(f) for f in folders],
           "heldout": {k: held["overall"][k] for k in KEYS},
           "heldout_per_modality": {m: v["all_requested_shown"] for m, v in held["per_modality"].items()}}
    if split and name in split_for:
        got = judge_test_set(model, test, parts, cfg, name, True, seed=split_seed(ic.eval.test_seed, split))
        row[f"split{split}"] = {k: got["overall"][k] for k in KEYS}
        row[f"split{split}_per_modality"] = {m: v["all_requested_shown"] for m, v in got["per_modality"].items()}
    save_adapter(model, out / name, {"run": str(run), "soup_of": row["folders"], "kind": "synthmed LoRA adapter (an average)"})
    results[name] = row
    print(name, json.dumps({k: v for k, v in row.items() if k != "folders"}), flush=True)
    (out / "soup.json").write_text(json.dumps(results, indent=2))
