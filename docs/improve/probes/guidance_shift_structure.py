"""Probe: how much of reward guidance's per-step shift is set by the jittered views (noise a distillation target
cannot fit) and how much is shared by images of the same request (what a shared adapter could learn).

From the repository root: python docs/improve/probes/guidance_shift_structure.py (docs/improve/long_runs.md)."""
import json
import numpy as np, torch
from accelerate import Accelerator
from pipelines.config import load_config
from pipelines.improve import build_parts
from rlhf.trainer import DDPOTrainer, sample_seed
from rlhf.ddpo import guidance_shift, predicted_x0
from rlhf.guidance import RewardGuide, reward_guided_draw
from generator.lora import merged_for_sampling

torch.set_num_threads(2)
cfg = load_config("tiny")
parts = build_parts(cfg, device="cpu", progress=False, load_eval=False)
ic = cfg.improve
model = parts.model
trainer = DDPOTrainer(model, parts.reward, ic.ddpo, ic.selection, Accelerator(cpu=True), None)
guide = RewardGuide(trainer.reward_scorer("probe"), 0.1, 4, ic.ddpo.draft_view_shift, ic.ddpo.draft_view_zoom)
prompts = parts.sampler.draw(8, 1, 0)
items = [p for p in prompts for _ in range(4)]  # 8 requests x 4 noise seeds
stated = [guide.stated(dict(it.expected), it.modality) for it in items]
seeds = [sample_seed(0, 1, i) for i in range(len(items))]
view_seed = lambda i, step: int(np.random.default_rng([0, 1, i, step, 29]).integers(2**31 - 1))
with merged_for_sampling(model.unet):
    draw = reward_guided_draw(model, guide, [it.prompt for it in items], [it.modality for it in items], stated, seeds, view_seed,
                              ic.ddpo.steps, ic.ddpo.guidance, negatives=[it.negative for it in items],
                              findings=[it.generator_findings for it in items], batch_size=8, keep_trajectory=True)
    from generator.sampling import guided_conditioning, guided_prediction
    sched = model.scheduler
    sched.set_timesteps(ic.ddpo.steps)
    kind = sched.config.prediction_type
    rows = []
    for j, t in enumerate(sched.timesteps):
        x = draw.states[:, j]
        with torch.no_grad():
            cond = guided_conditioning(model, [it.prompt for it in items], [it.modality for it in items], [it.negative for it in items],
                                       ic.ddpo.guidance, [it.generator_findings for it in items])
            out = guided_prediction(model, x, t.expand(len(items)), cond, ic.ddpo.guidance)
        alpha = sched.alphas_cumprod[int(t)]
        x0 = predicted_x0(out.float(), x.float(), alpha, kind)
        shifts = []
        for k in range(4):
            g = guide.gradient(model, x0, [it.modality for it in items], stated, [1000 * k + 7 * i + j for i in range(len(items))])
            shifts.append(guidance_shift(g, 0.1, alpha).flatten(1))
        S = torch.stack(shifts)  # (K, N, D)
        mean = S.mean(0)
        within = (S - mean).pow(2).sum(-1).mean(0)  # per sample
        total = S.pow(2).sum(-1).mean(0)
        view_share = float((within / total.clamp_min(1e-12)).mean())
        cos_views = float(torch.stack([torch.nn.functional.cosine_similarity(S[a], S[b], dim=-1)
                                       for a in range(4) for b in range(a + 1, 4)]).mean())
        # same request, other noise: the view-averaged shifts of the 4 images of each request
        m = torch.nn.functional.normalize(mean, dim=-1).view(8, 4, -1)
        same = float(torch.stack([(m[r, a] * m[r, b]).sum() for r in range(8) for a in range(4) for b in range(a + 1, 4)]).mean())
        other = float(torch.stack([(m[r, 0] * m[q, 0]).sum() for r in range(8) for q in range(8) if q != r
                                   and items[4 * r].modality == items[4 * q].modality] or [torch.tensor(float("nan"))]).mean())
        rows.append({"step": j, "t": int(t), "view_noise_share": round(view_share, 3), "cos_between_view_draws": round(cos_views, 3),
                     "cos_same_request_other_noise": round(same, 3), "cos_other_request_same_modality": round(other, 3)})
        print(json.dumps(rows[-1]), flush=True)
json.dump(rows, open("guidance_shift_structure.json", "w"), indent=1)  # in the folder it runs from
