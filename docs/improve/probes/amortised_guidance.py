"""Probe: amortised reward guidance. Fit, per DDIM step, a latent offset per (modality, finding, stated state, side) to
the shifts reward guidance applied to x0_hat on guided drafts of TRAINING requests (ridge regression on indicator
features), then sample the held-out requests with plain DDIM plus the fitted offsets (no classifier at sampling) and
judge them with the evaluator. The evaluator never enters the fit.

From the repository root: python docs/improve/probes/amortised_guidance.py EPOCHS_OF_DRAFTS GAMMAS [LAMBDA] [--heldout-only],
e.g. 36 1.0,1.25,1.5 (ridge lambda 1; the test set judged at gamma 0 and the chosen gamma unless --heldout-only;
docs/improve/long_runs.md). SHIFTS_CACHE=path.pt keeps the drafts' shifts between runs (they take most of the time);
PROBE_OVERRIDES="--lora.rank=16 ..." overrides the tiny profile.
table_to_lora.py imports the pieces below."""
import json, os, sys, time
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

    def x0(self, x, t, cond):
        out = guided_prediction(self.model, x, t.expand(x.shape[0]), cond, self.ic.ddpo.guidance).float()
        return predicted_x0(out, x.float(), self.sched.alphas_cumprod[int(t)], self.kind)

    def guided_shifts(self, items, cache: str | None = None) -> torch.Tensor:
        """(N, T, C, H, W): at each step of each item's reward-guided draft, guidance's shift of x0_hat."""
        if cache and os.path.exists(cache):
            return torch.load(cache)
        ic, model = self.ic, self.model
        guide = RewardGuide(self.trainer.reward_scorer("probe"), 0.1, 4, ic.ddpo.draft_view_shift, ic.ddpo.draft_view_zoom)
        seeds = [sample_seed(7, 0, i) for i in range(len(items))]
        t0 = time.time()
        with merged_for_sampling(model.unet):
            draw = reward_guided_draw(model, guide, [it.prompt for it in items], [it.modality for it in items],
                                      [guide.stated(dict(it.expected), it.modality) for it in items], seeds,
                                      lambda i, j: int(np.random.default_rng([7, i, j, 29]).integers(2**31 - 1)), self.T, ic.ddpo.guidance,
                                      negatives=[it.negative for it in items], findings=[it.generator_findings for it in items],
                                      batch_size=20, keep_trajectory=True)
            print(f"{len(items)} guided drafts in {time.time() - t0:.0f} s", flush=True)
            self.sched.set_timesteps(self.T)
            shifts = torch.zeros(len(items), self.T, *draw.states.shape[2:])
            with torch.no_grad():
                for s in range(0, len(items), 20):
                    rows = list(range(s, min(len(items), s + 20)))
                    cond = self.conditioning([items[i] for i in rows])
                    for j, t in enumerate(self.sched.timesteps):
                        x = draw.states[rows, j]
                        a = self.sched.alphas_cumprod[int(t)]
                        shifts[rows, j] = predicted_x0(draw.targets[rows, j].float(), x.float(), a, self.kind) - self.x0(x, t, cond)
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


def feats(it):
    out = [(it.modality, "_bias")]
    for f in it.findings:
        if f["present"]:
            out.append((it.modality, f["name"], "present", f.get("laterality") or "-"))
        elif f.get("stated", True):
            out.append((it.modality, f["name"], "absent"))
    return out


class Table:
    """Per step, a ridge regression of the shift on the request's indicator features."""

    def __init__(self, items, shifts, lam: float = 1.0):
        self.vocab = sorted({f for it in items for f in feats(it)}, key=str)
        self.index = {f: k for k, f in enumerate(self.vocab)}
        X = self.features(items)
        T = shifts.shape[1]
        A = X.T @ X + lam * torch.eye(len(self.vocab))
        self.W = torch.stack([torch.linalg.solve(A, X.T @ shifts[:, j].flatten(1)) for j in range(T)])  # (T, F, D)
        pred = torch.einsum("nf,tfd->ntd", X, self.W)
        self.r2 = [1 - float((shifts[:, j].flatten(1) - pred[:, j]).pow(2).sum() / shifts[:, j].flatten(1).pow(2).sum()) for j in range(T)]
        print("features", len(self.vocab), "train R2 per step", [round(v, 3) for v in self.r2], flush=True)

    def features(self, its):
        X = torch.zeros(len(its), len(self.vocab))
        for i, it in enumerate(its):
            for f in feats(it):
                if f in self.index:
                    X[i, self.index[f]] = 1.0
        return X

    def offset(self, its, j, shape):
        return (self.features(its) @ self.W[j]).view(len(its), *shape)


def table_draw(p: Probe, table: Table, its, seed0, gamma, keep=False):
    """Plain DDIM (the held-out sampler) with x0_hat moved by gamma x the table's offset; ``keep``: also each step's
    state and the x0_hat it moved to."""
    ic, model, sched = p.ic, p.model, p.sched
    k = ic.eval.images_per_prompt
    expanded = [it for it in its for _ in range(k)]
    size = latent_size(model.cfg)
    shape = (model.cfg.latent_channels, size, size)
    sched.set_timesteps(ic.eval.steps)
    imgs, states, targets = [], [], []
    with torch.no_grad(), merged_for_sampling(model.unet):
        for s in range(0, len(expanded), 20):
            rows = list(range(s, min(len(expanded), s + 20)))
            sub = [expanded[i] for i in rows]
            x = torch.cat([initial_noise(1, shape, seed0 + i)[0] for i in rows]) * sched.init_noise_sigma
            cond = p.conditioning(sub)
            st, tg = [], []
            for j, t in enumerate(sched.timesteps):
                a = sched.alphas_cumprod[int(t)]
                x0 = p.x0(x, t, cond) + gamma * table.offset(sub, j, shape)
                st.append(x.clone()), tg.append(x0)
                x = ddim_step_with_logprob(sched, output_for_x0(x0, x.float(), a, p.kind), t, x, eta=0.0).prev_sample
            if keep:
                states.append(torch.stack(st, 1)), targets.append(torch.stack(tg, 1))
            else:
                imgs.append(model.decode(x).float().cpu())
    if keep:
        return expanded, torch.cat(states), torch.cat(targets)
    return torch.cat(imgs)


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
    table = Table(items, shifts, lam)
    heldout, test = p.parts.sampler.heldout(), p.parts.sampler.test()
    rows = [p.judge(heldout, p.ic.eval.seed, "heldout", table_draw(p, table, heldout, p.ic.eval.seed, g), gamma=g) for g in [0.0, *gammas]]
    best = choose(rows[1:], rows[0])
    print("chosen on held-out:", best and best["gamma"], flush=True)
    out = {"rows": rows}
    if best and "--heldout-only" not in sys.argv:
        out["test"] = [p.judge(test, p.ic.eval.test_seed, "test", table_draw(p, table, test, p.ic.eval.test_seed, g), gamma=g)
                       for g in (0.0, best["gamma"])]
    json.dump(out, open(f"amortised_guidance_{n_epochs}.json", "w"), indent=1)  # in the folder it runs from
