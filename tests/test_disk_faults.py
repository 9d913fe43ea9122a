"""A full disk or a read-only folder gives one clear error and leaves nothing half-written where a
reader would take it: no partial target file, no temporary files, no partial log line.

Faults are injected (ENOSPC by monkeypatching the write, rename or fsync; a read-only folder by
refusing writes under it), so the tests also run as root, where chmod does not stop writes."""

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest

from generator.errors import SynthmedError
from generator.fileio import WriteError, append_whole, atomic_folder, atomic_open, atomic_write, write_json_atomic, write_text_atomic


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def deny_writes_under(monkeypatch, folder: Path) -> None:
    """``folder`` acts read-only for this process: creating, opening for writing or renaming into it
    raises PermissionError, as a chmod 0o500 folder does for a user other than root."""
    root = os.path.realpath(folder)

    def inside(path) -> bool:
        if isinstance(path, int):
            return False
        real = os.path.realpath(os.fsdecode(os.fspath(path)))
        return real == root or real.startswith(root + os.sep)

    def refuse(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(os.fspath(path)))

    real_open, real_os_open, real_mkdir, real_replace = builtins.open, os.open, os.mkdir, os.replace

    def guarded_open(file, mode="r", *args, **kwargs):
        if set(mode) & set("wax+") and inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and inside(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        if inside(path):
            refuse(path)
        return real_mkdir(path, *args, **kwargs)

    def guarded_replace(src, dst, *args, **kwargs):
        if inside(dst) or inside(src):
            refuse(dst)
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr(os, "open", guarded_os_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)
    monkeypatch.setattr(os, "replace", guarded_replace)


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# -- generator/fileio.py ------------------------------------------------------------------------------
@pytest.mark.parametrize("fails", ["fsync", "replace"])
def test_a_full_disk_keeps_the_old_file_and_removes_the_temporary_one(tmp_path, monkeypatch, fails):
    target = tmp_path / "metadata.json"
    target.write_text('{"old": true}\n')
    with monkeypatch.context() as m:
        m.setattr(os, fails, enospc)
        with pytest.raises(WriteError) as info:
            write_json_atomic(target, {"new": list(range(100))})
    message = str(info.value)
    assert isinstance(info.value, OSError) and isinstance(info.value, SynthmedError) and info.value.errno == errno.ENOSPC
    assert message.startswith(f"cannot write {target}: no space left on the disk") and "\n" not in message
    assert json.loads(target.read_text()) == {"old": True}
    assert names(tmp_path) == ["metadata.json"]


def test_atomic_write_with_a_path_writer_on_a_full_disk(tmp_path, monkeypatch):
    def writer(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        enospc()

    with pytest.raises(WriteError, match=r"model\.safetensors: no space left"):
        atomic_write(tmp_path / "model.safetensors", writer)
    assert names(tmp_path) == []


def test_a_read_only_folder_gives_one_error_naming_the_target(tmp_path, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    deny_writes_under(monkeypatch, folder)
    with pytest.raises(WriteError, match=r"^cannot write .*ro/a\.txt: permission denied; make the folder writable"):
        write_text_atomic(folder / "a.txt", "x")
    with pytest.raises(WriteError, match=r"rows\.csv: permission denied"), atomic_open(folder / "rows.csv") as f:
        f.write("never")
    with pytest.raises(WriteError, match=r"ro/clf: permission denied"), atomic_folder(folder / "clf") as tmp:
        (tmp / "never").write_text("x")
    monkeypatch.undo()
    assert names(folder) == []


def test_a_really_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: chmod 0o500 does not stop writes (the injected test above covers this)")
        with pytest.raises(WriteError, match="permission denied"):
            write_json_atomic(folder / "a.json", {})
        assert names(folder) == []
    finally:
        folder.chmod(0o700)


def test_atomic_folder_removes_its_temporary_folder_when_the_disk_fills(tmp_path):
    folder = tmp_path / "checkpoints" / "epoch_0001"
    folder.parent.mkdir()
    with pytest.raises(OSError, match="No space left"), atomic_folder(folder, folder.parent / ".tmp_epoch_0001") as tmp:
        (tmp / "lora.safetensors").write_bytes(b"complete")
        enospc()  # the next file of the checkpoint
    assert names(folder.parent) == []


# -- appended logs: metrics.jsonl ---------------------------------------------------------------------
def half_then_enospc(monkeypatch):
    real_write, calls = os.write, []

    def write(fd, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # the disk takes part of the batch...
        enospc()  # ...then is full

    monkeypatch.setattr(os, "write", write)
    return calls


def test_append_lines_leaves_no_partial_line_on_a_full_disk(tmp_path, monkeypatch):
    from pipelines.improve import append_lines

    log = tmp_path / "metrics.jsonl"
    append_lines(log, [{"kind": "epoch", "epoch": 1}])
    before = log.read_bytes()
    with monkeypatch.context() as m:
        calls = half_then_enospc(m)
        with pytest.raises(WriteError, match=r"cannot write .*metrics\.jsonl: no space left"):
            append_lines(log, [{"kind": "step", "step": i, "loss": 0.5} for i in range(50)])
    assert calls[0] > calls[1] > 0  # a short write happened and was cut back
    assert log.read_bytes() == before
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1]
    append_lines(log, [{"kind": "epoch", "epoch": 2}])  # the next append continues where the log was whole
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_failed_fsync_cuts_the_appended_lines_back(tmp_path, monkeypatch):
    log = tmp_path / "metrics.jsonl"
    log.write_bytes(b'{"step": 10}\n')
    monkeypatch.setattr(os, "fsync", enospc)
    with pytest.raises(WriteError):
        append_whole(log, b'{"step": 20}\n')
    assert log.read_bytes() == b'{"step": 10}\n'


def test_a_training_log_line_is_whole_or_absent(tmp_path, monkeypatch):
    from generator.training import RunDir

    run = RunDir(tmp_path)
    run.log_metrics({"step": 10, "loss": 0.25})
    with monkeypatch.context() as m:
        half_then_enospc(m)
        with pytest.raises(WriteError, match="no space left"):
            run.log_metrics({"step": 20, "loss": 0.125, "note": "x" * 200})
    assert [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [{"step": 10, "loss": 0.25}]


# -- one command end to end -------------------------------------------------------------------------
PHANTOMS = ["data", "phantoms", "--per-finding", "1", "--size", "32", "--modalities", "cxr", "--no-progress"]


def test_phantoms_on_a_full_disk_exit_2_with_one_line_and_no_manifest(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    out = tmp_path / "ph"
    real_replace = os.replace

    def full_disk_for_out(src, dst, *args, **kwargs):  # the disk fills when the manifest is renamed into place
        if Path(dst).parent == out:
            enospc()
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk_for_out)
    code = main([*PHANTOMS, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("synthmed data: error: cannot write") and "no space left on the disk" in err
    assert not {"manifest.csv", "labels.jsonl", "metadata.json"} & set(names(out))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]


def test_phantoms_into_a_read_only_folder_exit_2_with_one_line(tmp_path, monkeypatch, capsys):
    from pipelines.cli import main

    out = tmp_path / "ro"
    out.mkdir()
    deny_writes_under(monkeypatch, out)
    code = main([*PHANTOMS, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    monkeypatch.undo()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("synthmed data: error:") and "Permission denied" in err and str(out) in err
    assert names(out) == []
