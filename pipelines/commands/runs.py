"""`synthmed runs list|show|test|scale|steer|plot`: what the self-improvement runs (`synthmed improve`) did, from their run directories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..runs import adapter_label, reading_table, steering_text
from ..runs import fmt_number as _fmt
from .common import add_config_argument, resolve_config, table

# (key, header) of the held-out columns in `runs show`; the arrow says which way is better
EVAL_COLUMNS = [
    ("all_requested_shown", "all shown ↑"), ("requested_shown", "req. shown ↑"), ("finding_accuracy", "finding acc ↑"),
    ("all_findings_agree", "all agree ↑"), ("fd", "FD ↓"), ("ms_ssim", "MS-SSIM ↓"), ("clip_score", "CLIP ↑"),
    ("selector_quality", "selector ↑"), ("memorised_share", "memorised ↓"),
]


def register(groups, formatter) -> None:
    r = groups.add_parser(
        "runs", formatter_class=formatter, help="inspect self-improvement runs: list them, show one, draw its plots",
        description="Reads the run directories that `synthmed improve` writes (runs/<id>/: metadata.json, metrics.jsonl, "
                    "grids/, plots/, checkpoints/, final/, best/). Nothing here changes a run except `plot` and "
                    "`show --plots`, which redraw its plots/ from metrics.jsonl, `test`, which writes its test.json, `scale`, "
                    "which writes its scaled/ adapter and scale.json, and `steer`, which writes its steered/ folder and "
                    "steer.json.",
    )
    sub = r.add_subparsers(dest="runs_command", metavar="SUBCOMMAND", required=True)
    ls = sub.add_parser("list", formatter_class=formatter,
                        help="one line per run, newest first: status, epochs, held-out 'all shown' and FD, best epoch")
    _common(ls)
    ls.set_defaults(handler=_list)
    show = sub.add_parser("show", formatter_class=formatter,
                          help="one run: reward per epoch, held-out evaluations, guard messages, timing, files")
    show.add_argument("run", help="run id (a folder in --runs-dir) or a path to a run directory")
    show.add_argument("--plots", action="store_true", help="redraw plots/ from metrics.jsonl first")
    _common(show)
    show.set_defaults(handler=_show)
    test = sub.add_parser("test", formatter_class=formatter,
                          help="judge a run's base, best/ and final/ (and scaled/, steered/) on its untouched test prompts; writes "
                               "<run>/test.json, or with --split N a further untouched split's test_splitN.json",
                          description="Judges the run's base, best/, final/, scaled/ and steered/ (where `runs scale` and `runs "
                                      "steer` kept them) with "
                                      "the evaluator on the run's untouched test prompts, with the run's own sampler and "
                                      "image seeds (the run's own test lines, figure for figure). --split N draws a "
                                      "further split that nothing in the run drew or read: --per-modality requests per "
                                      "modality over the held-out combinations, worded apart from the run's held-out and "
                                      "test requests, with image seeds of their own; a larger set for a final claim.")
    test.add_argument("run", help="run id (a folder in --runs-dir) or a path to a run directory")
    test.add_argument("--split", type=int, default=None, help="judge a further untouched split, numbered 1, 2, ... "
                                                              "(<run>/test_splitN_prompts.jsonl and test_splitN.json)")
    test.add_argument("--per-modality", type=int, default=None,
                      help="requests per modality in the --split (default: the run's improve.prompts.test_per_modality)")
    _common(test)
    test.set_defaults(handler=_test)
    scale = sub.add_parser("scale", formatter_class=formatter,
                           help="choose the strength of a run's adapter on its held-out set; writes <run>/scaled/ and scale.json",
                           description="Draws the run's adapter (lora_B multiplied by each scale) on the held-out requests "
                                       "with the run's sampler and seeds, keeps the scale with the highest share of images "
                                       "showing every requested finding among those within the gain's terms (FD, MS-SSIM "
                                       "against the run's base) whose next scale up stays within them too (a margin from the "
                                       "edge where FD falls off; --no-margin drops it), bakes it into <run>/scaled/ (a peft "
                                       "adapter --lora loads) and judges that once on the untouched test prompts. Scale 1 is "
                                       "the adapter as the run evaluated it.")
    scale.add_argument("run", help="run id (a folder in --runs-dir) or a path to a run directory")
    scale.add_argument("--scales", default="0.75,1,1.25,1.5,1.75,2", help="comma-separated positive scales to try")
    scale.add_argument("--adapter", choices=["best", "final"], default="best", help="which of the run's adapters to scale")
    scale.add_argument("--no-margin", dest="margin", action="store_false",
                       help="keep the best scale within the gain's terms even where the next scale up is refused (by default a "
                            "scale needs that margin from the FD cliff, and the largest scale tried is never kept)")
    _common(scale)
    scale.set_defaults(handler=_scale)
    steer = sub.add_parser("steer", formatter_class=formatter,
                           help="make a table-stage run's offset table part of its policy, gamma chosen on its held-out "
                                "set; writes <run>/steered/ and steer.json",
                           description="Draws the run's held-out requests with every sampling step's x0_hat moved by gamma x "
                                       "the offset table the run learnt (improve.selection.target=table: "
                                       "<run>/offset_table.safetensors), on the base or on --adapter, with the run's sampler "
                                       "and seeds; keeps the gamma with the highest share of images showing every requested "
                                       "finding among those within the gain's terms whose next gamma up stays within them "
                                       "too (--no-margin drops that), writes <run>/steered/ (steering.json, the table, the "
                                       "LoRA where it steers one: what --lora loads in sample, generate, eval, synthesize and "
                                       "bench graph) and judges it once on the untouched test prompts. `runs test` then "
                                       "judges it beside the run's other adapters.")
    steer.add_argument("run", help="run id (a folder in --runs-dir) or a path to a run directory")
    steer.add_argument("--gammas", default="1,1.25,1.5,1.75,2", help="comma-separated positive gammas to try")
    steer.add_argument("--adapter", choices=["none", "best", "final"], default="none",
                       help="what the table steers: the base (none) or one of the run's adapters")
    steer.add_argument("--no-margin", dest="margin", action="store_false",
                       help="keep the best gamma within the gain's terms even where the next gamma up is refused")
    steer.add_argument("--per-modality", action="store_true",
                       help="also choose each modality's gamma on its own held-out images (within the gain's terms against "
                            "its own base, 0 where none beats it) and keep them where the held-out set drawn with them "
                            "beats the one gamma")
    _common(steer)
    steer.set_defaults(handler=_steer)
    plot = sub.add_parser("plot", formatter_class=formatter,
                          help="redraw a run's plots/reward.png, heldout.png and training.png from metrics.jsonl")
    plot.add_argument("run", help="run id (a folder in --runs-dir) or a path to a run directory")
    _common(plot, json_flag=False)
    plot.set_defaults(handler=_plot)


def _common(parser, json_flag: bool = True) -> None:
    parser.add_argument("--runs-dir", default=None, help="folder holding the run directories (default: run.runs_dir, runs)")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="print one JSON value instead of tables")
    add_config_argument(parser)


def _runs_dir(args, extra) -> str:
    return args.runs_dir if args.runs_dir is not None else resolve_config(args, extra).run.runs_dir


def _secs(value: Any) -> str:
    return "-" if value is None else f"{value:.1f}"


def _change(base: Any, now: Any) -> str:
    return _fmt(now) if base is None else f"{_fmt(base)} → {_fmt(now)}"


def _list(args, extra) -> int:
    from ..runs import list_runs

    runs_dir = _runs_dir(args, extra)
    rows = list_runs(runs_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {runs_dir}; start one with `synthmed improve`")
        return 0
    print(table([[r["id"], r["status"], f"{r['epochs_done']}/{_fmt(r['epochs_planned'])}", (r["started"] or "-")[:19],
                  _fmt(r["last_eval_epoch"]), _change(r["base_all_requested_shown"], r["all_requested_shown"]),
                  _change(r["base_fd"], r["fd"]), _fmt(r["best_epoch"]),
                  f"{r['policy']['label']}: {_fmt(r['policy']['heldout_all_requested_shown'])}" if r.get("policy") else "-"]
                 for r in rows],
                ["run", "status", "epochs", "started", "eval epoch", "all shown ↑ (base → now)", "FD ↓ (base → now)", "best",
                 "policy: held-out all shown ↑"]))
    for r in rows:
        if r["error"]:
            print(f"{r['id']}: unreadable: {r['error']}")
    print(f"details: synthmed runs show RUN --runs-dir {runs_dir}")
    return 0


def _show(args, extra) -> int:
    from ..run_plots import draw_plots
    from ..runs import resolve_run, show_run

    runs_dir = _runs_dir(args, extra)
    if args.plots:
        draw_plots(resolve_run(args.run, runs_dir))
    run = show_run(args.run, runs_dir)
    if args.json:
        print(json.dumps(run, indent=2))
    else:
        print(format_run(run))
    return 0


def _test(args, extra) -> int:
    from ..improve import evaluate_test_set, split_paths
    from ..runs import resolve_run, test_rows

    out = evaluate_test_set(resolve_run(args.run, _runs_dir(args, extra)), split=args.split, per_modality=args.per_modality)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    modalities = list(dict.fromkeys(m for r in out["results"] for m in r["per_modality"]))
    rows = test_rows([{"kind": "test", **r} for r in out["results"]], modalities)
    print(_test_table({"modalities": modalities, "test": rows}))
    split = out.get("split")
    written = split_paths(Path(out["run"]), split)[1] if split else Path(out["run"]) / "test.json"
    print(f"{out['prompts']} {f'test split {split}' if split else 'test'} prompts x {out['images_per_prompt']} images "
          f"(seed {out['seed']}, from {out['drawn']}) -> {written}")
    return 0


def _numbers(text: str, flag: str) -> list[float]:
    from generator.errors import UserError

    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: comma-separated numbers, e.g. 0.75,1,1.25,1.5") from None


def _scale(args, extra) -> int:
    from ..adapter_scale import SCALE_FILE, calibrate_adapter_scale

    return _sweep(args, extra, calibrate_adapter_scale, _numbers(args.scales, "--scales"), "scale", _scale_table, SCALE_FILE)


def _steer(args, extra) -> int:
    from ..table_steer import STEER_FILE, calibrate_table_steering

    return _sweep(args, extra, calibrate_table_steering, _numbers(args.gammas, "--gammas"), "gamma", _steer_table, STEER_FILE,
                  per_modality=args.per_modality)


def _sweep(args, extra, calibrate, values: list[float], name: str, show, file_name: str, **options) -> int:
    """`runs scale` and `runs steer`: ``calibrate(run, values, adapter, margin=..., **options)``, printed as JSON or as
    ``show``'s table with the kept ``name`` (scale, gamma) and where it wrote ``file_name``."""
    from ..runs import resolve_run

    out = calibrate(resolve_run(args.run, _runs_dir(args, extra)), values, args.adapter, margin=args.margin, **options)
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(show(out))
    split = out.get("modality_gammas")  # runs steer --per-modality, where kept
    kept = _fmt(out[name]) if not split else steering_text(out[name], split)
    print(f"{name} {kept}: {out['use']} -> {Path(out['run']) / file_name}")
    return 0


def _scale_table(out: dict) -> str:
    """A run's ``scale.json`` (``synthmed runs scale``): the held-out figures at each scale, which was kept, and the
    untouched test prompts' once-only reading of the kept one."""
    return _strength_table(out, "scale", f"{out['adapter']}", "adapter strength (synthmed runs scale): held-out prompts, "
                           f"{out['adapter']}/ (epoch {_fmt(out['epoch'])}) at each scale")


def _steer_table(out: dict) -> str:
    """A run's ``steer.json`` (``synthmed runs steer``): the held-out figures at each gamma, which was kept, and the
    untouched test prompts' once-only reading of the kept one."""
    steered = "base" if out["adapter"] == "none" else f"{out['adapter']}/ (epoch {_fmt(out['epoch'])})"
    text = _strength_table(out, "gamma", f"{'base' if out['adapter'] == 'none' else out['adapter']} + table",
                           f"table steering (synthmed runs steer): held-out prompts, {steered} steered by gamma x the run's "
                           f"offset table (epoch {_fmt(out.get('table_epoch'))}, {_fmt(out.get('features'))} features)")
    split = out.get("per_modality")
    if split:  # --per-modality: each modality's own gamma, and the held-out set drawn with them together
        h = split["heldout"] or {}
        text += ("\na gamma per modality (--per-modality), each chosen on its own held-out images: "
                 + "; ".join(f"{m} x{g:g} ({split['why'][m]})" for m, g in split["gammas"].items())
                 + f"\ntogether, held out: every requested shown {_fmt(h.get('all_requested_shown'))}, FD {_fmt(h.get('fd'))}, "
                 f"MS-SSIM {_fmt(h.get('ms_ssim'))} ("
                 + ", ".join(f"{m} {_fmt(v)}" for m, v in split["per_modality"].items()) + "): "
                 + ("kept" if split["kept"] else f"not kept: {split['refused']}"))
    return text


def _strength_table(out: dict, name: str, label: str, title: str) -> str:
    lines = out[f"{name}s"]
    mods = list(dict.fromkeys(m for r in lines for m in r["per_modality"]))
    keys = [k for k, _ in EVAL_COLUMNS if k in lines[0]]
    base = out["heldout"]["base"]
    base_shares = out["heldout"].get("base_per_modality") or {}  # absent in the files of an earlier synthmed
    rows = [["base", *(_fmt(base.get(k)) for k in keys), *(_fmt(base_shares.get(m)) for m in mods), ""]]
    rows += [[f"{label} x{r[name]:g}", *(_fmt(r.get(k)) for k in keys), *(_fmt(r["per_modality"].get(m)) for m in mods),
              "chosen" if r["chosen"] else r.get("refused", "")] for r in lines]
    headers = [dict(EVAL_COLUMNS)[k] for k in keys]
    margin = f", kept only with the next {name} up within the terms too" if out.get("margin") else ""
    text = f"{title}{margin}\n" + table(rows, ["adapter", *headers, *(f"{m} shown" for m in mods), "kept"])
    if out.get("test"):
        test_rows_ = [[key, *(_fmt((values or {}).get(k)) for k in keys)] for key, values in out["test"].items()]
        text += "\nuntouched test prompts, once (nothing decides by them)\n" + table(test_rows_, ["adapter", *headers])
    return text


def _plot(args, extra) -> int:
    from ..run_plots import draw_plots
    from ..runs import resolve_run

    run_dir = resolve_run(args.run, _runs_dir(args, extra))
    written = draw_plots(run_dir)
    if not written:
        print(f"{run_dir}: nothing logged yet, no plots drawn")
    for path in written:
        print(path)
    return 0


# -- the text view of `runs show` -------------------------------------------------------------
def format_run(run: dict) -> str:
    meta = run["metadata"]
    lora = meta.get("lora") or {}
    head = [f"run {run['id']}: {run['status']}, epoch {run['epochs_done']}/{_fmt(run['epochs_planned'])}, "
            f"started {run['started'] or '-'}" + (f", finished {run['finished']}" if run["finished"] else "")]
    if meta.get("base_model") or lora:
        trained = {"findings": "the finding table (prompt tuning; the LoRA stays zero)",
                   "lora+findings": "the LoRA and the finding table"}.get(meta.get("trainable", "lora"), "the LoRA")
        head.append(f"base model {meta.get('base_model', '-')}, LoRA rank {lora.get('rank', '-')} alpha {lora.get('alpha', '-')}; "
                    f"trains {trained}")
    if meta.get("command"):
        head.append(f"command: {meta['command']}")
    if run.get("policy"):
        p = run["policy"]
        head.append(f"its policy by held-out share: {p['label']}, every requested shown "
                    f"{_fmt(p['heldout_all_requested_shown'])} (use it with --lora {p['folder']})")
    parts = ["\n".join(head)]
    if run["epochs"]:
        parts.append("reward per epoch (means)\n" + _epochs_table(run))
    if run["evals"]:
        parts.append("held-out evaluations (epoch 0: the base model)\n" + _evals_table(run))
    if run.get("gain"):
        parts.append(_gain_table(run["gain"]))
    if run.get("test"):
        parts.append(_test_table(run))
    reading = run.get("test_reading")  # test.json's reading (the run's own test lines are the table above)
    for split in ([reading] if reading and Path(reading["path"]).name == "test.json" else []) + (run.get("splits") or []):
        parts.append(_split_table(split, run["modalities"]))
    if run.get("reference"):
        parts.append(_reference_note(run))
    if run.get("calibration"):
        parts.append(_calibration_table(run["calibration"], run))
    elif run.get("guided"):
        parts.append(_guided_note(run["guided"]))
    if run.get("findings"):
        parts.append(_findings_table(run["findings"]))
    if run.get("scale"):
        parts.append(_scale_table(run["scale"]))
    if run.get("steer") and run["steer"].get("gammas"):
        parts.append(_steer_table(run["steer"]))
    notes = [f"guard (epoch {g['epoch']}): {g['message']}" for g in run["guards"]]
    if run["end"]:
        end = run["end"]
        notes.append(f"end (epoch {end['epoch']}): {end['status']}" + (f": {end['message']}" if end.get("message") else ""))
    if notes:
        parts.append("\n".join(notes))
    t = run["timing"]
    if t["epochs"]:
        split = ", ".join(f"{part} {_secs(t[part])} s" for part in ("sampling", "reward", "update", "guided", "selection", "total")
                          if part != "guided" or t.get(part) is not None)
        parts.append(f"seconds per epoch (mean of {t['epochs']}): {split}" + (f"; eval {_secs(t['eval'])} s" if t["eval"] else ""))
    parts.append(_files(run))
    return "\n\n".join(parts)


def _gain_table(gain: dict) -> str:
    shown = [("all_requested_shown", "every requested shown ↑"), ("finding_accuracy", "finding acc ↑"), ("fd", "FD ↓"),
             ("ms_ssim", "MS-SSIM ↓"), ("clip_score", "CLIP ↑"), ("selector_quality", "selector ↑"), ("memorised_share", "memorised ↓")]
    rows = []
    for name, metrics in gain["rows"].items():
        cells = []
        for key, _ in shown:
            m = metrics[key]
            ref = f" (ref {_fmt(m['reference'])})" if key == "all_requested_shown" and m.get("reference") is not None else ""
            cells.append("-" if m["base"] is None and m["after"] is None else
                         f"{_fmt(m['base'])} -> {_fmt(m['after'])}{ref}")
        rows.append([name, *cells])
    return (f"gain on the held-out prompts, base (epoch 0) -> epoch {gain['epoch']} (judged by the evaluator classifier)\n"
            + table(rows, ["modality", *[h for _, h in shown]]))


def _findings_table(findings: dict) -> str:
    """Which requested findings the generator draws: per finding, the share of the held-out images asking for it that show it."""
    from ..runs import never_shown_text

    epoch = findings["epoch"]
    rows = [[r["modality"], r["finding"], _fmt(r["asked"]), _fmt(r["base"]), *([_fmt(r["after"])] if epoch is not None else []),
             _fmt(r["reference"])] for r in findings["rows"]]
    head = ["modality", "finding", "images asking", "base"] + ([f"epoch {epoch}"] if epoch is not None else []) + ["reference"]
    return ("requested findings on the held-out prompts: share of the images asking for each that show it (evaluator)\n"
            + table(rows, head) + "\n" + never_shown_text(findings))


def _guided_note(guided: dict) -> str:
    o = guided.get("overall") or {}
    per = ", ".join(f"{m} {_fmt(r.get('all_requested_shown'))}" for m, r in (guided.get("per_modality") or {}).items())
    return (f"reward-guided drafts of the base (stage 2's candidates: the reward classifier steers each step at scale "
            f"{_fmt(guided.get('scale'))}; the evaluator judges): every requested shown {_fmt(o.get('all_requested_shown'))} "
            f"({per}), finding acc {_fmt(o.get('finding_accuracy'))}, FD {_fmt(o.get('fd'))}, MS-SSIM {_fmt(o.get('ms_ssim'))}, "
            f"CLIP {_fmt(o.get('clip_score'))}: what the policy is asked to learn to draw unguided")


def _calibration_table(lines: list[dict], run: dict) -> str:
    """The held-out set drawn by the reward-guided sampler at each calibrated scale, beside the base's plain draw."""
    base = next((e for e in run["evals"] if e["base"]), None)
    rows = [["base (plain DDIM)", *(_fmt((base or {}).get("overall", {}).get(k)) for k, _ in EVAL_COLUMNS), ""]] if base else []
    for r in lines:
        verdict = "calibrated" if r.get("calibrated") else (r.get("not_calibrated_because") or "lower share")
        rows.append([f"reward-guided {_fmt(r.get('scale'))}", *(_fmt((r.get("overall") or {}).get(k)) for k, _ in EVAL_COLUMNS),
                     verdict])
    chosen = next((r for r in lines if r.get("calibrated")), None)
    tail = (f"calibrated reward guidance: {_fmt(chosen['scale'])} (written to guidance.json; pass it as --reward-guidance to "
            "synthmed generate or synthesize). A sampler setting the held-out evaluator chose, not a trained policy; the "
            "untouched test prompts above say what it gives on requests nothing was tuned on" if chosen else
            "no scale kept the images within the gain's terms (FD, MS-SSIM against the base's): nothing calibrated")
    return ("reward guidance calibrated on the held-out prompts (the base drawn with the reward's classifiers steering each "
            "step; the evaluator judges)\n" + table(rows, ["sampler", *(h for _, h in EVAL_COLUMNS), "verdict"]) + "\n" + tail)


def _reference_note(run: dict) -> str:
    ref = run["reference"]
    what = ("phantoms drawn to each held-out request" if ref.get("source") == "phantoms"
            else "real reference images with each held-out request's labels")
    line = f"reference: {what} ({_fmt(ref.get('per_request'))} per request), judged alike, show every requested finding in "
    shown = (ref.get("overall") or {}).get("all_requested_shown")
    if shown is None:  # not every modality has reference images: per modality only
        rows = ref.get("per_modality") or {}
        return (line + ", ".join(f"{m} {_fmt(r.get('all_requested_shown'))}" for m, r in rows.items())
                + (f"; none for {', '.join(ref.get('missing') or [])}" if ref.get("missing") else ""))
    line += (f"{_fmt(shown)} of images (finding acc {_fmt((ref.get('overall') or {}).get('finding_accuracy'))}): "
             "as far as the share can rise")
    gain = run.get("gain")
    cell = ((gain or {}).get("rows") or {}).get("mean", {}).get("all_requested_shown") or {}
    if cell.get("gap_closed") is not None:
        line += f"; epoch {gain['epoch']} closed {100 * cell['gap_closed']:.0f}% of the base's gap to it"
    return line


def _epochs_table(run: dict) -> str:
    names = ["total", *run["components"]]
    mods = run["modalities"]
    guided = ["total", "findings"] if any(e.get("guided_reward") for e in run["epochs"]) else []
    judged = ["agreement", "pass"] if any(e.get("verifier") for e in run["epochs"]) else []
    tabled = any(e.get("offset_table") for e in run["epochs"])  # target=table: its drafts so far and its mean R2 over the steps

    def table_cells(e: dict) -> list[str]:
        t = e.get("offset_table")
        return [_fmt(t["drafts"]), _fmt(sum(t["r2"]) / len(t["r2"]))] if t else ["-", "-"]

    rows = [[e["epoch"], _fmt(e["n_samples"]), _fmt(e["selected"]), *(_fmt(e["reward"].get(n)) for n in names),
             *(_fmt((e.get("verifier") or {}).get(n)) for n in judged),
             *(_fmt((e.get("guided_reward") or {}).get(n)) for n in guided), *(table_cells(e) if tabled else []),
             *(_fmt(e["per_modality_total"].get(m)) for m in mods), _fmt(e["approx_kl"]), _fmt(e["clipfrac"]),
             _secs(e["seconds"])] for e in run["epochs"]]
    return table(rows, ["epoch", "samples", "selected", *names, *(f"verifier {n}" for n in judged), *(f"guided {n}" for n in guided),
                        *(["table drafts", "table R2"] if tabled else []), *(f"{m} total" for m in mods),
                        "approx_kl", "clipfrac", "s"])


def _test_table(run: dict) -> str:
    mods = run["modalities"]
    rows = [[adapter_label(t),
             *(_fmt(t["overall"].get(k)) for k, _ in EVAL_COLUMNS),
             *(_fmt(t["all_requested_shown"].get(m)) for m in mods)] for t in run["test"]]
    return ("untouched test prompts (the held-out combinations worded and seeded apart; nothing that decides reads them: "
            "not best/, not the guard)\n" + table(rows, ["adapter", *(h for _, h in EVAL_COLUMNS), *(f"{m} shown" for m in mods)]))


def _split_table(split: dict, modalities: list[str]) -> str:
    """A further untouched split (``synthmed runs test --split N``), or the run's test prompts as ``runs test`` judged
    them: see :func:`pipelines.runs.reading_table`."""
    header, rows = reading_table(split, modalities)
    size = f"{_fmt(split['prompts'])} prompts x {_fmt(split['images_per_prompt'])} images"
    title = (f"untouched test prompts, every adapter the run keeps ({size}; synthmed runs test: {split['path']})"
             if split["split"] == "test" else
             f"untouched test split {split['split']} ({size}; synthmed runs test --split {split['split']}: {split['path']})")
    return title + "\n" + table(rows, header)


def _evals_table(run: dict) -> str:
    mods = run["modalities"]
    rows = []
    for e in run["evals"]:
        label = str(e["epoch"]) + (" base" if e["base"] else "") + (" best" if e["best"] else "")
        rows.append([label, *(_fmt(e["overall"].get(k)) for k, _ in EVAL_COLUMNS),
                     *(_fmt(e["all_requested_shown"].get(m)) for m in mods)])
    return table(rows, ["epoch", *(h for _, h in EVAL_COLUMNS), *(f"{m} shown" for m in mods)])


def _files(run: dict) -> str:
    paths, root = run["paths"], Path(run["path"])

    def listing(files: list[str], folder: str) -> str:
        names = [Path(f).name for f in files]
        shown = ", ".join(names) if len(names) <= 4 else f"{len(names)}: {names[0]} … {names[-1]}"
        return f"{root / folder}/ ({shown})"

    lines = [f"plots: {listing(paths['plots'], 'plots')}" if paths["plots"]
             else f"plots: none yet (synthmed runs plot {run['id']})",
             f"grids: {listing(paths['grids'], 'grids')}" if paths["grids"] else "grids: none yet"]
    adapters = [f"final {paths['final']}"] if paths["final"] else []
    if paths["best"]:
        adapters.append(f"best {paths['best']}" + (f" (epoch {paths['best_epoch']})" if paths["best_epoch"] is not None else ""))
    if paths.get("scaled"):
        adapters.append(f"scaled {paths['scaled']} (strength chosen on the held-out set: {paths['scale']})")
    if paths.get("steered"):
        adapters.append(f"steered {paths['steered']} (the offset table's gamma chosen on the held-out set: {paths['steer']})")
    lines.append("adapters: " + (", ".join(adapters) if adapters else "none yet"))
    if paths.get("guidance"):
        lines.append(f"calibrated reward guidance: {paths['guidance']}")
    if paths.get("offset_table"):
        lines.append(f"offset table (improve.selection.target=table, as of the last epoch): {paths['offset_table']}")
    if paths.get("tests"):
        lines.append(f"test readings (synthmed runs test [--split N]): {', '.join(paths['tests'])}")
    if paths["checkpoints"]:
        lines.append(f"checkpoints: {listing(paths['checkpoints'], 'checkpoints')}")
    lines.append(f"samples: {paths['samples'] or 'none yet'}; config: {paths['config'] or '-'}")
    return "\n".join(lines)
