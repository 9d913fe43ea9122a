"""Probe: bf16 autocast in the loop's rollouts and PPO update: time and the on-policy ratio.

From the repository root: python docs/improve/probes/bf16_loop.py fp32, then bf16 (docs/improve/long_runs.md)."""
import json, sys, time
import numpy as np, torch
from accelerate import Accelerator
from pipelines.config import load_config
from pipelines.improve import build_parts
import rlhf.trainer as T
from rlhf.trainer import DDPOTrainer

torch.set_num_threads(2)
mode = sys.argv[1]
cfg = load_config("tiny")
parts = build_parts(cfg, device="cpu", progress=False, load_eval=False)
ic = cfg.improve
orig = T.guided_prediction
if mode == "bf16":
    def wrapped(*a, **k):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return orig(*a, **k).float()
    T.guided_prediction = wrapped
acc = Accelerator(cpu=True)
trainer = DDPOTrainer(parts.model, parts.reward, ic.ddpo, ic.selection, acc, parts.selector_threshold)
k = ic.ddpo.images_per_prompt
out = []
for epoch in (1, 2):
    prompts = parts.sampler.draw(ic.ddpo.prompts_per_epoch, epoch, ic.ddpo.seed)
    items = [p for p in prompts for _ in range(k)]
    groups = [f"{epoch}:{i // k}" for i in range(len(items))]
    t0 = time.perf_counter(); r = trainer.rollout(items, list(range(len(items))), epoch, False); t1 = time.perf_counter()
    res = parts.reward(r.images, items, progress=False)
    adv = trainer.advantages(res.total, groups, [it.prompt for it in items])
    t2 = time.perf_counter(); u = trainer.update(r, adv, epoch, False); t3 = time.perf_counter()
    s0 = u.steps[0]
    out.append({"epoch": epoch, "rollout_s": round(t1 - t0, 2), "update_s": round(t3 - t2, 2),
                "first_ratio": [s0["ratio_min"], s0["ratio_max"]], "first_clipfrac": s0["clipfrac"],
                "clipfrac_mean": float(np.mean([s["clipfrac"] for s in u.steps])),
                "approx_kl_first": s0["approx_kl"], "reward_mean": float(res.total.mean())})
    print(json.dumps(out[-1]), flush=True)
