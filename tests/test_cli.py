"""The CLI in-process: every command has --help, runs on tiny settings, and bad input exits 2 with a message."""

import csv
import json

import pytest

from pipelines.cli import build_parser, main


def all_commands():
    parser = build_parser()
    groups = next(a for a in parser._actions if a.dest == "command")
    out = []
    for name, sub in groups.choices.items():
        subs = [a for a in sub._actions if getattr(a, "choices", None) and a.dest.endswith("_command")]
        out += [[name, s] for a in subs for s in a.choices] or [[name]]
    return out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in ("data", "config", "bench"):
        assert name in text


@pytest.mark.parametrize("command", all_commands(), ids=lambda c: " ".join(c))
def test_every_command_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: synthmed " + " ".join(command) in capsys.readouterr().out


def test_phantoms_then_manifest_then_check(tmp_path, capsys):
    out = tmp_path / "ph"
    assert main(["data", "phantoms", "--out", str(out), "--per-finding", "1", "--size", "48", "--seed", "2",
                 "--modalities", "cxr", "oct", "--no-progress"]) == 0
    assert (out / "manifest.csv").exists() and (out / "labels.jsonl").exists() and (out / "metadata.json").exists()
    assert "per_finding: 1" in (out / "config.yaml").read_text()
    # the same folder through `data manifest` (detected by its manifest.csv), then `data check`
    assert main(["data", "manifest", str(out), "--out", str(tmp_path / "m.csv")]) == 0
    assert main(["data", "check", str(tmp_path / "m.csv"), "--data.image_size=32"]) == 0
    text = capsys.readouterr().out
    assert "image tensor (1, 32, 32)" in text


def test_manifest_bad_input_exits_2_with_row_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("path,Text,modal\nmissing.png,some text,cxr\n")
    assert main(["data", "manifest", str(bad), "--out", str(tmp_path / "o.csv")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and "column 'path'" in err and "image file not found" in err
    assert main(["data", "manifest", str(bad), "--out", str(tmp_path / "o.csv"), "--skip-bad"]) == 0
    skipped = list(csv.DictReader(open(tmp_path / "o.csv.skipped.csv")))
    assert skipped[0]["row"] == "2"


def test_config_show_and_errors(capsys):
    assert main(["config", "show", "--json", "--train.lr=5e-5"]) == 0
    assert json.loads(capsys.readouterr().out)["train"]["lr"] == 5e-5
    assert main(["config", "show", "--train.lr=fast"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["config", "show", "--config", "nosuch"]) == 2
    assert "not found" in capsys.readouterr().err


def test_unknown_modality_in_phantoms(capsys):
    assert main(["data", "phantoms", "--modalities", "petct", "--out", "/tmp/never"]) == 2
    assert "petct" in capsys.readouterr().err


def test_catalogue_json(capsys):
    assert main(["data", "catalogue", "--json"]) == 0
    cat = json.loads(capsys.readouterr().out)
    assert len(cat) == 5 and all(len(v) >= 6 for v in cat.values())


def test_bench_manifest_small(tmp_path, capsys):
    assert main(["bench", "manifest", "--rows", "2000", "--pool", "5", "--json", "--workdir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["rows"] == 2000 and result["decoded_images"] is True


def test_meddata_command_writes_a_manifest_per_dataset(meddata, tmp_path, capsys):
    assert main(["data", "meddata", "--root", str(meddata), "--out", str(tmp_path)]) == 0
    written = sorted(p.stem for p in tmp_path.glob("*.csv"))
    assert "nih_cxr14_64" in written and len(written) == 7
    with open(tmp_path / "chest_ct_iqothnccd.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 878 and {r["modality"] for r in rows} == {"chest_ct"}


def test_manifest_from_a_medmnist_npz(tmp_path, capsys):
    import numpy as np

    np.savez(tmp_path / "p.npz", train_images=np.zeros((3, 28, 28), np.uint8), train_labels=np.array([[0], [1], [1]]),
             val_images=np.zeros((1, 28, 28), np.uint8), val_labels=np.array([[1]]))
    out = tmp_path / "m.csv"
    assert main(["data", "manifest", str(tmp_path / "p.npz"), "--out", str(out), "--modality", "cxr",
                 "--label-names", "normal,pneumonia", "--template", "Paediatric chest radiograph. Findings: {label}."]) == 0
    rows = list(csv.DictReader(open(out)))
    assert len(rows) == 4 and rows[1]["text"] == "Paediatric chest radiograph. Findings: pneumonia."
    assert rows[0]["findings"] == "" and json.loads(rows[1]["findings"])[0]["name"] == "pneumonia"
    assert rows[3]["path"].endswith("p.npz#val/0")
    assert main(["data", "manifest", str(tmp_path / "p.npz"), "--out", str(out)]) == 2
    assert "needs --modality" in capsys.readouterr().err


@pytest.mark.parametrize("how", ["flag", "env"])
def test_workspace_takes_the_writable_state_and_the_current_folder_is_kept(how, tmp_path, monkeypatch):
    """`synthmed --workspace DIR` (or SYNTHMED_HOME) runs the command as if started in DIR, made when missing:
    relative outputs land there, the shipped profile is still found, and the caller's folder is back after."""
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    ws = tmp_path / "ws" / "nested"
    argv = ["data", "phantoms", "--per-finding", "1", "--size", "32", "--modalities", "cxr", "--no-progress"]
    if how == "flag":
        argv = ["--workspace", str(ws), *argv]
    else:
        monkeypatch.setenv("SYNTHMED_HOME", str(ws))
    assert main(argv) == 0
    assert os.getcwd() == str(elsewhere)
    assert (ws / "data" / "phantoms" / "manifest.csv").is_file()
    assert not any(elsewhere.iterdir()), "nothing is written in the folder synthmed was started from"


def test_workspace_that_is_a_file_is_one_clear_error(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    assert main(["--workspace", str(tmp_path / "f"), "config", "show"]) == 2
    err = capsys.readouterr().err
    assert "workspace" in err and "is a file" in err and "Traceback" not in err
