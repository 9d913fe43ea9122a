"""One run per folder (generator.runlock): a second taker is refused with who holds the folder, a lock
left by a process that is gone is taken over, the lock goes when the run ends; and `synthmed improve`,
`synthmed train` and `synthmed synthesize` refuse (exit 2) a folder another process is running in."""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from generator.runlock import RunFolderInUseError, RunLock
from pipelines.cli import main

REPO = Path(__file__).resolve().parent.parent
HOLD = ("import sys\nfrom generator.runlock import RunLock\nwith RunLock(sys.argv[1]):\n    print('held', flush=True)\n"
        "    sys.stdin.read()\n")  # holds the lock until its stdin closes


@contextmanager
def held_elsewhere(folder: Path):
    """Another process holding ``folder``'s lock until the block ends; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        yield proc.pid
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def in_use_message(folder: Path, pid: int) -> str:
    return f"{folder} is in use by pid {pid} on host {socket.gethostname()} since "


def test_a_held_folder_is_refused_naming_the_holder_and_the_fix(tmp_path):
    folder = tmp_path / "run"
    with held_elsewhere(folder) as pid:
        record = json.loads((folder / ".lock").read_text())
        assert record["pid"] == pid and record["host"] == socket.gethostname() and record["started"]
        with pytest.raises(RunFolderInUseError) as refused:
            RunLock(folder).acquire()
        message = str(refused.value)
        assert message.startswith(in_use_message(folder, pid)) and message.endswith(
            f"; wait for it to finish or, if that process is gone, remove {folder / '.lock'}")
        assert json.loads((folder / ".lock").read_text())["pid"] == pid  # the refused taker changed nothing
    with RunLock(folder) as lock:  # free once the holder ended
        assert lock.held and json.loads((folder / ".lock").read_text())["pid"] == os.getpid()
    assert not (folder / ".lock").exists() and not lock.held


RACE = """
import sys, time
from pathlib import Path
from generator.runlock import RunFolderInUseError, RunLock
folder, go = sys.argv[1], Path(sys.argv[2])
while not go.exists():
    time.sleep(0.001)
try:
    with RunLock(folder):
        print("won", flush=True)
        time.sleep(3)
except RunFolderInUseError:
    print("refused", flush=True)
"""


def test_of_processes_racing_for_one_folder_exactly_one_wins(tmp_path):
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path / "run"), str(go)], cwd=REPO, stdout=subprocess.PIPE, text=True)
              for _ in range(4)]
    time.sleep(1.0)
    go.touch()
    results = sorted(r.communicate(timeout=60)[0].strip() for r in racers)
    assert results == ["refused", "refused", "refused", "won"]
    assert not (tmp_path / "run" / ".lock").exists()


def test_two_takers_in_one_process_are_refused_too(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunFolderInUseError, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()


def test_a_lock_left_by_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    pid = dead_pid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2025-01-01 09:00:00"}))
    with caplog.at_level(logging.WARNING, logger="generator.runlock"), RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    assert f"taking over a lock left by pid {pid}" in caplog.text and "2025-01-01 09:00:00" in caplog.text
    assert not (tmp_path / ".lock").exists()


def test_a_killed_holder_frees_the_folder(tmp_path, caplog):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    proc.kill()
    proc.wait()
    with caplog.at_level(logging.WARNING, logger="generator.runlock"), RunLock(tmp_path):
        pass
    assert f"pid {proc.pid}" in caplog.text


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    alive = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": alive.pid, "host": socket.gethostname(), "started": "now"}))
        with pytest.raises(RunFolderInUseError, match=f"pid {alive.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        alive.stdin.close()
        alive.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "started": "then"}))
    RunLock(tmp_path).acquire().release()


# -- the commands -----------------------------------------------------------------------------
def test_improve_refuses_a_run_folder_in_use(tmp_path, capsys, tiny_config):
    from pipelines.config import save_config

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(tiny_config, run / "config.yaml")
    with held_elsewhere(run) as pid:
        assert main(["improve", "--resume", str(run), "--no-progress"]) == 2
        assert in_use_message(run, pid) in capsys.readouterr().err
        assert main(["improve", "--run-dir", str(run), "--no-progress"]) == 2
        assert in_use_message(run, pid) in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml"]  # nothing written, no lock left


def test_improve_holds_the_lock_while_it_runs_and_lets_go_however_it_ends(tmp_path, tiny_config, monkeypatch):
    import pipelines.improve as improve

    seen = []

    def build_parts(*args, **kwargs):
        seen.append(json.loads((tmp_path / "run" / ".lock").read_text())["pid"])
        raise KeyboardInterrupt  # as a person stopping it

    monkeypatch.setattr(improve, "build_parts", build_parts)
    with pytest.raises(KeyboardInterrupt):
        improve.run_improve(tiny_config, tmp_path / "run", progress=False)
    assert seen == [os.getpid()] and not (tmp_path / "run" / ".lock").exists()


@pytest.fixture
def manifest(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    rows = ["path,text,modality"]
    for i in range(4):
        Image.fromarray(np.full((64, 64), 40 * i, np.uint8)).save(folder / f"cxr_{i}.png")
        rows.append(f"cxr_{i}.png,normal chest radiograph,cxr")
    (folder / "manifest.csv").write_text("\n".join(rows) + "\n")
    return folder / "manifest.csv"


def test_train_refuses_a_run_folder_in_use_and_holds_its_own_for_the_run(tmp_path, capsys, manifest, monkeypatch):
    import generator.trainers as trainers

    run = tmp_path / "runs" / "tiny-vae-1"
    (run / "checkpoints").mkdir(parents=True)
    with held_elsewhere(run) as pid:
        assert main(["train", "vae", "--resume", str(run), "--data", str(manifest), "--no-progress"]) == 2
        assert in_use_message(run, pid) in capsys.readouterr().err

    held = []

    def train_vae(model_cfg, train_cfg, data_cfg, train_rows, val_rows, run_dir, out, progress):
        held.append(json.loads((run_dir.root / ".lock").read_text())["pid"])
        return {"steps": 0}

    monkeypatch.setattr(trainers, "train_vae", train_vae)
    assert main(["train", "vae", "--resume", str(run), "--data", str(manifest), "--no-progress"]) == 0
    assert main(["train", "vae", "--data", str(manifest), f"--run.runs_dir={tmp_path / 'runs'}", "--no-progress"]) == 0
    fresh = [p for p in (tmp_path / "runs").iterdir() if p != run]
    assert held == [os.getpid()] * 2 and len(fresh) == 1
    assert not (run / ".lock").exists() and not (fresh[0] / ".lock").exists()


def test_synthesize_refuses_an_out_folder_in_use_and_lets_go_after_a_run(tmp_path, capsys, monkeypatch):
    import pipelines.synthesize as synth

    spec = tmp_path / "spec.csv"
    spec.write_text("text,modality,n\nNormal chest radiograph.,cxr,1\n")
    out = tmp_path / "out"
    with held_elsewhere(out) as pid:
        assert main(["synthesize", str(spec), "--out", str(out), "--no-progress"]) == 2
        assert in_use_message(out, pid) in capsys.readouterr().err
    assert list(out.iterdir()) == []  # refused before claiming anything

    held = []

    def draw(cfg, slots, mine, folder, *args):
        held.append(json.loads((folder.root / ".lock").read_text())["pid"])
        return synth.DrawSummary(requested=len(mine))

    monkeypatch.setattr(synth, "_draw", draw)
    assert main(["synthesize", str(spec), "--out", str(out), "--no-progress"]) == 0  # the empty folder the lock made is claimed
    assert held == [os.getpid()] and (out / "synthesize.json").is_file() and not (out / ".lock").exists()
