"""Probe: amortised reward guidance. Fit, per DDIM step, a latent offset per (modality, finding, stated state, side) to
the shifts reward guidance applied to x0_hat on guided drafts of TRAINING requests (ridge regression on indicator
features), then sample the held-out requests with plain DDIM plus the fitted offsets (no classifier at sampling) and
judge them with the evaluator. The evaluator never enters the fit.

From the repository root: python docs/improve/probes/amortised_guidance.py EPOCHS_OF_DRAFTS GAMMAS [LAMBDA] [--heldout-only],
e.g. 36 1.0,1.25,1.5 (ridge lambda 1; the test set judged at gamma 0 and the chosen gamma unless --heldout-only;
docs/improve/long_runs.md)."""
import json, sys, time
import numpy as np, torch
from accelerate import Accelerator
from pipelines.config import load_config
from pipelines.improve import build_parts
from rlhf.trainer import DDPOTrainer, sample_seed
from rlhf.ddpo import predicted_x0, output_for_x0
from rlhf.guidance import RewardGuide, reward_guided_draw
from rlhf.heldout import heldout_evaluation
from generator.lora import merged_for_sampling
from generator.sampling import guided_conditioning, guided_prediction, initial_noise
from generator.ddim_logprob import ddim_step_with_logprob
from generator.models import latent_size

torch.set_num_threads(2)
N_EPOCHS = int(sys.argv[1]) if len(sys.argv) > 1 else 12
HELDOUT_ONLY = "--heldout-only" in sys.argv
cfg = load_config("tiny")
ic = cfg.improve
parts = build_parts(cfg, device="cpu", progress=False, load_eval=True)
model = parts.model
trainer = DDPOTrainer(model, parts.reward, ic.ddpo, ic.selection, Accelerator(cpu=True), None)
guide = RewardGuide(trainer.reward_scorer("probe"), 0.1, 4, ic.ddpo.draft_view_shift, ic.ddpo.draft_view_zoom)
sched = model.scheduler
kind = sched.config.prediction_type
T = ic.ddpo.steps

def feats(it):
    out = [(it.modality, "_bias")]
    for f in it.findings:
        if f["present"]:
            out.append((it.modality, f["name"], "present", f.get("laterality") or "-"))
        elif f.get("stated", True):
            out.append((it.modality, f["name"], "absent"))
    return out

# 1. guided drafts of training requests
items = [p for e in range(1, N_EPOCHS + 1) for p in parts.sampler.draw(ic.ddpo.prompts_per_epoch, e, 1000)]
seeds = [sample_seed(7, 0, i) for i in range(len(items))]
t0 = time.time()
with merged_for_sampling(model.unet):
    draw = reward_guided_draw(model, guide, [it.prompt for it in items], [it.modality for it in items],
                              [guide.stated(dict(it.expected), it.modality) for it in items], seeds,
                              lambda i, j: int(np.random.default_rng([7, i, j, 29]).integers(2**31 - 1)), T, ic.ddpo.guidance,
                              negatives=[it.negative for it in items], findings=[it.generator_findings for it in items],
                              batch_size=20, keep_trajectory=True)
    print(f"{len(items)} guided drafts in {time.time() - t0:.0f} s", flush=True)
    sched.set_timesteps(T)
    shifts = torch.zeros(len(items), T, *draw.states.shape[2:])
    with torch.no_grad():
        for s in range(0, len(items), 20):
            rows = list(range(s, min(len(items), s + 20)))
            cond = guided_conditioning(model, [items[i].prompt for i in rows], [items[i].modality for i in rows],
                                       [items[i].negative for i in rows], ic.ddpo.guidance, [items[i].generator_findings for i in rows])
            for j, t in enumerate(sched.timesteps):
                x = draw.states[rows, j]
                out = guided_prediction(model, x, t.expand(len(rows)), cond, ic.ddpo.guidance).float()
                a = sched.alphas_cumprod[int(t)]
                shifts[rows, j] = predicted_x0(draw.targets[rows, j].float(), x.float(), a, kind) - predicted_x0(out, x.float(), a, kind)
print("shift rms per step", [round(float(shifts[:, j].pow(2).mean().sqrt()), 4) for j in range(T)], flush=True)

# 2. ridge fit per step
vocab = sorted({f for it in items for f in feats(it)}, key=str)
index = {f: k for k, f in enumerate(vocab)}
X = torch.zeros(len(items), len(vocab))
for i, it in enumerate(items):
    for f in feats(it):
        X[i, index[f]] = 1.0
args = [a for a in sys.argv[1:] if not a.startswith("--")]
lam = float(args[2]) if len(args) > 2 else 1.0
W = []
for j in range(T):
    Y = shifts[:, j].flatten(1)
    A = X.T @ X + lam * torch.eye(len(vocab))
    W.append(torch.linalg.solve(A, X.T @ Y))
W = torch.stack(W)  # (T, F, D)
pred = torch.einsum("nf,tfd->ntd", X, W)
r2 = [1 - float((shifts[:, j].flatten(1) - pred[:, j]).pow(2).sum() / shifts[:, j].flatten(1).pow(2).sum()) for j in range(T)]
print("features", len(vocab), "train R2 per step", [round(v, 3) for v in r2], flush=True)

# 3. plain DDIM plus the fitted offsets
def table_draw(its, seed0, gamma):
    k = ic.eval.images_per_prompt
    expanded = [it for it in its for _ in range(k)]
    size = latent_size(model.cfg)
    shape = (model.cfg.latent_channels, size, size)
    sched.set_timesteps(ic.eval.steps)
    imgs = []
    with torch.no_grad(), merged_for_sampling(model.unet):
        for s in range(0, len(expanded), 20):
            rows = list(range(s, min(len(expanded), s + 20)))
            x = torch.cat([initial_noise(1, shape, seed0 + i)[0] for i in rows]) * sched.init_noise_sigma
            cond = guided_conditioning(model, [expanded[i].prompt for i in rows], [expanded[i].modality for i in rows],
                                       [expanded[i].negative for i in rows], ic.ddpo.guidance, [expanded[i].generator_findings for i in rows])
            xf = torch.zeros(len(rows), len(vocab))
            for r, i in enumerate(rows):
                for f in feats(expanded[i]):
                    if f in index:
                        xf[r, index[f]] = 1.0
            for j, t in enumerate(sched.timesteps):
                out = guided_prediction(model, x, t.expand(len(rows)), cond, ic.ddpo.guidance).float()
                a = sched.alphas_cumprod[int(t)]
                x0 = predicted_x0(out, x.float(), a, kind) + gamma * (xf @ W[j]).view_as(x)
                x = ddim_step_with_logprob(sched, output_for_x0(x0, x.float(), a, kind), t, x, eta=0.0).prev_sample
            imgs.append(model.decode(x).float().cpu())
    return torch.cat(imgs)

heldout, test = parts.sampler.heldout(), parts.sampler.test()
assert ic.eval.steps == T
def judge(its, seed0, gamma, tag):
    images = table_draw(its, seed0, gamma)
    r = heldout_evaluation(model, its, parts.judges, parts.reference, ic.eval.model_copy(update={"seed": seed0}), cfg.judges.eval,
                           ic.ddpo.guidance, parts.train_images, progress=False, images=images)
    o = r["overall"]
    row = {"set": tag, "gamma": gamma, **{k: o.get(k) for k in ("all_requested_shown", "requested_shown", "finding_accuracy", "fd", "ms_ssim", "clip_score")},
           "per_modality": {m: v.get("all_requested_shown") for m, v in r["per_modality"].items()}}
    print(json.dumps(row), flush=True)
    return row
GAMMAS = [float(g) for g in args[1].split(",")] if len(args) > 1 else [1.0, 2.0, 3.0]
rows = [judge(heldout, ic.eval.seed, g, "heldout") for g in [0.0, *GAMMAS]]
ok = [r for r in rows if r["gamma"] > 0 and r["fd"] <= 1.1 * rows[0]["fd"] and r["ms_ssim"] <= rows[0]["ms_ssim"] + 0.05]
best = max(ok, key=lambda r: r["all_requested_shown"]) if ok else None
print("chosen on held-out:", best and best["gamma"], flush=True)
out = {"rows": rows}
if best and not HELDOUT_ONLY:
    out["test"] = [judge(test, ic.eval.test_seed, 0.0, "test"), judge(test, ic.eval.test_seed, best["gamma"], "test")]
json.dump(out, open(f"amortised_guidance_{N_EPOCHS}.json", "w"), indent=1)  # in the folder it runs from
