"""Probe: amortised reward guidance. Fit, per DDIM step, a latent offset per (modality, finding, stated state, side) to
the shifts reward guidance applied to x0_hat on guided drafts of TRAINING requests (ridge regression on indicator
features), then sample the held-out requests with plain DDIM plus the fitted offsets (no classifier at sampling) and
judge them with the evaluator. The evaluator never enters the fit.

From the repository root: python docs/improve/probes/amortised_guidance.py EPOCHS_OF_DRAFTS GAMMAS [LAMBDA] [--heldout-only],
e.g. 36 1.0,1.25,1.5 (ridge lambda 1; the test set judged at gamma 0 and the chosen gamma unless --heldout-only;
docs/improve/long_runs.md). SHIFTS_CACHE=path.pt keeps the drafts' shifts between runs (they take most of the time);
PROBE_OVERRIDES="--lora.rank=16 ..." overrides the tiny profile.
The table and the steered draw are rlhf.amortised's; table_to_lora.py imports the pieces below."""
import json, os, sys, time
import numpy as np, torch
from accelerate import Accelerator
from pipelines.config import load_config
from pipelines.improve import build_parts
from rlhf.trainer import DDPOTrainer, sample_seed
from rlhf.amortised import OffsetTable, request_features, table_steered_draw
from rlhf.guidance import RewardGuide, reward_guided_draw
from rlhf.heldout import heldout_evaluation
from generator.lora import merged_for_sampling
from generator.sampling import guided_conditioning


class Probe:
    """The tiny profile's parts, the loop's trainer and reward guide, and the sampler's settings."""

    def __init__(self, threads: int = 2):
        torch.set_num_threads(threads)
        self.cfg = load_config("tiny", os.environ.get("PROBE_OVERRIDES", "").split())  # e.g. "--lora.include_out=true"
        self.ic = self.cfg.improve
        self.parts = build_parts(self.cfg, device="cpu", progress=False, load_eval=True)
        self.model = self.parts.model
        self.trainer = DDPOTrainer(self.model, self.parts.reward, self.ic.ddpo, self.ic.selection, Accelerator(cpu=True), None)
        self.sched = self.model.scheduler
        self.kind = self.sched.config.prediction_type
        self.T = self.ic.ddpo.steps
        assert self.ic.eval.steps == self.T

    def training_items(self, n_epochs: int, first: int = 1):
        return [p for e in range(first, first + n_epochs) for p in self.parts.sampler.draw(self.ic.ddpo.prompts_per_epoch, e, 1000)]

    def conditioning(self, its):
        g = self.ic.ddpo.guidance
        return guided_conditioning(self.model, [it.prompt for it in its], [it.modality for it in its],
                                   [it.negative for it in its], g, [it.generator_findings for it in its])

    def guided_shifts(self, items, cache: str | None = None) -> torch.Tensor:
        """(N, T, C, H, W): at each step of each item's reward-guided draft, guidance's shift of x0_hat."""
        if cache and os.path.exists(cache):
            return torch.load(cache)
        ic, model = self.ic, self.model
        guide = RewardGuide(self.trainer.reward_scorer("probe"), 0.1, 4, ic.ddpo.draft_view_shift, ic.ddpo.draft_view_zoom)
        seeds = [sample_seed(7, 0, i) for i in range(len(items))]
        t0 = time.time()
        args = ([it.prompt for it in items], [it.modality for it in items])
        kw = dict(negatives=[it.negative for it in items], findings=[it.generator_findings for it in items], batch_size=20)
        with merged_for_sampling(model.unet), torch.no_grad():
            draw = reward_guided_draw(model, guide, *args, [guide.stated(dict(it.expected), it.modality) for it in items], seeds,
                                      lambda i, j: int(np.random.default_rng([7, i, j, 29]).integers(2**31 - 1)), self.T, ic.ddpo.guidance,
                                      keep_trajectory=True, **kw)
            print(f"{len(items)} guided drafts in {time.time() - t0:.0f} s", flush=True)
            shifts = draw.shifts
        if cache:
            torch.save(shifts, cache)
        return shifts

    def judge(self, its, seed0, tag, images=None, **extra):
        """The held-out evaluation's figures of ``images`` (or of the model's own deterministic draws)."""
        ic = self.ic
        r = heldout_evaluation(self.model, its, self.parts.judges, self.parts.reference, ic.eval.model_copy(update={"seed": seed0}),
                               self.cfg.judges.eval, ic.ddpo.guidance, self.parts.train_images, progress=False, images=images)
        o = r["overall"]
        row = {"set": tag, **extra, **{k: o.get(k) for k in ("all_requested_shown", "requested_shown", "finding_accuracy", "fd", "ms_ssim", "clip_score")},
               "per_modality": {m: v.get("all_requested_shown") for m, v in r["per_modality"].items()}}
        print(json.dumps(row), flush=True)
        return row


def features(its):
    return [request_features(it.modality, it.findings) for it in its]


def fit_table(p: Probe, items, shifts, ridge: float = 1.0) -> OffsetTable:
    p.sched.set_timesteps(p.T)
    table = OffsetTable.fit(features(items), shifts, [int(t) for t in p.sched.timesteps], ridge)
    print("features", len(table.features), "train R2 per step", [round(v, 3) for v in table.r2(features(items), shifts)], flush=True)
    return table


def table_draw(p: Probe, table: OffsetTable, its, seed0, gamma, keep=False):
    """The held-out sampler (DDIM eta 0, its steps and guidance, images_per_prompt per request, image i from seed0 + i)
    with x0_hat moved by gamma x the table's offset: the images, or with ``keep`` the requests as drawn and the draw."""
    k = p.ic.eval.images_per_prompt
    expanded = [it for it in its for _ in range(k)]
    with torch.no_grad(), merged_for_sampling(p.model.unet):
        draw = table_steered_draw(p.model, table, gamma, [it.prompt for it in expanded], [it.modality for it in expanded],
                                  features(expanded), [seed0 + i for i in range(len(expanded))], p.ic.eval.steps, p.ic.ddpo.guidance,
                                  negatives=[it.negative for it in expanded], findings=[it.generator_findings for it in expanded],
                                  batch_size=20, keep_trajectory=keep)
    return (expanded, draw) if keep else draw.images


def choose(rows, base):
    """The highest share among rows within the gain's terms against ``base`` (FD <= +10%, MS-SSIM <= +0.05)."""
    ok = [r for r in rows if r["fd"] <= 1.1 * base["fd"] and r["ms_ssim"] <= base["ms_ssim"] + 0.05]
    return max(ok, key=lambda r: r["all_requested_shown"]) if ok else None


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    n_epochs = int(args[0]) if args else 12
    gammas = [float(g) for g in args[1].split(",")] if len(args) > 1 else [1.0, 2.0, 3.0]
    lam = float(args[2]) if len(args) > 2 else 1.0
    p = Probe()
    items = p.training_items(n_epochs)
    shifts = p.guided_shifts(items, os.environ.get("SHIFTS_CACHE"))
    print("shift rms per step", [round(float(shifts[:, j].pow(2).mean().sqrt()), 4) for j in range(p.T)], flush=True)
    table = fit_table(p, items, shifts, lam)
    heldout, test = p.parts.sampler.heldout(), p.parts.sampler.test()
    rows = [p.judge(heldout, p.ic.eval.seed, "heldout", table_draw(p, table, heldout, p.ic.eval.seed, g), gamma=g) for g in [0.0, *gammas]]
    best = choose(rows[1:], rows[0])
    print("chosen on held-out:", best and best["gamma"], flush=True)
    out = {"rows": rows}
    if best and "--heldout-only" not in sys.argv:
        out["test"] = [p.judge(test, p.ic.eval.test_seed, "test", table_draw(p, table, test, p.ic.eval.test_seed, g), gamma=g)
                       for g in (0.0, best["gamma"])]
    json.dump(out, open(f"amortised_guidance_{n_epochs}.json", "w"), indent=1)  # in the folder it runs from
