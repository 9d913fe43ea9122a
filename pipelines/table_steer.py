"""`synthmed runs steer`: a run's offset table made part of its improved policy, its strength chosen on the held-out set.

A table-stage run (``improve.selection.target=table``, ``synthmed improve --config table``) fits an offset table to the
reward classifiers' guidance on drafts of its training requests (generator.steering, rlhf.amortised) and keeps the
table as of its last epoch (``<run>/offset_table.safetensors``). Steering the sampler by gamma x that table moves every
DDIM step's x0_hat by the offset of what the request states: no classifier, no gradient, one lookup a step.

This command draws the run's held-out requests steered at each gamma (on the base by default, or on the run's best/ or
final/ LoRA with ``--adapter``) with the run's own sampler and seeds, judges them with the evaluator, and keeps the gamma
with the highest share of images showing every requested finding among those whose FD and MS-SSIM stay within the gain's
terms against the run's base evaluation, with the margin rule of ``synthmed runs scale`` (the next gamma up must stay
within them too; ``--no-margin`` drops it). It writes ``<run>/steered/``: ``steering.json`` (gamma), the table, the LoRA
where it steers one, and metadata.json; judges it once on the run's untouched test prompts; and records the lot in
``<run>/steer.json``. ``--lora <run>/steered`` then steers ``synthmed sample``, ``generate``, ``eval``, ``synthesize``
and ``bench graph`` alike, and ``synthmed runs test`` judges it beside the run's other adapters. Stock diffusers and peft
load a steered folder's LoRA (where it has one); a diffusers pipeline steers by its table through
``load_steering(folder).attach(pipe, modalities, findings)`` (generator.steering), a hook on the pipeline's UNet.

Nothing of the run's own log changes, and the held-out evaluator is never in the table's fit: it only chooses gamma, as
it chose best/.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from generator.errors import UserError

from .adapter_scale import HeldoutSweep, _lora_b, _shares
from .runs import OFFSET_TABLE_FILE, STEER_FILE, STEERED_ADAPTER, steering_text

ADAPTERS = ("none", "best", "final")


def calibrate_table_steering(run: str | Path, gammas: Sequence[float], adapter: str = "none", progress: bool = True,
                             margin: bool = True, parts: Any = None, per_modality: bool = False) -> dict[str, Any]:
    """Held-out figures of ``run``'s base (``adapter`` none) or adapter steered by each of ``gammas`` x its offset table,
    the kept gamma written to ``<run>/steered/`` and judged on the untouched test prompts; returns (and writes to
    ``<run>/steer.json``) the lot. ``margin``: keep only a gamma whose next larger gamma tried also stays within the
    gain's terms. ``parts``: the loop's own (its model's adapter is set here), at the end of a run
    (``improve.eval.steer_gammas``). ``per_modality``: also choose each modality's gamma on its own held-out images
    (:func:`per_modality_gammas`, 0 where none beats its base), and keep those where the held-out set, drawn with them
    together, beats the one gamma within the gain's terms."""
    from generator.models import FINDING_TABLE_FILE
    from generator.steering import OffsetTable, TableSteering, save_steering

    from .improve import calibration_figures, load_adapter_folder, save_adapter

    run = Path(run)
    gammas = sorted({float(g) for g in gammas})
    if not gammas or any(not g > 0 for g in gammas):
        raise UserError(f"gammas must be positive numbers, got {list(gammas)}; e.g. --gammas 1,1.25,1.5,1.75,2 "
                        "(gamma 0 is the base, which the run's own epoch-0 evaluation already judged)")
    if adapter not in ADAPTERS:
        raise UserError(f"--adapter must be one of {', '.join(ADAPTERS)}, got {adapter!r}")
    table_path = run / OFFSET_TABLE_FILE
    if not table_path.is_file():
        raise UserError(f"{run} has no offset table ({OFFSET_TABLE_FILE}): only a run whose stage 2 fits one writes it "
                        "(improve.selection.target=table, e.g. `synthmed improve --config table`)")
    folder = run / adapter if adapter != "none" else None
    if folder is not None and not (folder / "lora.safetensors").is_file():
        raise UserError(f"{folder} holds no adapter (lora.safetensors); steer the base (--adapter none) or a run that has "
                        "evaluated one (best/ appears at its first evaluation past the base, final/ when it finishes)")
    table = OffsetTable.load(table_path)
    sweep = HeldoutSweep(run, progress, parts)
    model = sweep.model
    meta = {}
    if folder is not None:
        load_adapter_folder(model, folder)
        meta = json.loads((folder / "metadata.json").read_text()) if (folder / "metadata.json").is_file() else {}
    else:
        zero_lora(model)  # the base, whatever the adapter held
    run_meta = json.loads((run / "metadata.json").read_text()) if (run / "metadata.json").is_file() else {}
    table_epoch = max((r["epoch"] for r in sweep.records if r.get("kind") == "epoch"), default=None)
    steering = TableSteering(table, 1.0, str(table_path), sweep.parts.sampler.implications())
    steering.check(model)
    model.steering = steering
    name = adapter if folder is not None else "base"

    lines = []
    for g in gammas:
        steering.gamma = g
        lines.append(sweep.judge(g, f"{name} + table x{g:g}"))
    chosen = sweep.choose(lines, margin, "gamma")
    by_modality, split = None, None
    if per_modality:
        split, why = per_modality_gammas(sweep, lines, margin)
        steering.gamma, steering.gammas = (chosen["scale"] if chosen else 0.0), split
        line = sweep.judge(steering.gamma, f"{name} + table, a gamma per modality")
        refused = sweep.guard.acceptable(line["overall"].get("fd"), line["overall"].get("ms_ssim"))
        share = line["overall"].get("all_requested_shown") or 0.0
        against = (chosen or sweep.base)["overall"].get("all_requested_shown") or 0.0
        kept = refused is None and share > against
        by_modality = {"gammas": split, "why": why, "heldout": calibration_figures(line), "per_modality": _shares(line["per_modality"]),
                       "kept": kept, **({} if kept else {"refused": refused or f"held-out share {share:.3f} does not beat "
                                                       f"{'the one gamma' if chosen else 'the base'}'s {against:.3f}"})}
        if kept:
            chosen = {**line, "scale": steering.gamma}
        else:
            steering.gammas, split = {}, None
    test_result = None
    target = run / STEERED_ADAPTER
    if chosen is not None:
        gamma = chosen["scale"]
        steering.gamma = gamma
        record = {"run": str(run), "adapter": adapter, "table_epoch": table_epoch, "heldout": chosen["overall"]}
        save_adapter(model, target,
                     {"run": str(run), "adapter": adapter, "epoch": meta.get("epoch"), "table_epoch": table_epoch,
                      "gamma": gamma, "heldout": chosen["overall"],
                      "base_model": meta.get("base_model") or run_meta.get("base_model"),
                      **({"gammas": split} if split else {}),
                      "kind": f"synthmed steered {name} ({name} with every sampling step's x0_hat moved by the run's offset table "
                              f"as of epoch {table_epoch}, {steering_text(gamma, split)}; gamma chosen on the held-out set)",
                      "loads": ("synthmed's --lora reads the table and the LoRA; stock diffusers and peft load the LoRA, and "
                                "a diffusers pipeline steers by the table with generator.steering.load_steering(folder)"
                                ".attach(pipe, modalities, findings)" if folder is not None else
                                "synthmed's --lora reads the table; a diffusers pipeline steers by it with "
                                "generator.steering.load_steering(folder).attach(pipe, modalities, findings); there is "
                                "no LoRA")},
                     findings=folder is not None and (folder / FINDING_TABLE_FILE).is_file(), lora=folder is not None,
                     extra=lambda tmp: save_steering(tmp, table, gamma, record, sweep.parts.sampler.implications(), split))
        test_result = sweep.judge_test(f"{name} + table {steering_text(gamma, split)}")
    model.steering = None
    out = {"kind": "synthmed table steering", "run": str(run), "adapter": adapter, "epoch": meta.get("epoch"),
           "table": str(table_path), "table_epoch": table_epoch, "features": len(table.features),
           **sweep.report("gamma", STEERED_ADAPTER, lines, chosen, test_result, adapter, margin),
           **({"modality_gammas": split} if split else {}), **({"per_modality": by_modality} if by_modality else {}),
           "adapter_folder": str(target) if chosen else None,
           "use": (f"synthmed generate ... --lora {target}; synthmed eval --lora {target}; synthmed runs test {run}" if chosen
                   else "no gamma kept the images within the gain's terms" + (" with a margin (the next gamma up within them too)" if margin else "")
                   + "; try smaller gammas, or a finer grid")}
    return sweep.write(STEERED_ADAPTER, STEER_FILE, out, chosen is not None)


def per_modality_gammas(sweep: HeldoutSweep, lines: list[dict], margin: bool) -> tuple[dict[str, float], dict[str, str]]:
    """Each modality's gamma, chosen on its own held-out images as the one gamma is on all of them (the best share among
    the gammas whose FD and MS-SSIM stay within the gain's terms against the modality's own base figures, with the
    margin), and kept only where its share beats the modality's base; else 0 (the base, untouched). A modality's FD is
    held to ``improve.guard.modality_fd_tolerance`` where the run sets one (the guard's own term for one modality's FD),
    else to ``fd_tolerance``. Returns the gammas and, per modality, why."""
    from .improve import RewardHackingGuard, calibrate_guidance

    terms = sweep.cfg.improve.guard
    if terms.modality_fd_tolerance is not None:
        terms = terms.model_copy(update={"fd_tolerance": terms.modality_fd_tolerance})
    gammas, why = {}, {}
    for m, base in (sweep.base.get("per_modality") or {}).items():
        guard = RewardHackingGuard(terms)
        guard.observe(0, None, base.get("all_requested_shown"), base.get("fd"), None, base.get("ms_ssim"))
        own = [{"scale": line["scale"], "overall": line["per_modality"][m]} for line in lines if m in line["per_modality"]]
        chosen = calibrate_guidance(own, guard, margin=margin, name="gamma")
        start = base.get("all_requested_shown") or 0.0
        if chosen is None:
            gammas[m], why[m] = 0.0, (f"no gamma within the gain's terms (its FD within {terms.fd_tolerance:.0%} of its base's)"
                                      + (" with a margin" if margin else ""))
        elif (chosen["overall"].get("all_requested_shown") or 0.0) <= start:
            gammas[m], why[m] = 0.0, f"no gamma beats its base's share {start:.3f}"
        else:
            gammas[m] = chosen["scale"]
            why[m] = f"share {start:.3f} -> {chosen['overall']['all_requested_shown']:.3f}"
    return gammas, why


def zero_lora(model) -> None:
    """The loop's model's own adapter set to the base: every ``lora_B`` 0, so B A = 0 exactly."""
    import torch

    with torch.no_grad():
        for p in _lora_b(model.unet):
            p.zero_()


def load_steered_folder(model, folder: Path) -> dict[str, Any]:
    """A run's steered folder onto the loop's model (its own ``default`` adapter, as ``synthmed runs test`` judges the
    run's adapters): the LoRA it holds, or the adapter zeroed (the base) where it steers the base, and its steering.
    Returns its metadata.json."""
    from generator.steering import load_steering

    from .improve import load_adapter_folder

    steering = load_steering(folder)
    steering.check(model)
    if (folder / "lora.safetensors").is_file():
        load_adapter_folder(model, folder)
    else:
        zero_lora(model)
    model.steering = steering
    return json.loads((folder / "metadata.json").read_text()) if (folder / "metadata.json").is_file() else {}


__all__ = ["ADAPTERS", "STEERED_ADAPTER", "STEER_FILE", "calibrate_table_steering", "load_steered_folder", "zero_lora"]
