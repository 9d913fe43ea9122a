"""`synthmed runs scale`: the strength of a run's adapter, chosen on its held-out set.

A LoRA's update is ``B A``; multiplying ``B`` by s draws with s times the change the run learnt. Where the loop's
regression has fitted only part of its target (``improve.selection.target=table``: docs/improve/long_runs.md), a
scale above 1 can give more of it. The scale is chosen like the calibrated reward guidance (:func:`calibrate_guidance`):
the run's adapter (best/ by default) is drawn on the held-out requests at each scale with the run's own sampler and
seeds, judged by the evaluator, and the highest share of images showing every requested finding among the scales whose
FD and MS-SSIM stay within the gain's terms against the run's base evaluation (``improve.guard``) is kept. Scale 1 is
the adapter as the run evaluated it, figure for figure.

By default a scale is kept only with a margin: the next larger scale tried must stay within those terms as well (so the
largest scale tried is never kept; ``--no-margin`` drops the rule). FD can fall off a cliff between two scales, and a
scale at its edge on the held-out set can be past it on other requests: on the 32-epoch table run, x1.5 had held-out FD
1% better than the base's and x2 four times worse, and on the untouched test set x1.5 was 43% worse
(docs/improve/long_runs.md). That test reading is what motivated the rule; it was set before any later run was scaled.

The kept scale is baked into a peft adapter of its own, ``<run>/scaled/`` (``B`` multiplied by it; what ``--lora``,
stock diffusers and peft load), judged once on the run's untouched test prompts. ``<run>/scale.json`` holds every
scale's held-out figures, the choice and the test figures beside the run's base and adapter test lines. Nothing of the
run's own log changes. A rerun that keeps no scale removes an earlier ``scaled/`` (scale.json says so).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from generator.errors import UserError

from .runs import SCALE_FILE, SCALED_ADAPTER, read_metrics

def _shares(per_modality: dict) -> dict:
    """Per modality, the share of images showing every requested finding."""
    return {m: (row or {}).get("all_requested_shown") for m, row in (per_modality or {}).items()}


def _lora_b(unet) -> list[torch.nn.Parameter]:
    return [p for name, p in unet.named_parameters() if "lora_B" in name]


class HeldoutSweep:
    """A run's held-out set judged at several strengths of what it learnt, and the strength kept: ``synthmed runs scale``
    (its adapter's ``lora_B`` x s) and ``synthmed runs steer`` (gamma x its offset table, pipelines.table_steer). Each
    strength is drawn with the run's own sampler and seeds, judged by the evaluator, and chosen by
    :func:`pipelines.improve.calibrate_guidance` against the run's base evaluation (the gain's terms, ``improve.guard``),
    with a margin by default; the kept one is judged once on the run's untouched test prompts."""

    def __init__(self, run: str | Path, progress: bool = True, parts: Any = None):
        """``parts``: the run's parts as the loop holds them (pipelines.improve.build_parts of its config), else built."""
        from agents.requests import load_prompts

        from .config import load_config
        from .improve import RewardHackingGuard, build_parts

        self.run = Path(run)
        self.progress = progress
        self.records = read_metrics(self.run)
        self.base = next((r for r in self.records if r.get("kind") == "eval" and r.get("epoch") == 0), None)
        if self.base is None:
            raise UserError(f"{self.run}/metrics.jsonl has no base evaluation (epoch 0) to hold the strengths' images against")
        self.cfg = load_config(self.run / "config.yaml")
        self.heldout = load_prompts(self.run / "heldout_prompts.jsonl")
        test_path = self.run / "test_prompts.jsonl"
        self.test = load_prompts(test_path) if test_path.is_file() else []
        # the gain's terms against the run's own base evaluation, as best/ was chosen
        self.guard = RewardHackingGuard(self.cfg.improve.guard)
        overall = self.base["overall"]
        self.guard.observe(0, None, overall.get("all_requested_shown"), overall.get("fd"), None, overall.get("ms_ssim"))
        self.parts = parts if parts is not None else build_parts(self.cfg, progress=progress)
        self.model = self.parts.model

    def judge(self, strength: float, label: str) -> dict[str, Any]:
        """The held-out figures of the model as it stands, as a calibration line of scale ``strength``."""
        from generator.lora import merged_for_sampling
        from rlhf.heldout import heldout_evaluation

        ic = self.cfg.improve
        with merged_for_sampling(self.model.unet):
            result = heldout_evaluation(self.model, self.heldout, self.parts.judges, self.parts.reference, ic.eval,
                                        self.cfg.judges.eval, ic.ddpo.guidance, self.parts.train_images,
                                        ic.ddpo.sample_batch_size, self.progress, label=f"held-out eval ({label})")
        return {"scale": strength, "overall": result["overall"], "per_modality": result["per_modality"]}

    def choose(self, lines: list[dict], margin: bool, name: str = "scale") -> dict | None:
        from .improve import calibrate_guidance

        return calibrate_guidance(lines, self.guard, margin=margin, name=name)

    def judge_test(self, label: str) -> dict | None:
        """The model as it stands on the run's untouched test prompts (None for a run without them)."""
        from .improve import judge_test_set

        return judge_test_set(self.model, self.test, self.parts, self.cfg, label, self.progress) if self.test else None

    def report(self, name: str, kept_as: str, lines: list[dict], chosen: dict | None, test_result: dict | None, adapter: str,
               margin: bool) -> dict[str, Any]:
        """What both commands write of the sweep: each strength's held-out figures (under ``name``: scale, gamma), the
        choice, and the kept one's test figures (as ``kept_as``: scaled, steered) beside the run's base and ``adapter``
        test lines."""
        from .improve import calibration_figures as pick

        tested = {r.get("adapter"): r for r in self.records if r.get("kind") == "test"}
        return {
            "chosen_by": f"the held-out evaluator's share of images showing every requested finding, among {name}s whose FD "
                         "and MS-SSIM stay within the gain's terms against the run's base (improve.guard); confirmed once on "
                         "the untouched test prompts" + (f"; with a margin: the next {name} up must stay within those terms "
                                                         "too" if margin else ""),
            "margin": margin,
            name: chosen["scale"] if chosen else None,
            "heldout": {"base": pick(self.base), "chosen": pick(chosen), "base_per_modality": _shares(self.base.get("per_modality"))},
            "test": ({"base": pick(tested.get("base")), **({adapter: pick(tested.get(adapter))} if adapter in ("best", "final") else {}),
                      kept_as: pick(test_result)} if test_result else None),
            "test_per_modality": ({m: {"base": _shares((tested.get("base") or {}).get("per_modality")).get(m), kept_as: share}
                                   for m, share in _shares(test_result["per_modality"]).items()} if test_result else None),
            f"{name}s": [{name: r["scale"], **pick(r), "chosen": r.get("calibrated", False),
                          **({"refused": r["not_calibrated_because"]} if r.get("not_calibrated_because") else {}),
                          "per_modality": _shares(r["per_modality"])}
                         for r in lines],
        }

    def write(self, folder_name: str, file_name: str, out: dict[str, Any], kept: bool) -> dict[str, Any]:
        """``out`` to ``<run>/<file_name>``; where nothing was kept, an earlier ``<run>/<folder_name>`` is removed after
        the file says so (moved aside first, so a half-removed folder is never left in its place)."""
        from .improve import _clean, write_json_atomic

        stale = self.run / folder_name
        if not kept and stale.is_dir():  # an earlier run of the command's folder: the file no longer vouches for it
            out["removed"] = str(stale)
        out = _clean(out)
        write_json_atomic(self.run / file_name, out, ensure_ascii=False)
        if out.get("removed"):
            aside = stale.with_name(stale.name + ".removed")
            shutil.rmtree(aside, ignore_errors=True)
            stale.rename(aside)
            shutil.rmtree(aside)
        return out


def calibrate_adapter_scale(run: str | Path, scales: Sequence[float], adapter: str = "best", progress: bool = True,
                            margin: bool = True) -> dict[str, Any]:
    """Held-out figures of ``run``'s ``adapter`` (best or final) at each of ``scales``, the kept scale baked into
    ``<run>/scaled/`` and judged on the untouched test prompts; returns (and writes to ``<run>/scale.json``) the lot.
    ``margin``: keep only a scale whose next larger scale tried also stays within the gain's terms (see the module)."""
    from generator.models import FINDING_TABLE_FILE

    from .improve import load_adapter_folder, save_adapter

    run = Path(run)
    scales = sorted({float(s) for s in scales})
    if not scales or any(not s > 0 for s in scales):
        raise UserError(f"adapter scales must be positive numbers, got {list(scales)}; e.g. --scales 0.75,1,1.25,1.5")
    if adapter not in ("best", "final"):
        raise UserError(f"--adapter must be best or final, got {adapter!r}")
    folder = run / adapter
    if not (folder / "lora.safetensors").is_file():
        raise UserError(f"{folder} holds no adapter (lora.safetensors); scale a run that has evaluated one "
                        "(best/ appears at its first evaluation past the base, final/ when it finishes)")
    sweep = HeldoutSweep(run, progress)
    meta = json.loads((folder / "metadata.json").read_text()) if (folder / "metadata.json").is_file() else {}
    model = sweep.model
    load_adapter_folder(model, folder)
    weights = _lora_b(model.unet)
    trained = [p.detach().clone() for p in weights]

    def at_scale(s: float) -> None:
        with torch.no_grad():
            for p, w in zip(weights, trained):
                p.copy_(w * s)

    lines = []
    for s in scales:
        at_scale(s)
        lines.append(sweep.judge(s, f"x{s:g}"))
    chosen = sweep.choose(lines, margin)
    test_result = None
    if chosen is not None:
        at_scale(chosen["scale"])
        save_adapter(model, run / SCALED_ADAPTER,
                     {"run": str(run), "adapter": adapter, "epoch": meta.get("epoch"), "scale": chosen["scale"],
                      "heldout": chosen["overall"], "base_model": meta.get("base_model"),
                      "kind": f"synthmed LoRA adapter ({adapter}/ with lora_B x {chosen['scale']:g}, the scale chosen on the "
                              "held-out set)"},
                     findings=(folder / FINDING_TABLE_FILE).is_file())
        test_result = sweep.judge_test(f"{adapter} x{chosen['scale']:g}")
    out = {"kind": "synthmed adapter scale", "run": str(run), "adapter": adapter, "epoch": meta.get("epoch"),
           **sweep.report("scale", SCALED_ADAPTER, lines, chosen, test_result, adapter, margin),
           "adapter_folder": str(run / SCALED_ADAPTER) if chosen else None,
           "use": (f"synthmed generate ... --lora {run / SCALED_ADAPTER}; synthmed eval --lora {run / SCALED_ADAPTER}" if chosen
                   else "no scale kept the images within the gain's terms" + (" with a margin (the next scale up within them too)" if margin else "")
                   + "; try smaller scales, or a finer grid")}
    return sweep.write(SCALED_ADAPTER, SCALE_FILE, out, chosen is not None)


__all__ = ["HeldoutSweep", "SCALED_ADAPTER", "SCALE_FILE", "calibrate_adapter_scale"]
