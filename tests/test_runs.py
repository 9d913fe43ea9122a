"""`synthmed runs list|show|plot` and pipelines.runs on synthetic run directories (no training, CPU, fast)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.run_plots import draw_plots
from pipelines.runs import RUN_KIND, list_runs, read_metrics, show_run

COMPONENTS = ("findings", "alignment", "selector", "quality")
MODALITIES = ("cxr", "oct")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _stats(mean: float) -> dict:
    return {"mean": round(mean, 4), "std": 0.05}


def epoch_line(epoch: int) -> dict:
    total = 0.4 + 0.05 * epoch
    return {"kind": "epoch", "epoch": epoch, "n_samples": 32,
            "reward": {"total": _stats(total), **{c: _stats(total - 0.01 * i) for i, c in enumerate(COMPONENTS)}},
            "per_modality": {m: {"total": _stats(total + 0.02 * i), "findings": _stats(total)} for i, m in enumerate(MODALITIES)},
            "selected": 8, "seconds": {"sampling": 10.0 + epoch, "reward": 2.0, "update": 20.0, "selection": 1.0,
                                       "total": 33.0 + epoch}}


def eval_line(epoch: int, shown: float, fd: float | None, best: bool) -> dict:
    overall = {"all_requested_shown": shown, "finding_accuracy": 0.7, "all_findings_agree": 0.5, "requested_shown": shown + 0.1,
               "fd": fd, "ms_ssim": 0.3, "clip_score": 0.25, "selector_quality": 0.8, "memorised_share": 0.0}
    return {"kind": "eval", "epoch": epoch, "overall": overall,
            "per_modality": {m: {**overall, "all_requested_shown": shown + 0.1 * i} for i, m in enumerate(MODALITIES)},
            "seconds": 12.0, "best": best}


def step_lines(epoch: int, per_epoch: int = 3) -> list[dict]:
    lines = [{"kind": "step", "epoch": epoch, "step": (epoch - 1) * (per_epoch + 1) + i, "stage": "ddpo", "loss": 0.1 / (i + 1),
              "policy_loss": 0.05, "kl": 0.01 * i, "approx_kl": 0.002 * (i + 1), "clipfrac": 0.1, "grad_norm": 1.5,
              "lr": 1e-4} for i in range(per_epoch)]
    lines.append({"kind": "step", "epoch": epoch, "step": epoch * (per_epoch + 1) - 1, "stage": "selection", "loss": 0.2,
                  "policy_loss": None, "kl": None, "approx_kl": None, "clipfrac": None, "grad_norm": 0.9, "lr": 1e-4})
    return lines


def write_run(root: Path, run_id: str, lines: list[dict], started: str, status: str = "running", cut_last: bool = False,
              **meta) -> Path:
    run = root / run_id
    for folder in ("grids", "plots", "checkpoints"):
        (run / folder).mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text("run:\n  name: improve\n")
    (run / "metadata.json").write_text(json.dumps({
        "kind": RUN_KIND, "command": f"synthmed improve --run.name={run_id}", "started": started, "status": status,
        "base_model": "models/tiny", "lora": {"rank": 4, "alpha": 8}, "epochs_planned": 6, **meta}))
    text = "".join(json.dumps(line) + "\n" for line in lines)
    if cut_last:
        text += '{"kind": "step", "epoch": 5, "step": 16, "stage": "dd'  # killed while writing
    (run / "metrics.jsonl").write_text(text)
    (run / "samples.jsonl").write_text(json.dumps({"epoch": 1, "prompt": "p", "modality": "cxr", "reward": 0.5}) + "\n")
    return run


@pytest.fixture
def runs_dir(tmp_path) -> Path:
    """Two improve runs and two folders that are not: an older run that finished, and a newer one
    whose guard fired and which was killed mid-line in epoch 5."""
    root = tmp_path / "runs"
    finished = [eval_line(0, 0.40, 50.0, False)]
    for e in (1, 2):
        finished += [*step_lines(e), epoch_line(e)]
    finished += [eval_line(2, 0.45, 45.0, True), {"kind": "end", "epoch": 2, "status": "finished", "message": "2 epochs"}]
    write_run(root, "improve-20250101-090000", finished, "2025-01-01T09:00:00", status="finished",
              finished="2025-01-01T10:00:00")
    crashed = [eval_line(0, 0.40, 50.0, False)]
    for e in (1, 2, 3, 4):
        crashed += [*step_lines(e), epoch_line(e)]
        if e == 2:
            crashed.append(eval_line(2, 0.55, 40.0, True))
    crashed += [{"kind": "guard", "epoch": 4, "message": "selector reward up 0.3, held-out all shown down 0.1"},
                eval_line(4, 0.50, None, False)]
    run = write_run(root, "improve-20250102-090000", crashed, "2025-01-02T09:00:00", cut_last=True)
    for e in (1, 2, 3, 4):
        (run / "grids" / f"epoch_{e:04d}.png").write_bytes(PNG_SIGNATURE)
    for e in (2, 4):
        (run / "checkpoints" / f"epoch_{e:04d}").mkdir()
    (run / "checkpoints" / "epoch_0006.tmp").mkdir()  # a checkpoint being written: not listed
    for adapter in ("final", "best"):
        (run / adapter).mkdir()
    training = root / "tiny-20250103-090000"  # a `synthmed train` run: metrics.jsonl without kinds
    training.mkdir()
    (training / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.5}) + "\n")
    judges = root / "judges-real"
    judges.mkdir()
    (judges / "metadata.json").write_text(json.dumps({"kind": "synthmed finding classifier"}))
    return root


CRASHED, FINISHED = "improve-20250102-090000", "improve-20250101-090000"


def test_read_metrics_leaves_out_a_cut_last_line_silently(runs_dir, caplog):
    with caplog.at_level(logging.WARNING):
        records = read_metrics(runs_dir / CRASHED)
    assert records[-1] == eval_line(4, 0.50, None, False)
    assert len(records) == 1 + 4 * 5 + 3
    assert caplog.text == ""  # a line without its newline is still being written: not worth a warning


def test_a_bad_line_in_the_middle_is_an_error_naming_file_and_line(runs_dir, capsys):
    path = runs_dir / FINISHED / "metrics.jsonl"
    lines = path.read_text().splitlines()
    lines[2] = lines[2][:20]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:3: not valid JSON"):
        read_metrics(path.parent)
    assert main(["runs", "show", FINISHED, "--runs-dir", str(runs_dir)]) == 2
    assert "metrics.jsonl:3: not valid JSON" in capsys.readouterr().err
    # one damaged run does not hide the others
    rows = {r["id"]: r for r in list_runs(runs_dir)}
    assert rows[FINISHED]["status"] == "unreadable" and "metrics.jsonl:3" in rows[FINISHED]["error"]
    assert rows[CRASHED]["status"] == "running" and rows[CRASHED]["error"] is None


def test_list_runs_newest_first_only_improve_runs(runs_dir):
    rows = list_runs(runs_dir)
    assert [r["id"] for r in rows] == [CRASHED, FINISHED]  # neither the train run nor the judges folder
    crashed, finished = rows
    assert crashed["status"] == "running" and crashed["epochs_done"] == 4 and crashed["epochs_planned"] == 6
    assert crashed["last_eval_epoch"] == 4 and crashed["all_requested_shown"] == 0.50 and crashed["fd"] is None
    assert crashed["base_all_requested_shown"] == 0.40 and crashed["base_fd"] == 50.0
    assert crashed["best_epoch"] == 2 and crashed["started"] == "2025-01-02T09:00:00"
    assert finished["status"] == "finished" and finished["epochs_done"] == 2 and finished["best_epoch"] == 2
    assert finished["fd"] == 45.0 and finished["finished"] == "2025-01-01T10:00:00"
    assert list_runs(runs_dir / "absent") == []


def test_show_run_tables_guards_timing_and_files(runs_dir):
    run = show_run(CRASHED, runs_dir)
    assert run == show_run(runs_dir / CRASHED)  # an id under runs_dir or a path
    assert run["components"] == list(COMPONENTS) and run["modalities"] == list(MODALITIES)
    assert [e["epoch"] for e in run["epochs"]] == [1, 2, 3, 4]
    third = run["epochs"][2]
    assert third["reward"] == {"total": 0.55, "findings": 0.55, "alignment": 0.54, "selector": 0.53, "quality": 0.52}
    assert third["per_modality_total"] == {"cxr": 0.55, "oct": 0.57}
    assert third["steps"] == 4 and third["approx_kl"] == pytest.approx(0.004)  # ddpo steps only
    assert [(e["epoch"], e["base"], e["best"]) for e in run["evals"]] == [(0, True, False), (2, False, True), (4, False, False)]
    assert run["evals"][1]["all_requested_shown"] == {"cxr": 0.55, "oct": pytest.approx(0.65)}
    assert run["evals"][2]["overall"]["fd"] is None
    assert run["guards"] == [{"epoch": 4, "message": "selector reward up 0.3, held-out all shown down 0.1"}]
    assert run["end"] is None and run["status"] == "running"
    assert run["timing"]["epochs"] == 4 and run["timing"]["sampling"] == pytest.approx(12.5)
    assert run["timing"]["update"] == 20.0 and run["timing"]["eval"] == 12.0
    paths = run["paths"]
    assert [Path(p).name for p in paths["grids"]] == [f"epoch_{e:04d}.png" for e in (1, 2, 3, 4)]
    assert [Path(p).name for p in paths["checkpoints"]] == ["epoch_0002", "epoch_0004"]
    assert paths["final"] == str(runs_dir / CRASHED / "final") and paths["best_epoch"] == 2
    assert paths["plots"] == [] and paths["samples"].endswith("samples.jsonl")

    finished = show_run(FINISHED, runs_dir)
    assert finished["end"] == {"epoch": 2, "status": "finished", "message": "2 epochs"}
    assert finished["guards"] == [] and finished["paths"]["final"] is None


def test_cli_json_matches_the_functions(runs_dir, capsys):
    assert main(["runs", "list", "--runs-dir", str(runs_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == list_runs(runs_dir)
    assert main(["runs", "show", CRASHED, "--runs-dir", str(runs_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == show_run(CRASHED, runs_dir)


def test_cli_text_tables_end_with_where_files_are(runs_dir, capsys):
    assert main(["runs", "list", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert out.index(CRASHED) < out.index(FINISHED) and "tiny-2025" not in out and "judges-real" not in out
    assert "0.400 → 0.500" in out and "50.000 → -" in out and "4/6" in out
    assert main(["runs", "show", CRASHED, "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    for expected in ("| epoch | samples | selected | total | findings | alignment | selector | quality | cxr total",
                     "| 2 best ", "| 0 base ", "guard (epoch 4): selector reward up", "seconds per epoch (mean of 4): sampling 12.5 s",
                     "grids/ (epoch_0001.png, epoch_0002.png, epoch_0003.png, epoch_0004.png)", f"best {runs_dir / CRASHED / 'best'} (epoch 2)", "plots: none yet"):
        assert expected in out, expected
    assert out.rstrip().splitlines()[-1].startswith("samples: ")


def _is_png(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    return path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_are_png_files_written_whole(runs_dir, capsys):
    run = runs_dir / CRASHED
    written = draw_plots(run)
    assert [p.name for p in written] == ["reward.png", "heldout.png", "training.png"]
    assert all(p.parent == run / "plots" and _is_png(p) for p in written)
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["heldout.png", "reward.png", "training.png"]  # no temporaries
    assert main(["runs", "show", FINISHED, "--runs-dir", str(runs_dir), "--plots"]) == 0
    assert f"plots: {runs_dir / FINISHED / 'plots'}/ (heldout.png, reward.png, training.png)" in capsys.readouterr().out


def test_plots_of_a_run_with_one_epoch_and_no_evaluations(tmp_path, capsys):
    run = write_run(tmp_path, "improve-1", [epoch_line(1)], "2025-01-01T00:00:00")
    assert main(["runs", "plot", "improve-1", "--runs-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(run / "plots" / "reward.png")] and _is_png(run / "plots" / "reward.png")
    empty = write_run(tmp_path, "improve-2", [], "2025-01-01T00:00:00")
    assert draw_plots(empty) == []
    assert main(["runs", "plot", str(empty)]) == 0
    assert "nothing logged yet" in capsys.readouterr().out


def test_unknown_run_is_exit_code_2_naming_the_known_runs(runs_dir, capsys):
    assert main(["runs", "show", "improve-nope", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert "synthmed runs: error: no run 'improve-nope'" in err and f"{CRASHED}, {FINISHED}" in err
    assert main(["runs", "plot", "tiny-20250103-090000", "--runs-dir", str(runs_dir)]) == 2
    assert "not a synthmed improve run" in capsys.readouterr().err
    assert main(["runs", "show", "x", "--runs-dir", str(runs_dir / "absent")]) == 2
    assert "holds no runs yet" in capsys.readouterr().err


def test_the_gain_says_how_much_of_the_gap_to_the_reference_was_closed(tmp_path, capsys):
    reference = {"kind": "reference", "epoch": 0, "source": "phantoms", "per_request": 8, "seconds": 7.0,
                 "overall": {"all_requested_shown": 0.60, "requested_shown": 0.8, "finding_accuracy": 0.9, "fd": 30.0},
                 "per_modality": {"cxr": {"all_requested_shown": 0.40}, "oct": {"all_requested_shown": 0.30}}}
    lines = [eval_line(0, 0.40, 50.0, True), reference, *step_lines(1), epoch_line(1), eval_line(1, 0.45, 48.0, True)]
    write_run(tmp_path, "improve-20250104-090000", lines, "2025-01-04T09:00:00")
    run = show_run("improve-20250104-090000", tmp_path)
    assert run["reference"]["source"] == "phantoms" and run["reference"]["overall"]["all_requested_shown"] == 0.60
    mean = run["gain"]["rows"]["mean"]["all_requested_shown"]
    assert mean["reference"] == 0.60 and mean["gap_closed"] == pytest.approx(0.05 / 0.20)
    assert run["gain"]["rows"]["mean"]["fd"]["gap_closed"] is None  # a distance has no ceiling
    cxr = run["gain"]["rows"]["cxr"]["all_requested_shown"]  # the base is already at the reference: no gap to close
    assert cxr["reference"] == 0.40 and cxr["gap_closed"] is None
    assert main(["runs", "show", "improve-20250104-090000", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "0.400 -> 0.450 (ref 0.600)" in out
    assert ("reference: phantoms drawn to each held-out request (8 per request), judged alike, show every requested finding "
            "in 0.600 of images (finding acc 0.900): as far as the share can rise; epoch 1 closed 25% of the base's gap to it") in out
    assert [p.name for p in draw_plots(tmp_path / "improve-20250104-090000")] == ["reward.png", "heldout.png", "training.png"]


def test_a_reference_without_every_modality_gives_per_modality_figures_only(tmp_path, capsys):
    reference = {"kind": "reference", "epoch": 0, "source": "real", "per_request": 8, "missing": ["oct"],
                 "overall": {"all_requested_shown": None, "finding_accuracy": None},
                 "per_modality": {"cxr": {"all_requested_shown": 0.70}}}
    lines = [eval_line(0, 0.40, 50.0, True), reference, *step_lines(1), epoch_line(1), eval_line(1, 0.45, 48.0, True)]
    write_run(tmp_path, "improve-20250105-090000", lines, "2025-01-05T09:00:00")
    run = show_run("improve-20250105-090000", tmp_path)
    assert run["gain"]["rows"]["mean"]["all_requested_shown"]["reference"] is None
    assert run["gain"]["rows"]["cxr"]["all_requested_shown"]["gap_closed"] == pytest.approx(0.05 / 0.30)  # cxr: 0.40 -> 0.45, ref 0.70
    assert main(["runs", "show", "improve-20250105-090000", "--runs-dir", str(tmp_path)]) == 0
    assert ("reference: real reference images with each held-out request's labels (8 per request), judged alike, show every "
            "requested finding in cxr 0.700; none for oct") in capsys.readouterr().out


def test_findings_one_by_one_base_run_and_reference(tmp_path, capsys):
    def by_finding(cxr_effusion: float, oct_drusen: float) -> dict:
        return {"cxr": {"effusion": {"asked": 4, "shown": cxr_effusion}, "oedema": {"asked": 2, "shown": 0.0}},
                "oct": {"drusen": {"asked": 6, "shown": oct_drusen}}}

    def with_findings(line: dict, shares: dict) -> dict:
        for m, row in line["per_modality"].items():
            row["requested_shown_by_finding"] = shares[m]
        return line

    reference = {"kind": "reference", "epoch": 0, "source": "phantoms", "per_request": 8,
                 "overall": {"all_requested_shown": 0.60},
                 "per_modality": {m: {"all_requested_shown": 0.6, "requested_shown_by_finding": by_finding(1.0, 0.5)[m]}
                                  for m in MODALITIES}}
    lines = [with_findings(eval_line(0, 0.40, 50.0, True), by_finding(0.25, 0.0)), reference, *step_lines(1), epoch_line(1),
             with_findings(eval_line(1, 0.45, 48.0, True), by_finding(0.5, 0.0)), *step_lines(2), epoch_line(2),
             with_findings(eval_line(2, 0.42, 48.0, False), by_finding(0.75, 1 / 6))]
    write_run(tmp_path, "improve-20250106-090000", lines, "2025-01-06T09:00:00")
    findings = show_run("improve-20250106-090000", tmp_path)["findings"]
    assert findings["epoch"] == 1  # the best evaluation, like the gain table
    assert findings["rows"] == [
        {"modality": "cxr", "finding": "effusion", "asked": 4, "base": 0.25, "after": 0.5, "reference": 1.0},
        {"modality": "cxr", "finding": "oedema", "asked": 2, "base": 0.0, "after": 0.0, "reference": 0.0},
        {"modality": "oct", "finding": "drusen", "asked": 6, "base": 0.0, "after": 0.0, "reference": 0.5}]
    assert findings["never"] == {"base": 2, "after": 2, "reference": 1, "of": 3}
    assert main(["runs", "show", "improve-20250106-090000", "--runs-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "never shown, of 3 requested findings: 2 at the base, 2 at epoch 1, 1 in the reference" in out


def test_a_run_without_findings_one_by_one_shows_no_findings_table(runs_dir, capsys):
    assert show_run(FINISHED, runs_dir)["findings"] is None
    assert main(["runs", "show", FINISHED, "--runs-dir", str(runs_dir)]) == 0
    assert "requested findings on the held-out prompts" not in capsys.readouterr().out


def test_a_runs_policy_is_what_it_keeps_with_the_highest_held_out_share(tmp_path, capsys):
    """best/, then scaled/ and steered/ where `runs scale` and `runs steer` kept them, each chosen on the held-out set:
    `runs list` and `runs show` name the one with the highest held-out share (a later one only where strictly higher)."""
    lines = [eval_line(0, 0.1, 50.0, True), *step_lines(1), epoch_line(1), eval_line(1, 0.2, 48.0, True)]
    run = write_run(tmp_path, "improve-20250107-090000", lines, "2025-01-07T09:00:00", status="finished")
    assert list_runs(tmp_path)[0]["policy"] is None  # no best/ folder yet
    (run / "best").mkdir()
    assert list_runs(tmp_path)[0]["policy"] == {"name": "best", "label": "best/ (epoch 1)", "folder": str(run / "best"),
                                                 "heldout_all_requested_shown": 0.2}
    (run / "scaled").mkdir()
    def kept(name: str, value: float, adapter: str, share: float) -> str:  # scale.json / steer.json as the sweeps write them
        return json.dumps({name: value, "adapter": adapter, "epoch": 1, "margin": True, f"{name}s": [
            {name: value, "all_requested_shown": share, "per_modality": {"cxr": share}, "chosen": True}],
            "heldout": {"base": {"all_requested_shown": 0.1}, "chosen": {"all_requested_shown": share}}})

    (run / "scale.json").write_text(kept("scale", 1.5, "best", 0.2))
    assert list_runs(tmp_path)[0]["policy"]["name"] == "best"  # a tie keeps best/
    (run / "steered").mkdir()
    (run / "steer.json").write_text(kept("gamma", 1.25, "none", 0.3))
    policy = list_runs(tmp_path)[0]["policy"]
    assert policy["label"] == "steered/ (x1.25 on base)" and policy["folder"] == str(run / "steered")
    assert main(["runs", "list", "--runs-dir", str(tmp_path)]) == 0
    assert "steered/ (x1.25 on base): 0.300" in capsys.readouterr().out
    assert main(["runs", "show", run.name, "--runs-dir", str(tmp_path)]) == 0
    assert f"(use it with --lora {run / 'steered'})" in capsys.readouterr().out
    split = json.loads((run / "steer.json").read_text())
    (run / "steer.json").write_text(json.dumps({**split, "modality_gammas": {"cxr": 1.5, "oct": 0.0}}))  # --per-modality kept
    assert list_runs(tmp_path)[0]["policy"]["label"] == "steered/ (a gamma per modality on base)"
    (run / "steered").rmdir()  # a steer.json without its folder names nothing
    assert list_runs(tmp_path)[0]["policy"]["name"] == "best"
