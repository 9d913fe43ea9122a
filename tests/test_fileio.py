"""Atomic writes: the target is complete or untouched, and a failed write leaves no debris."""

import json
from pathlib import Path

import numpy as np
import pytest

from generator.fileio import (
    atomic_folder,
    atomic_open,
    atomic_write,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def test_whole_file_writers_round_trip(tmp_path):
    write_bytes_atomic(tmp_path / "a.bin", b"\x00\x01")
    write_text_atomic(tmp_path / "a.txt", "héllo\n")
    write_json_atomic(tmp_path / "a.json", {"x": np.float32(0.5), "n": np.int64(3), "v": np.arange(2), "p": Path("q")})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo\n"
    text = (tmp_path / "a.json").read_text()
    assert text == json.dumps({"x": 0.5, "n": 3, "v": [0, 1], "p": "q"}, indent=2) + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.txt"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_debris(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")

    def half_then_crash(tmp: Path) -> None:
        tmp.write_bytes(b"ne")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_crash)
    with pytest.raises(OSError, match="no space"), atomic_open(tmp_path / "rows.csv", "w") as f:
        f.write("a,b\n")
        raise OSError("no space left on device")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_the_writer_sees_the_target_suffix(tmp_path):
    seen = []
    atomic_write(tmp_path / "sheet.png", lambda tmp: (seen.append(tmp), tmp.write_bytes(b"png")))
    assert seen[0].suffix == ".png" and seen[0].parent == tmp_path and seen[0] != tmp_path / "sheet.png"
    assert (tmp_path / "sheet.png").read_bytes() == b"png"


def test_atomic_open_refuses_append():
    with pytest.raises(ValueError, match="not a write mode"), atomic_open("x.txt", "a"):
        pass


def test_atomic_folder_swaps_in_when_complete_and_keeps_the_old_one_on_failure(tmp_path):
    folder = tmp_path / "clf"
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text("1")
    with pytest.raises(RuntimeError), atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text("2")
        raise RuntimeError("crash")
    assert (folder / "config.json").read_text() == "1"
    with atomic_folder(folder) as tmp:
        (tmp / "config.json").write_text("3")
    assert (folder / "config.json").read_text() == "3"
    assert [p.name for p in tmp_path.iterdir()] == ["clf"]


def test_an_export_that_keeps_the_folder_rewrites_its_files_and_keeps_the_others(tmp_path):
    """A model export (``keep=True``): the UNet files are replaced, the VAE trained earlier stays, and a failed
    export leaves the folder exactly as it was; temporaries of earlier writers are not copied in."""
    model = tmp_path / "model"
    (model / "vae").mkdir(parents=True)
    (model / "vae" / "metadata.json").write_text("vae")
    (model / "unet.bin").write_text("old")
    (model / ".unet.bin.99999999.0123abcd.tmp.bin").write_text("half")
    with pytest.raises(RuntimeError), atomic_folder(model, keep=True) as tmp:
        (tmp / "unet.bin").write_text("half")
        raise RuntimeError("killed")
    assert (model / "unet.bin").read_text() == "old"
    with atomic_folder(model, keep=True) as tmp:
        assert (tmp / "vae" / "metadata.json").read_text() == "vae"
        (tmp / "unet.bin").write_text("new")
    assert (model / "unet.bin").read_text() == "new" and (model / "vae" / "metadata.json").read_text() == "vae"
    assert sorted(p.name for p in model.iterdir()) == ["unet.bin", "vae"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_claim_new_folder_never_hands_out_a_folder_twice(tmp_path):
    import threading

    from generator.fileio import claim_new_folder

    base = tmp_path / "runs" / "tiny-improve-20261203-120000"
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(claim_new_folder(base))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 8 and all(p.is_dir() for p in got)
    assert sorted(p.name for p in got) == sorted([base.name] + [f"{base.name}-{i}" for i in range(1, 8)])


def test_sweep_removes_temporaries_of_dead_writers_and_keeps_live_ones(tmp_path):
    import subprocess
    import sys

    from generator.fileio import sweep_temporaries, temporary_path

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "checkpoints").mkdir()
        orphan = tmp_path / "checkpoints" / f".state.json.{dead.pid}.0123abcd.tmp.json"
        mine_before = temporary_path(tmp_path / "metrics.jsonl")  # this pid from an earlier life of a resumed run
        writing = tmp_path / f".lora.safetensors.{live.pid}.89abcdef.tmp.safetensors"
        folder = tmp_path / f".final.tmp-{dead.pid}"
        (folder / "sub").mkdir(parents=True)
        for path in (orphan, mine_before, writing, folder / "sub" / "x.bin"):
            path.write_bytes(b"half")
        kept = [tmp_path / ".lock", tmp_path / ".hidden.json", tmp_path / "metrics.jsonl"]
        for path in kept:
            path.write_text("{}\n")
        removed = set(sweep_temporaries(tmp_path))
        assert removed == {orphan, mine_before, folder}
        assert writing.exists() and all(p.exists() for p in kept)
        assert sweep_temporaries(tmp_path / "absent") == []
        # a swap killed between its renames: the old folder stepped aside comes back; beside a present folder it goes
        (tmp_path / f".model.old-{dead.pid}").mkdir()
        (tmp_path / f".model.old-{dead.pid}" / "unet.bin").write_text("complete")
        (tmp_path / f".model.tmp-{dead.pid}").mkdir()
        (tmp_path / f".vae.old-{dead.pid}").mkdir()
        (tmp_path / "vae").mkdir()
        assert len(sweep_temporaries(tmp_path, recursive=False)) == 3
        assert (tmp_path / "model" / "unet.bin").read_text() == "complete" and (tmp_path / "vae").is_dir()
        assert not list(tmp_path.glob(".model.*")) and not list(tmp_path.glob(".vae.*"))
    finally:
        live.kill()
