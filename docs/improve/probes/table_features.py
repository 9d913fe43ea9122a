"""Probe: does a richer offset table steer the base better? The table of a table-stage run (its checkpoint keeps every
guided draft's features and shifts: `offset_pool`) refitted with more features per present finding (its severity, its
location, where the request states them) than the loop's (finding x side, stated absences, modality), and each table's
steered draws judged on the run's held-out set at a few gammas (the loop's table_gamma is 1.75).

The drafts' requests are redrawn by the run's prompt sampler (the loop's: `prompts_per_epoch` an epoch from the rollout
seed, `images_per_prompt` drafts each) and checked against the features the checkpoint kept, request for request.

From the repository root:
    python docs/improve/probes/table_features.py RUN [GAMMAS]     e.g. RUN = a `synthmed improve --config table` run,
GAMMAS = 1.25,1.75,2.25; --only loop|rich; --split N --split-gamma G: also the steered draws of an untouched split
(`synthmed runs test RUN --split N` drew its prompts) at G, with the split's seeds, once. Reads RUN/checkpoints/<last>/trainer_state.pt; writes nothing but its printout."""
import json
import sys
from pathlib import Path

import torch

from agents.requests import load_prompts
from generator.lora import merged_for_sampling
from pipelines.config import load_config
from pipelines.improve import build_parts
from rlhf.amortised import OffsetTable, request_features, table_steered_draw
from rlhf.heldout import heldout_evaluation

args = sys.argv[1:]
options = {}
for flag in ("--only", "--split", "--split-gamma"):
    if flag in args:
        i = args.index(flag)
        options[flag] = args[i + 1]
        del args[i:i + 2]
only = options.get("--only")
split = int(options["--split"]) if "--split" in options else None
split_gamma = float(options["--split-gamma"]) if "--split-gamma" in options else None
run = Path(args[0])
gammas = [float(g) for g in args[1].split(",")] if len(args) > 1 else [1.25, 1.75, 2.25]
cfg = load_config(run / "config.yaml")
ic = cfg.improve
parts = build_parts(cfg, progress=False)
model = parts.model
last = sorted(p for p in (run / "checkpoints").glob("epoch_*") if p.name[6:].isdigit())[-1]
pool = torch.load(last / "trainer_state.pt", weights_only=True)["trainer"]["offset_pool"]
kept, shifts = pool["features"], pool["shifts"].float()
per_epoch = ic.ddpo.prompts_per_epoch * ic.ddpo.images_per_prompt
epochs = len(kept) // per_epoch
items = [p for e in range(1, epochs + 1) for p in parts.sampler.draw(ic.ddpo.prompts_per_epoch, e, ic.ddpo.seed)
         for _ in range(ic.ddpo.images_per_prompt)]
assert [request_features(it.modality, it.findings) for it in items] == kept, "the redrawn requests are not the drafts'"
print(f"{len(kept)} drafts of {epochs} epochs ({last.name}); a request's findings look like {items[0].findings}", flush=True)


def rich(modality: str, findings) -> list[str]:
    """The loop's features and, per present finding, one for each attribute the request states beside its side."""
    out = request_features(modality, findings)
    for f in findings:
        if f["present"]:
            out += [f"{modality}|{f['name']}|{key}={f[key]}" for key in ("severity", "location") if f.get(key)]
    return out


model.scheduler.set_timesteps(ic.ddpo.steps)
timesteps = [int(t) for t in model.scheduler.timesteps]
heldout = load_prompts(run / "heldout_prompts.jsonl")
k = ic.eval.images_per_prompt
expanded = [it for it in heldout for _ in range(k)]
KEYS = ("all_requested_shown", "requested_shown", "finding_accuracy", "fd", "ms_ssim", "clip_score")


def judge(images, tag, prompts=None):
    r = heldout_evaluation(model, prompts or heldout, parts.judges, parts.reference, ic.eval, cfg.judges.eval, ic.ddpo.guidance,
                           parts.train_images, progress=False, images=images)
    row = {"table": tag, **{key: round(r["overall"][key], 4) for key in KEYS},
           "per_modality": {m: v["all_requested_shown"] for m, v in r["per_modality"].items()},
           "fd_per_modality": {m: round(v["fd"], 1) for m, v in r["per_modality"].items() if "fd" in v}}
    print(json.dumps(row), flush=True)
    return row


def steered(table, gamma, prompts, featurise, seed0):
    drawn = [it for it in prompts for _ in range(k)]
    with torch.no_grad(), merged_for_sampling(model.unet):
        return table_steered_draw(model, table, gamma, [it.prompt for it in drawn], [it.modality for it in drawn],
                                  [featurise(it.modality, it.findings) for it in drawn], [seed0 + i for i in range(len(drawn))],
                                  ic.eval.steps, ic.ddpo.guidance, [it.negative for it in drawn],
                                  [it.generator_findings for it in drawn], batch_size=20).images


for name, featurise in (("loop", request_features), ("rich", rich)):
    if only and name != only:
        continue
    feats = [featurise(it.modality, it.findings) for it in items]
    table = OffsetTable.fit(feats, shifts, timesteps, ic.selection.table_ridge)
    print(name, "features", len(table.features), "R2 per step", [round(v, 3) for v in table.r2(feats, shifts)], flush=True)
    held_feats = [featurise(it.modality, it.findings) for it in expanded]
    unseen = sorted({f for fs in held_feats for f in fs} - set(table.features))
    print(name, "held-out features the table has no offset for:", len(unseen), unseen[:6], flush=True)
    for gamma in gammas:
        judge(steered(table, gamma, heldout, featurise, ic.eval.seed), f"{name} x{gamma:g}")
    if split and split_gamma:
        from pipelines.improve import split_paths, split_seed

        prompts = load_prompts(split_paths(run, split)[0])
        seed0 = split_seed(ic.eval.test_seed, split)
        judge(steered(table, split_gamma, prompts, featurise, seed0), f"{name} x{split_gamma:g}, split {split}", prompts)
