"""The plots of a ``synthmed improve`` run, drawn from its metrics.jsonl into ``plots/``:

- ``reward.png``: the reward total and each component (mean ± std band) against epoch, and the
  total per modality;
- ``heldout.png``: the held-out metrics against epoch, epoch 0 (the base model) as a dashed line,
  the best epoch marked;
- ``training.png``: loss, approx_kl, clipfrac, kl and grad_norm against optimiser step.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot), so drawing here neither needs
a display nor changes the backend of whoever imports this. A plot without data (no eval lines yet)
is not drawn. Each file is written to a temporary name and renamed, so a reader never sees half a PNG.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from generator.fileio import atomic_write

from .runs import best_epoch, guided_line, keys_in_order, lines_by_epoch, read_metrics, reference_line

# (key, title): held-out metrics in the order drawn; the arrow says which way is better
HELDOUT = [
    ("all_requested_shown", "all requested findings shown ↑"), ("finding_accuracy", "finding accuracy (evaluator) ↑"),
    ("fd", "FD (synthmed features) ↓"), ("ms_ssim", "MS-SSIM within prompt ↓"), ("clip_score", "CLIP score ↑"),
    ("selector_quality", "selector quality ↑"),
]
TRAINING = ["loss", "approx_kl", "clipfrac", "kl", "grad_norm"]  # step-line series, one panel each
STAGE_STYLE = {"ddpo": dict(color="C0", marker=None), "selection": dict(color="C3", marker=".")}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _series(xs: list[Any], ys: list[Any]) -> tuple[list[float], list[float]]:
    """The points where both are numbers (nulls and NaNs left out)."""
    pairs = [(x, _number(y)) for x, y in zip(xs, ys)]
    pairs = [(x, y) for x, y in pairs if y is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _figure(panels: int, ncols: int = 3, panel_size: tuple[float, float] = (4.2, 3.0)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ncols = min(ncols, panels)
    nrows = math.ceil(panels / ncols)
    height = panel_size[1] * nrows + 0.5  # inches; the extra half for the title
    fig = Figure(figsize=(panel_size[0] * ncols, height))
    FigureCanvasAgg(fig)
    # fixed margins: a layout engine (constrained, tight) costs more than the drawing itself
    axes = fig.subplots(nrows, ncols, squeeze=False, gridspec_kw=dict(
        left=0.7 / (panel_size[0] * ncols), right=0.98, bottom=0.55 / height, top=1 - 0.75 / height, wspace=0.3,
        hspace=0.55)).ravel()
    for ax in axes[panels:]:
        ax.set_visible(False)
    return fig, list(axes[:panels])


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))


def _empty(ax, text: str = "no values") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")


def _integer_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")


# -- reward -----------------------------------------------------------------------------------
def plot_reward(epochs: list[dict], title: str) -> Any:
    names = ["total", *keys_in_order([e.get("reward") for e in epochs], skip=("total",))]
    modalities = keys_in_order([e.get("per_modality") for e in epochs])
    fig, axes = _figure(len(names) + (1 if modalities else 0))
    xs = [e["epoch"] for e in epochs]
    for ax, name in zip(axes, names):
        stats = [(e.get("reward") or {}).get(name) or {} for e in epochs]
        x, mean = _series(xs, [s.get("mean") for s in stats])
        std = dict(zip(*_series(xs, [s.get("std") for s in stats])))
        ax.plot(x, mean, marker="o", ms=3, color="C0" if name == "total" else "C2",
                label="reward's classifiers" if name == "findings" else None)
        band = [(xi, m, std[xi]) for xi, m in zip(x, mean) if xi in std]
        if band:
            ax.fill_between([b[0] for b in band], [b[1] - b[2] for b in band], [b[1] + b[2] for b in band],
                            color="C0" if name == "total" else "C2", alpha=0.2, lw=0)
        if name == "findings":  # the verifier's own classifiers on the same rollouts, where they are not the reward's
            vx, vy = _series(xs, [((e.get("verifier") or {}).get("agreement") or {}).get("mean") for e in epochs])
            if vx:
                ax.plot(vx, vy, marker="s", ms=3, ls="--", color="C3", label="verifier's classifiers")
                ax.legend(fontsize=7)
        if not x:
            _empty(ax)
        ax.set_title(f"reward: {name} (mean ± std)")
        _integer_epochs(ax)
    if modalities:
        ax = axes[-1]
        for i, m in enumerate(modalities):
            means = [(((e.get("per_modality") or {}).get(m) or {}).get("total") or {}).get("mean") for e in epochs]
            ax.plot(*_series(xs, means), marker="o", ms=3, label=m, color=f"C{i}")
        ax.set_title("reward total per modality (mean)")
        ax.legend(fontsize="small")
        _integer_epochs(ax)
    fig.suptitle(title)
    return fig


# -- held-out ---------------------------------------------------------------------------------
def plot_heldout(evals: list[dict], title: str, reference: dict | None = None, guided: dict | None = None) -> Any:
    """Held-out metrics against epoch; ``reference`` (the run's reference line): a dotted line at what images that
    truly show each request score; ``guided`` (the run's calibrated, else stage 2's, ``guided`` line): a dash-dotted line
    at what the base drawn by the reward-guided sampler scores."""
    fig, axes = _figure(len(HELDOUT))
    xs = [e["epoch"] for e in evals]
    best = best_epoch(evals)
    modalities = keys_in_order([e.get("per_modality") for e in evals])
    for ax, (key, label) in zip(axes, HELDOUT):
        x, y = _series(xs, [(e.get("overall") or {}).get(key) for e in evals])
        if key == "all_requested_shown":
            for i, m in enumerate(modalities, 2):  # C0 is overall, C1 the best-epoch mark
                ax.plot(*_series(xs, [((e.get("per_modality") or {}).get(m) or {}).get(key) for e in evals]),
                        marker=".", lw=1, alpha=0.7, color=f"C{i}", label=m)
        ax.plot(x, y, marker="o", ms=4, lw=2, color="C0", label="overall")
        if 0 in x:
            base = y[x.index(0)]
            ax.axhline(base, color="0.4", ls="--", lw=1, label="base (epoch 0)")
            ax.plot([0], [base], marker="s", ms=7, mfc="none", color="0.2", ls="none")
        ref = _number(((reference or {}).get("overall") or {}).get(key))
        if ref is not None:
            ax.axhline(ref, color="C3", ls=":", lw=1.5, label="images that show the request")
        level = _number(((guided or {}).get("overall") or {}).get(key))
        if level is not None:
            ax.axhline(level, color="C9", ls="-.", lw=1.2, label=f"base, reward-guided {guided.get('scale'):g}")
        if best is not None:
            ax.axvline(best, color="C1", ls=":", lw=1.5, label=f"best (epoch {best})")
        if not x:
            _empty(ax)
        ax.set_xlim(min(xs) - 0.3, max(xs) + 0.3)  # the same epochs on every panel, nulls or not
        ax.set_title(label)
        _integer_epochs(ax)
        if key == "all_requested_shown":
            ax.legend(fontsize="x-small")
    fig.suptitle(title)
    return fig


# -- training ---------------------------------------------------------------------------------
def plot_training(steps: list[dict], title: str) -> Any:
    from matplotlib.ticker import MaxNLocator

    fig, axes = _figure(len(TRAINING))
    stages = keys_in_order([{s.get("stage", "ddpo"): None} for s in steps])
    # the first step of each epoch after the first: where the policy's samples were renewed
    firsts: dict[Any, Any] = {}
    for s in steps:
        firsts.setdefault(s.get("epoch"), s.get("step"))
    boundaries = sorted(v for v in firsts.values() if isinstance(v, (int, float)))[1:]
    for ax, key in zip(axes, TRAINING):
        drawn = 0
        for stage in stages:
            rows = [s for s in steps if s.get("stage", "ddpo") == stage]
            x, y = _series([s.get("step") for s in rows], [s.get(key) for s in rows])
            if x:
                style = STAGE_STYLE.get(stage, dict(color="C4", marker="."))
                ax.plot(x, y, lw=1, ms=3, label=stage, **style)
                drawn += 1
        for b in boundaries:
            ax.axvline(b, color="0.85", lw=0.8, zorder=0)
        if not drawn:
            _empty(ax)
        elif drawn > 1:
            ax.legend(fontsize="x-small")
        ax.set_title(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimiser step")
    fig.suptitle(title)
    return fig


def draw_plots(run_dir: str | Path) -> list[Path]:
    """(Re)draw ``plots/reward.png``, ``plots/heldout.png`` and ``plots/training.png`` of a run from its
    metrics.jsonl; returns the files written (a plot with nothing to show yet is skipped)."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    epochs, evals = lines_by_epoch(records, "epoch"), lines_by_epoch(records, "eval")
    steps = [r for r in records if r.get("kind") == "step"]
    jobs: list[tuple[str, Callable[[list[dict], str], Any], list[dict]]] = [
        ("reward.png", plot_reward, epochs), ("heldout.png", partial(plot_heldout, reference=reference_line(records), guided=guided_line(records)), evals),
        ("training.png", plot_training, steps)]
    written = []
    for name, plot, data in jobs:
        if data:
            written.append(_save(plot(data, f"{run_dir.name}: {name[:-4]}"), run_dir / "plots" / name))
    return written
