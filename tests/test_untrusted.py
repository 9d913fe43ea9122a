"""Files anyone could have put in a run or index folder are parsed, never executed: a pickle planted
where a checkpoint or a FAISS index is expected is refused with one clear error (its payload, which
would create a marker file, never runs), and a damaged index says which command rebuilds it."""

import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from generator.errors import UserError
from generator.safeload import UnsafeFileError, load_torch_file
from knowledge.index import KnowledgeIndexError, VectorIndex


class Payload:
    """Unpickling this creates ``marker``: the proof that a loader ran code from the file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, as_torch: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if as_torch:
        torch.save({"state": Payload(marker)}, path)
    else:
        path.write_bytes(pickle.dumps({"state": Payload(marker)}))
    return path


def test_the_payload_really_runs_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(plant(tmp_path / "x.pkl", marker).read_bytes())
    assert marker.exists()  # so its absence below means the loaders refused it


# -- synthmed improve: trainer_state.pt ---------------------------------------------------------
@pytest.mark.parametrize("as_torch", [False, True], ids=["raw-pickle", "torch-save"])
def test_a_pickled_trainer_state_is_refused_on_resume(tmp_path, as_torch):
    from pipelines.improve import _load_trainer_state

    marker = tmp_path / "ran"
    checkpoint = tmp_path / "run" / "checkpoints" / "epoch_0001"
    plant(checkpoint / "trainer_state.pt", marker, as_torch)
    with pytest.raises(UnsafeFileError, match=r"refusing to load DDPO trainer state .*trainer_state\.pt.*could run code.*"
                                              r"delete .*epoch_0001"):
        _load_trainer_state(checkpoint)
    assert not marker.exists()


def test_a_damaged_trainer_state_says_what_to_do(tmp_path):
    from pipelines.improve import _load_trainer_state

    checkpoint = tmp_path / "epoch_0001"
    checkpoint.mkdir()
    torch.save({"trainer": {}, "rng": {}}, checkpoint / "trainer_state.pt")
    data = (checkpoint / "trainer_state.pt").read_bytes()
    (checkpoint / "trainer_state.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"trainer_state\.pt is damaged .*start a new run"):
        _load_trainer_state(checkpoint)


def test_the_trainer_and_rng_states_load_weights_only_and_restore_the_same_draws(tmp_path):
    """What ``_checkpoint`` writes is tensors, numbers and lists: plain ``torch.load(weights_only=True)``
    (no numpy allow-list) reads it, and the restored RNGs draw what the saved ones would have."""
    from pipelines.improve import _rng_state, _set_rng_state
    from rlhf.ddpo import PerPromptStatTracker
    from rlhf.trainer import DDPOTrainer

    net = torch.nn.Linear(3, 2)
    trainer = object.__new__(DDPOTrainer)  # state_dict needs only these parts
    trainer.optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.ones(1, 3)).sum().backward()
    trainer.optimizer.step()
    trainer.tracker, trainer.global_step = PerPromptStatTracker(4, 2), 7
    trainer.tracker.update(["a", "a", "b"], np.array([0.1, 0.2, 0.3]))
    # improve.selection.target=table's pool of drafts: features (lists of strings) and half-precision shifts
    trainer.offset_features, trainer.offset_shifts = [["cxr|_bias", "cxr|nodule|present|-"]], torch.ones(1, 2, 4, 3, 3).half()
    # selection.table_replay's kept epochs: ints, lists and tensors only
    trainer.replay = [{"epoch": 3, "indices": [0, 2], "states": torch.ones(2, 2, 4, 3, 3).half(),
                       "targets": torch.zeros(2, 2, 4, 3, 3).half(), "step_norm": torch.tensor([0.5, 0.25])}]

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # leaves a cached gaussian in numpy's legacy state
    random.gauss(0, 1)
    torch.save({"trainer": trainer.state_dict(), "rng": _rng_state()}, tmp_path / "trainer_state.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1), random.random()])

    loaded = torch.load(tmp_path / "trainer_state.pt", weights_only=True)
    assert loaded["trainer"]["global_step"] == 7 and loaded["trainer"]["tracker"]["stats"] == {"a": [0.1, 0.2], "b": [0.3]}
    assert loaded["trainer"]["optimizer"]["state"][0]["exp_avg"].shape == (2, 3)
    assert loaded["trainer"]["offset_pool"]["features"] == trainer.offset_features
    assert torch.equal(loaded["trainer"]["offset_pool"]["shifts"], trainer.offset_shifts)
    (kept,) = loaded["trainer"]["replay"]
    assert kept["epoch"] == 3 and kept["indices"] == [0, 2] and torch.equal(kept["step_norm"], trainer.replay[0]["step_norm"])
    assert torch.equal(kept["states"], trainer.replay[0]["states"]) and kept["states"].dtype == torch.float16
    _set_rng_state(loaded["rng"])
    again = (torch.rand(3), np.random.standard_normal(3), [random.gauss(0, 1), random.random()])
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1]) and again[2] == expected[2]


# -- synthmed train: accelerate checkpoints ------------------------------------------------------
def _linear_run(run_dir: Path, stop_after: int | None = None):
    from generator.config import TrainConfig
    from generator.training import RunDir, batch_indices, run_loop

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    x = torch.linspace(-1, 1, 24).reshape(8, 3)
    cfg = TrainConfig(lr=0.05, batch_size=4, max_steps=4, warmup_steps=1, checkpoint_every=2, validate_every=100, ema_decay=0.9)

    def loss_fn(step, micro):
        idx = torch.from_numpy(batch_indices(8, 4, step, micro, 1, 0))
        return torch.nn.functional.mse_loss(net(x[idx]), x[idx].sum(1, keepdim=True)), {}

    (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    return run_loop(RunDir(run_dir), cfg, [net], list(net.parameters()), loss_fn, progress=False, stop_after=stop_after)


@pytest.fixture
def killed_training_run(tmp_path) -> Path:
    """A training run stopped after step 3: its newest checkpoint is step 2, with the EMA as a custom state."""
    run = tmp_path / "train-run"
    _linear_run(run, stop_after=3)
    checkpoint = run / "checkpoints" / "step_0000002"
    assert {"custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"} <= {p.name for p in checkpoint.iterdir()}
    return run


# custom_checkpoint_0.pkl (the EMA) is what accelerate itself unpickles with weights_only=False;
# random_states_0.pkl is what it skips silently when it fails to load
@pytest.mark.parametrize("name", ["custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin"])
def test_a_pickle_planted_in_a_training_checkpoint_is_refused_on_resume(killed_training_run, tmp_path, name):
    marker = tmp_path / "ran"
    checkpoint = killed_training_run / "checkpoints" / "step_0000002"
    plant(checkpoint / name, marker, as_torch=True)
    with pytest.raises(UnsafeFileError, match=rf"refusing to load checkpoint file .*{name}.*delete .*step_0000002"):
        _linear_run(killed_training_run)
    assert not marker.exists()


def test_an_intact_training_checkpoint_still_resumes(killed_training_run):
    assert _linear_run(killed_training_run).resumed_from == 2


def test_a_damaged_training_checkpoint_names_the_file(killed_training_run):
    checkpoint = killed_training_run / "checkpoints" / "step_0000002"
    (checkpoint / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{")
    with pytest.raises(UserError, match=r"model\.safetensors is damaged .*delete .*step_0000002"):
        _linear_run(killed_training_run)
    (checkpoint / "trainer_state.json").write_text("{not json")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(UserError, match=r"trainer_state\.json is damaged"):
        _linear_run(killed_training_run)


def test_load_torch_file_refuses_a_missing_file_and_allows_numpy_arrays(tmp_path):
    with pytest.raises(UserError, match=r"missing; rebuild"):
        load_torch_file(tmp_path / "none.pt", "state", "rebuild")
    torch.save({"keys": np.arange(3, dtype=np.uint32)}, tmp_path / "rng.pt")  # accelerate's RNG states hold these
    assert load_torch_file(tmp_path / "rng.pt", "state", "rebuild")["keys"].tolist() == [0, 1, 2]


# -- knowledge base: the FAISS index -------------------------------------------------------------
@pytest.fixture
def saved_index(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    index = VectorIndex(384, "Flat")  # the packaged embedder's dimension, so the CLI gets as far as the FAISS file
    index.add(rng.standard_normal((20, 384)).astype(np.float32), [{"id": f"c{i}", "kind": "finding"} for i in range(20)])
    return index.save(tmp_path / "kb" / "concepts")


@pytest.mark.parametrize("name", ["index.faiss", "items.jsonl", "meta.json"])
def test_a_pickle_planted_in_the_index_folder_is_refused_and_says_how_to_rebuild(saved_index, tmp_path, name):
    marker = tmp_path / "ran"
    plant(saved_index / name, marker)
    with pytest.raises(KnowledgeIndexError, match=r"synthmed kb build"):
        VectorIndex.load(saved_index)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_faiss_file_gives_one_error_naming_the_rebuild_command(saved_index, damage):
    path = saved_index / "index.faiss"
    data = path.read_bytes()
    path.write_bytes({"garbage": os.urandom(len(data)), "truncated": data[: len(data) // 3], "empty": b""}[damage])
    with pytest.raises(KnowledgeIndexError, match=r"index\.faiss is corrupt .*rebuild it with `synthmed kb build`") as info:
        VectorIndex.load(saved_index)
    assert "\n" not in str(info.value)


def test_damaged_index_metadata_names_the_rebuild_command(saved_index):
    (saved_index / "items.jsonl").write_bytes(b"\xff\xfe not utf-8\n")
    with pytest.raises(KnowledgeIndexError, match=r"items\.jsonl line 1 is corrupt; rebuild it with `synthmed kb build`"):
        VectorIndex.load(saved_index)
    (saved_index / "meta.json").write_text(json.dumps([1, 2]))
    with pytest.raises(KnowledgeIndexError, match=r"meta\.json is unreadable .*synthmed kb build"):
        VectorIndex.load(saved_index)


def test_a_damaged_index_through_the_cli_is_one_line_and_exit_code_2(saved_index, capsys):
    from pipelines.cli import main

    (saved_index / "index.faiss").write_bytes(b"\x00" * 7)
    code = main(["kb", "search", "pneumothorax", f"--knowledge.index_dir={saved_index.parent}"])
    err = capsys.readouterr().err.strip().splitlines()  # above the error: the embedder's weight-loading progress bar
    errors = [line for line in err if "error" in line]
    assert code == 2 and errors == err[-1:], err
    assert errors[0].startswith("synthmed kb: error: index file") and "not recognized); rebuild it with `synthmed kb build`" in errors[0]


# -- image archives ---------------------------------------------------------------------------------
def test_an_npz_with_pickled_objects_is_refused(tmp_path):
    from generator.data.imageio import ImageReadError, read_npz_item

    marker = tmp_path / "ran"
    np.savez(tmp_path / "a.npz", train_images=np.array([Payload(marker)], dtype=object))
    with pytest.raises(ImageReadError, match="allow_pickle=False"):
        read_npz_item(str(tmp_path / "a.npz"), "train/0")
    assert not marker.exists()
