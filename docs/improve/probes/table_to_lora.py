"""Probe: distil the amortised guidance table (amortised_guidance.py) into the UNet's LoRA, so that plain sampling with
the adapter alone (no table, no classifier) draws what table-steered sampling draws.

The table is fitted to reward-guided drafts of training requests (the reward's classifiers). The LoRA is then trained
by regression: at the states of table-steered draws of training requests (the held-out sampler: DDIM eta 0, its steps
and guidance), the guided x0_hat with the adapter must equal the base's x0_hat there plus gamma x the table's offset.
Each step's loss is divided by its mean squared offset, so every step counts alike; 1.0 is the adapter at zero. Steps
whose offset is under a thousandth of the largest (the first: guidance barely moves it) are left out. The
held-out set then chooses the adapter's scale (its lora_B multiplied by s) within the gain's terms; the untouched test
set is judged at scale 0 and at the chosen one.

From the repository root: SHIFTS_CACHE=shifts.pt python docs/improve/probes/table_to_lora.py GAMMA PASSES SCALES
[TRAIN_EPOCHS] [LR], e.g. 1.75 4 0.5,0.75,1.0 24 1e-3 (docs/improve/long_runs.md)."""
import json, os, random, sys, time
import torch
from tqdm import tqdm
sys.path.insert(0, os.path.dirname(__file__))
from amortised_guidance import Probe, choose, features, fit_table, table_draw  # noqa: E402
from generator.sampling import guided_prediction  # noqa: E402
from rlhf.ddpo import predicted_x0  # noqa: E402

args = [a for a in sys.argv[1:] if not a.startswith("--")]
GAMMA, PASSES = float(args[0]), int(args[1])
SCALES = [float(s) for s in args[2].split(",")]
TRAIN_EPOCHS = int(args[3]) if len(args) > 3 else 24
LR = float(args[4]) if len(args) > 4 else 1e-3
BATCH = 32

p = Probe()
table = fit_table(p, p.training_items(72), p.guided_shifts(p.training_items(72), os.environ.get("SHIFTS_CACHE")))
train = p.training_items(TRAIN_EPOCHS)
t0 = time.time()
expanded, draw = table_draw(p, table, train, 55555, GAMMA, keep=True)
states = draw.states
N, T = states.shape[:2]
p.sched.set_timesteps(T)
ts = p.sched.timesteps
alphas = p.sched.alphas_cumprod[ts].view(1, T, 1, 1, 1)
targets = predicted_x0(draw.targets.float(), states.float(), alphas, p.kind)  # the steered x0_hat at each state
norm = torch.stack([(GAMMA * table.offset(features(expanded), int(t))).pow(2).mean() for t in ts])
print(f"{N} table-steered draws ({T} states each) in {time.time() - t0:.0f} s; offset ms per step", [f"{float(v):.2e}" for v in norm], flush=True)

params = p.trainer.params
opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
pairs = [(i, j) for i in range(N) for j in range(T) if norm[j] > 1e-3 * norm.max()]  # guidance barely moves the first step
rng = random.Random(0)
log = []
for ep in range(PASSES):
    rng.shuffle(pairs)
    total, count = 0.0, 0
    t0 = time.time()
    for s in tqdm(range(0, len(pairs), BATCH), desc=f"pass {ep + 1}", leave=False):
        batch = pairs[s:s + BATCH]
        ii = [i for i, _ in batch]
        jj = torch.tensor([j for _, j in batch])
        x = states[ii, jj]
        t = ts[jj]
        cond = p.conditioning([expanded[i] for i in ii])
        out = guided_prediction(p.model, x, t, cond, p.ic.ddpo.guidance).float()
        x0 = predicted_x0(out, x.float(), p.sched.alphas_cumprod[t].view(-1, 1, 1, 1), p.kind)
        per = (x0 - targets[ii, jj]).pow(2).flatten(1).mean(1) / norm[jj]
        loss = per.mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        total += loss.item() * len(batch)
        count += len(batch)
    log.append(round(total / count, 4))
    print(f"pass {ep + 1}: normalised loss {log[-1]} ({time.time() - t0:.0f} s)", flush=True)

names = {id(q): n for n, q in p.model.unet.named_parameters()}
B = [q for q in params if "lora_B" in names.get(id(q), "")]
trained = [q.detach().clone() for q in B]


def at_scale(s):
    with torch.no_grad():
        for q, w in zip(B, trained):
            q.copy_(w * s)


heldout, test = p.parts.sampler.heldout(), p.parts.sampler.test()
rows = []
for s in [0.0, *SCALES]:
    at_scale(s)
    rows.append(p.judge(heldout, p.ic.eval.seed, "heldout", scale=s))
best = choose(rows[1:], rows[0])
print("chosen on held-out:", best and best["scale"], flush=True)
out = {"gamma": GAMMA, "passes": PASSES, "lr": LR, "overrides": os.environ.get("PROBE_OVERRIDES", ""), "train_requests": len(train), "loss": log, "rows": rows}
if best and "--heldout-only" not in sys.argv:
    out["test"] = []
    for s in (0.0, best["scale"]):
        at_scale(s)
        out["test"].append(p.judge(test, p.ic.eval.test_seed, "test", scale=s))
json.dump(out, open(f"table_to_lora_{GAMMA}_{PASSES}_{LR}.json", "w"), indent=1)  # in the folder it runs from
