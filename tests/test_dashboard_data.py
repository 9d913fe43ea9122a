"""The dashboard's data functions (pipelines.dashboard.data, .enhance): runs, traces, manifests, ratings,
path safety, enhancement. No Gradio here; these run wherever the project's tests run."""

from __future__ import annotations

import csv
import json
import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_runs import CRASHED, FINISHED, runs_dir  # noqa: F401  (fixture: two loop runs, a train run, a judges folder)

from pipelines.dashboard import data
from pipelines.dashboard.data import FileGuard, PathRefused
from pipelines.dashboard.enhance import PRESETS, enhance


def png(path: Path, value: int = 128, size: int = 16, rgb: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    array = rng.integers(0, 255, (size, size, 3) if rgb else (size, size), dtype=np.uint8)
    Image.fromarray(array).save(path)
    return path


# -- path safety ------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path):
    runs, datadir, outside = tmp_path / "runs", tmp_path / "data", tmp_path / "secret"
    png(runs / "r1" / "grids" / "epoch_0001.png")
    png(datadir / "images" / "a.png")
    png(outside / "leak.png")
    (outside / "passwords.txt").write_text("hunter2")
    (runs / "traces.sqlite").write_bytes(b"SQLite format 3\x00")
    (runs / "ratings.csv").write_text("image_path,rating,modality,expert_level,prompt\n")
    (runs / "r1" / "config.yaml").write_text("run: {}\n")
    os.symlink(outside / "leak.png", runs / "r1" / "grids" / "link.png")
    os.symlink(outside, datadir / "linkdir")
    guard = FileGuard([runs, datadir], denied=[runs / "traces.sqlite", runs / "ratings.csv"])
    return guard, runs, datadir, outside


def test_guard_serves_images_inside_the_roots(served):
    guard, runs, datadir, _ = served
    assert guard.image(runs / "r1" / "grids" / "epoch_0001.png") == (runs / "r1" / "grids" / "epoch_0001.png").resolve()
    assert guard.image("images/a.png") == (datadir / "images" / "a.png").resolve()  # relative: to each root in turn
    assert guard.image(str(runs / "r1" / "grids" / "epoch%5f0001.png")).name == "epoch_0001.png"  # URL-encoded name


@pytest.mark.parametrize("request_path", [
    "/etc/passwd", "{outside}/leak.png", "{runs}/../secret/leak.png", "r1/../../secret/passwords.txt",
    "{runs}/%2e%2e/secret/leak.png", "{runs}/%252e%252e/secret/leak.png", "..%2fsecret%2fleak.png",
    "{runs}/r1/grids/link.png", "{data}/linkdir/leak.png", "linkdir/passwords.txt", "{runs}/traces.sqlite",
    "{runs}/traces.sqlite-wal", "{runs}/ratings.csv", "traces.sqlite", "%2Fetc%2Fpasswd", "", "a\x00b",
])
def test_guard_refuses_escapes_and_private_files(served, request_path):
    guard, runs, datadir, outside = served
    path = request_path.format(runs=runs, data=datadir, outside=outside)
    with pytest.raises(PathRefused, match="refused"):  # refused as such, not merely "not found"
        guard.check(path, must_exist=False)


def test_guard_images_only_when_asked(served):
    guard, runs, _, _ = served
    assert guard.check(runs / "r1" / "config.yaml").name == "config.yaml"
    with pytest.raises(PathRefused, match="not an image"):
        guard.image(runs / "r1" / "config.yaml")
    with pytest.raises(PathRefused, match="not found"):
        guard.image(runs / "r1" / "grids" / "epoch_0099.png")


# -- runs -------------------------------------------------------------------------------------
def test_list_all_runs_has_loop_runs_first_then_other_runs(runs_dir):  # noqa: F811
    rows = data.list_all_runs(runs_dir)
    ids = [r["id"] for r in rows]
    assert ids[:2] == [CRASHED, FINISHED]
    assert set(ids[2:]) == {"tiny-20250103-090000", "judges-real"}
    kinds = {r["id"]: r["kind"] for r in rows}
    assert kinds[CRASHED] == "improve" and kinds["tiny-20250103-090000"] == "train"
    assert data.list_all_runs(runs_dir / "absent") == []


def test_open_run_gives_series_grids_and_the_same_numbers_as_runs_show(runs_dir):  # noqa: F811
    run = data.open_run(CRASHED, runs_dir)
    assert run["kind"] == "improve" and run["status"] == "running" and run["best_epoch"] == 2
    reward = run["series"]["reward"]
    assert [x for x, _ in reward["total"]] == [1, 2, 3, 4]
    assert reward["total"][0][1] == pytest.approx(0.45) and set(reward) == {"total", "findings", "alignment", "selector", "quality"}
    heldout = run["series"]["heldout"]
    assert [x for x, _ in heldout["all_requested_shown"]] == [0, 2, 4]
    assert [x for x, _ in heldout["fd"]] == [0, 2]  # the last eval has no FD: left out, not zero
    assert set(run["series"]["per_modality"]) == {"cxr", "oct"}
    assert [e for e, _ in run["grids"]] == [1, 2, 3, 4]
    assert not run.get("warnings")  # the half-written last line is left out, not reported
    assert not any(name.endswith("(reference)") for name in heldout)  # this run logged no reference


def test_open_run_draws_the_reference_as_a_level_line_across_the_evaluations(tmp_path):
    from test_runs import epoch_line, eval_line, step_lines, write_run

    reference = {"kind": "reference", "epoch": 0, "source": "phantoms", "per_request": 8,
                 "overall": {"all_requested_shown": 0.6, "requested_shown": 0.8, "finding_accuracy": 0.9, "fd": 30.0}, "per_modality": {}}
    write_run(tmp_path, "improve-20250104-090000", [eval_line(0, 0.4, 50.0, True), reference, *step_lines(1), epoch_line(1),
                                                    eval_line(1, 0.45, 48.0, True)], "2025-01-04T09:00:00")
    heldout = data.open_run("improve-20250104-090000", tmp_path)["series"]["heldout"]
    assert heldout["all_requested_shown (reference)"] == [(0, 0.6), (1, 0.6)]
    assert heldout["finding_accuracy (reference)"] == [(0, 0.9), (1, 0.9)]
    assert "fd (reference)" not in heldout  # a distance has no ceiling; FD keeps its own plot
    assert not any("reward-guided" in name for name in heldout)  # this run drew no guided line


def test_open_run_draws_the_calibrated_reward_guidance_as_a_level_line(tmp_path):
    from test_runs import epoch_line, eval_line, step_lines, write_run

    def guided(scale, share, calibrated):
        return {"kind": "guided", "epoch": 0, "scale": scale, "views": 4, "calibrated": calibrated,
                "overall": {"all_requested_shown": share, "requested_shown": 0.5, "finding_accuracy": 0.7, "fd": 40.0}, "per_modality": {}}

    write_run(tmp_path, "improve-20250105-090000", [eval_line(0, 0.4, 50.0, True), guided(0.05, 0.5, True), guided(0.3, 0.7, False),
                                                    *step_lines(1), epoch_line(1), eval_line(1, 0.45, 48.0, True)], "2025-01-05T09:00:00")
    heldout = data.open_run("improve-20250105-090000", tmp_path)["series"]["heldout"]
    assert heldout["all_requested_shown (reward-guided 0.05)"] == [(0, 0.5), (1, 0.5)]  # the calibrated scale, not the higher refused one
    assert "fd (reward-guided 0.05)" not in heldout and not any("0.3" in name for name in heldout)


def test_open_run_of_a_train_run_plots_its_numbers(runs_dir):  # noqa: F811
    run = data.open_run("tiny-20250103-090000", runs_dir)
    assert run["kind"] == "train" and run["series"]["metrics"]["loss"] == [(1, 0.5)]


@pytest.mark.parametrize("bad", ["../etc", "a/b", "..", "."])
def test_open_run_refuses_paths(runs_dir, bad):  # noqa: F811
    with pytest.raises(PathRefused):
        data.open_run(bad, runs_dir)


def test_open_run_missing_and_damaged_runs_say_so(runs_dir):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="no run 'nope'"):
        data.open_run("nope", runs_dir)
    metrics = runs_dir / FINISHED / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:10]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2: not valid JSON"):
        data.open_run(FINISHED, runs_dir)
    assert {r["id"]: r for r in data.list_all_runs(runs_dir)}[FINISHED]["status"] == "unreadable"


def test_samples_table_by_epoch(tmp_path):
    run = tmp_path / "r"
    run.mkdir()
    lines = [{"epoch": e, "index": i, "modality": "cxr", "request": f"req {e}.{i}", "prompt": "p", "reward": 0.5 + i,
              "components": {"findings": 0.25, "alignment": 0.5, "selector": 0.1, "quality": 1.0, "findings/prob/x": 0.3},
              "advantage": -0.2 * i, "selected": i == 1} for e in (1, 2) for i in range(3)]
    (run / "samples.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"epoch": 3, "ind')  # being written
    header, rows, epochs = data.samples_table(run)
    assert epochs == [1, 2] and len(rows) == 3 and all(r[0] == 2 for r in rows)
    row = dict(zip(header, rows[1]))
    assert header[:3] == ["epoch", "index", "modality"] and header[-2:] == ["request", "prompt"]
    assert row == {"epoch": 2, "index": 1, "modality": "cxr", "request": "req 2.1", "reward": 1.5, "findings": 0.25, "alignment": 0.5,
                   "selector": 0.1, "quality": 1.0, "advantage": -0.2, "selected": True, "prompt": "p"}
    assert [r[1] for r in data.samples_table(run, epoch=1)[1]] == [0, 1, 2]
    assert data.samples_table(tmp_path / "none")[1:] == ([], [])


def test_the_samples_index_follows_appends_cuts_and_damage(tmp_path):
    """The samples log is indexed by epoch and read again only where it grew: the line being written joins once
    complete, a log a resume cut back is indexed anew, a line whose key order differs is still placed by its
    epoch, and a damaged line of the epoch shown is one clear error naming its line."""
    run = tmp_path / "r"
    run.mkdir()
    log = run / "samples.jsonl"

    def line(epoch, index):
        return json.dumps({"epoch": epoch, "index": index, "reward": 0.5}) + "\n"

    log.write_text(line(1, 0) + line(1, 1) + '{"epoch": 2, "ind')
    assert data.samples_table(run)[2] == [1]
    with open(log, "a") as f:
        f.write('ex": 0, "reward": 0.5}\n' + json.dumps({"index": 1, "epoch": 2}) + "\n")
    assert data.samples_table(run)[2] == [1, 2] and [r[1] for r in data.samples_table(run)[1]] == [0, 1]
    with open(log, "r+") as f:  # a resume cuts the log back to its checkpoint, then appends again
        f.truncate(len(line(1, 0)) + len(line(1, 1)))
    with open(log, "a") as f:
        f.write(line(3, 0))
    assert data.samples_table(run)[2] == [1, 3]
    with open(log, "r+") as f:  # cut back again, and written past the indexed end before the page looks
        f.truncate(len(line(1, 0)))
    with open(log, "a") as f:
        f.write(line(5, 0) + line(5, 1) + line(5, 2))
    assert data.samples_table(run)[2] == [1, 5] and len(data.samples_table(run)[1]) == 3
    with open(log, "a") as f:
        f.write('{"epoch": 6, "index": 0, "reward": \n')
    with pytest.raises(ValueError, match=r"samples\.jsonl:5: not valid JSON"):
        data.samples_table(run)
    assert [r[1] for r in data.samples_table(run, epoch=5)[1]] == [0, 1, 2]  # the other epochs still read


def test_compare_runs_side_by_side(runs_dir):  # noqa: F811
    both = data.compare_runs(CRASHED, FINISHED, runs_dir)
    assert [r["id"] for r in both["runs"]] == [CRASHED, FINISHED]
    assert both["table"][1]["fd"] == "50.000 → 45.000" and both["table"][1]["compared_epoch"] == 2
    assert both["table"][0]["fd"] == "50.000 → 40.000" and both["table"][0]["compared_epoch"] == 2  # the best, not the last


# -- traces -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traces_db(tmp_path_factory, embedder):
    """Three real traces from the real graph (rules reasoner, FAISS knowledge base; composition only, and
    one refusal) in a real SQLite checkpointer, plus a fake candidate image in one of them."""
    from agents.config import AgentsConfig
    from agents.graph import build_graph, recursion_limit
    from agents.nodes import settings_from
    from agents.rules import RuleReasoner
    from agents.traces import open_checkpointer
    from knowledge.build import build_knowledge_base, load_retriever
    from knowledge.lexicon import load_lexicon

    folder = tmp_path_factory.mktemp("traces")
    build_knowledge_base(folder / "kb", load_lexicon(), iter([]), embedder, "Flat", "Flat", progress=False)
    retriever = load_retriever(folder / "kb", embedder, modalities=["cxr", "chest_ct", "brain_mri", "fundus", "oct"])
    saver = open_checkpointer(folder / "traces.sqlite")
    graph = build_graph(RuleReasoner(retriever), None, None, saver)
    cfg = AgentsConfig(out=str(folder / "images"))
    for trace_id, text, modality in [("t-cxr", "large left pleural effusion, no pneumothorax", "cxr"),
                                     ("t-oct", "full-thickness macular hole", "oct"), ("t-bad", "", "cxr")]:
        s = settings_from(cfg, trace_id, 2, 4.0, stop_after="compose_prompt")
        graph.invoke({"text": text, "modality": modality, "settings": s},
                     {"configurable": {"thread_id": trace_id}, "recursion_limit": recursion_limit(s["max_rounds"])})
    saver.conn.close()
    return folder / "traces.sqlite"


def test_trace_index_lists_filters_and_rereads_only_what_changed(traces_db, monkeypatch):
    from agents.traces import list_traces

    index = data.TraceIndex(traces_db)
    rows = index.rows()
    assert [r["trace_id"] for r in rows] == ["t-bad", "t-oct", "t-cxr"]  # newest first
    expected = {r["trace_id"]: r for r in list_traces(traces_db)}
    assert all(r == expected[r["trace_id"]] for r in rows)  # the same rows `synthmed trace list` prints
    assert {r["status"] for r in rows} == {"composed", "refused"}
    assert [r["trace_id"] for r in data.filter_traces(rows, modality="oct")] == ["t-oct"]
    assert [r["trace_id"] for r in data.filter_traces(rows, status="refused")] == ["t-bad"]
    assert [r["trace_id"] for r in data.filter_traces(rows, text="PLEURAL")] == ["t-cxr"]
    from langgraph.checkpoint.sqlite import SqliteSaver

    calls = []
    original = SqliteSaver.get_tuple
    monkeypatch.setattr(SqliteSaver, "get_tuple", lambda self, config: calls.append(config) or original(self, config))
    assert index.rows() == rows and calls == []  # nothing changed: nothing read again
    assert data.TraceIndex(traces_db).rows() == rows and len(calls) == 2 * 3  # a fresh index: two checkpoints per trace
    assert data.TraceIndex(traces_db.parent / "absent.sqlite").rows() == []


def test_open_trace_has_the_cli_text_and_only_served_images(traces_db, tmp_path):
    guard = FileGuard([tmp_path], denied=[traces_db])
    trace = data.open_trace(traces_db, "t-cxr", guard)
    assert "assess_pathology" in trace["text_view"] and "prompt:" in trace["text_view"]
    assert trace["composition"]["prompt"] and trace["status"] == "composed"
    flat = [r for records in trace["retrievals"].values() for r in records]
    rows = data.retrieval_rows(flat)
    assert rows and all(len(r) == len(data.RETRIEVAL_COLUMNS) for r in rows)
    assert {r[0] for r in rows} <= {"localize_anatomy", "assess_pathology", "map_visual_features"}
    assert any(r[8] for r in rows) and all(isinstance(r[3], float) for r in rows)
    with pytest.raises(FileNotFoundError, match="no trace 'nope'"):
        data.open_trace(traces_db, "nope", guard)
    corrupt = tmp_path / "corrupt.sqlite"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(ValueError, match="cannot be read"):
        data.open_trace(corrupt, "t-cxr", guard)


# -- manifests --------------------------------------------------------------------------------
@pytest.fixture
def manifest(tmp_path):
    root = tmp_path / "data" / "set"
    rows = [("images/a.png", "Large left pleural effusion.", "cxr", [{"name": "pleural_effusion", "present": True, "side": "left"}]),
            ("images/b.png", "Normal chest.", "cxr", []),
            ("images/c.png", "Macular hole.", "oct", [{"name": "macular_hole", "present": True}]),
            ("images/d.png", "No effusion.", "CXR", [{"name": "pleural_effusion", "present": False}])]
    for i, (p, *_rest) in enumerate(rows):
        png(root / p, value=i)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "modality", "findings"])
        for p, text, modality, findings in rows:
            w.writerow([p, text, modality, json.dumps(findings) if findings else ""])
    return root / "manifest.csv"


def test_manifest_browse_and_filter(manifest, tmp_path):
    guard = FileGuard([tmp_path / "data"])
    assert data.find_manifests([tmp_path / "data"]) == [str(manifest)]
    rows, skipped = data.read_manifest(manifest, guard)
    assert len(rows) == 4 and skipped == [] and rows[3]["modality"] == "cxr"
    assert Path(rows[0]["path"]).is_absolute() and guard.image(rows[0]["path"])
    assert data.finding_names(rows) == ["macular_hole", "pleural_effusion"]
    assert [r["text"] for r in data.filter_manifest(rows, modality="cxr", finding="pleural_effusion")] == ["Large left pleural effusion."]
    assert [r["text"] for r in data.filter_manifest(rows, modality="cxr", finding="normal")] == ["Normal chest.", "No effusion."]
    assert len(data.filter_manifest(rows, modality="oct")) == 1


def test_manifest_outside_or_corrupt_is_a_clear_error(manifest, tmp_path):
    guard = FileGuard([tmp_path / "data"])
    other = tmp_path / "elsewhere.csv"
    other.write_text("path,text,modality\n")
    with pytest.raises(PathRefused):
        data.read_manifest(other, guard)
    bad = tmp_path / "data" / "bad.csv"
    bad.write_text("colour,size\nred,3\n")
    with pytest.raises(ValueError, match="cannot read this manifest"):
        data.read_manifest(bad, guard)


# -- ratings ----------------------------------------------------------------------------------
def test_ratings_are_written_in_minims_format_and_the_selector_reads_them(manifest, tmp_path):
    from rlhf.config import SelectorConfig
    from rlhf.selector import RATINGS_COLUMNS, read_ratings

    ratings = tmp_path / "ratings" / "ratings.csv"
    image = manifest.parent / "images" / "a.png"
    data.append_rating(ratings, image, 4, "chest x-ray", "Senior", "Large left, pleural effusion.", "crisp, but \"odd\" apex")
    data.append_rating(ratings, manifest.parent / "images" / "c.png", 1, "oct", "junior")
    with open(ratings, newline="") as f:
        header = next(csv.reader(f))
    assert tuple(header[:5]) == RATINGS_COLUMNS and header[5] == "comment"
    table = read_ratings(ratings, SelectorConfig())
    assert table.paths == [str(image.resolve()), str((manifest.parent / "images" / "c.png").resolve())]
    assert table.ratings.tolist() == [4.0, 1.0] and table.modalities == ["cxr", "oct"] and table.levels == ["senior", "junior"]
    assert table.scale == (1.0, 5.0) and table.prompts[0] == "Large left, pleural effusion."
    assert data.read_ratings_rows(ratings)[0]["comment"] == 'crisp, but "odd" apex'


@pytest.mark.parametrize("rating, level, modality, message", [
    (0, "senior", "cxr", "whole number from 1 to 5"), (6, "senior", "cxr", "whole number"), (3.5, "senior", "cxr", "whole number"),
    (3, "student", "cxr", "unknown expert level"), (3, "senior", "ultrasound", "ultrasound"), (3, "senior", "", "modality"),
])
def test_bad_ratings_are_refused_and_write_nothing(tmp_path, rating, level, modality, message):
    ratings = tmp_path / "ratings.csv"
    with pytest.raises(ValueError, match=message):
        data.append_rating(ratings, png(tmp_path / "x.png"), rating, modality, level)
    assert not ratings.exists()


def test_a_crash_while_writing_keeps_every_earlier_rating(tmp_path, monkeypatch):
    ratings, image = tmp_path / "ratings.csv", png(tmp_path / "x.png")
    data.append_rating(ratings, image, 3, "cxr", "expert")
    before = ratings.read_bytes()

    def crash(*args):
        raise OSError("power cut")

    monkeypatch.setattr(data.os, "replace", crash)
    with pytest.raises(OSError, match="power cut"):
        data.append_rating(ratings, image, 5, "cxr", "expert")
    assert ratings.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # no debris left


def test_concurrent_raters_lose_no_rating(tmp_path):
    ratings, image = tmp_path / "ratings.csv", png(tmp_path / "x.png")

    def rate(start):
        for i in range(15):
            data.append_rating(ratings, image, 1 + (start + i) % 5, "cxr", "senior", f"p{start + i}")

    threads = [threading.Thread(target=rate, args=(100 * k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rows = data.read_ratings_rows(ratings)
    assert len(rows) == 60 and len({r["prompt"] for r in rows}) == 60


def test_rating_items_from_a_folder_mixed_with_real_images(manifest, tmp_path):
    runs = tmp_path / "runs"
    for i in range(3):
        png(runs / "generate" / "t1" / f"cand_{i}.png", value=10 + i)
    (runs / "generate" / "t1" / "cand_0.txt").write_text("Large left pleural effusion.")
    png(runs / "r" / "plots" / "reward.png")
    png(runs / "r" / "grids" / "epoch_0001.png")
    guard = FileGuard([runs, tmp_path / "data"])
    items = data.rating_items(str(runs / "generate"), guard, "folder")
    assert [Path(i.path).name for i in items] == ["cand_0.png", "cand_1.png", "cand_2.png"]
    assert items[0].prompt == "Large left pleural effusion." and items[0].origin == "generated"
    assert [Path(i.path).name for i in data.rating_items(str(runs / "r"), guard, "run")] == ["epoch_0001.png"]
    mixed = data.rating_items(str(runs / "generate"), guard, "folder", real_manifest=str(manifest), real_count=2, shuffle=True, seed=1)
    assert len(mixed) == 5 and sum(i.origin == "real" for i in mixed) == 2
    assert mixed == data.rating_items(str(runs / "generate"), guard, "folder", real_manifest=str(manifest), real_count=2, shuffle=True,
                                      seed=1)  # the same order for the same seed
    assert [i.modality for i in data.rating_items(str(manifest), guard, "manifest")] == ["cxr", "cxr", "oct", "cxr"]
    with pytest.raises(PathRefused):
        data.rating_items("/etc", guard, "folder")


# -- enhancement ------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("rgb", [False, True])
def test_enhance_keeps_shape_and_dtype(preset, rgb):
    image = np.asarray(Image.open(png(Path("/tmp") / f"synthmed_enh_{rgb}.png", 3, 64, rgb)))
    out = enhance(image, preset)
    assert out.shape == image.shape and out.dtype == np.uint8


def test_enhance_presets_do_what_they_say():
    from generator.data.transforms import clahe

    ramp = np.tile(np.arange(64, dtype=np.uint8) * 2 + 60, (64, 1))  # 60..186
    assert np.array_equal(enhance(ramp, "clahe", strength=1.0), clahe(ramp, 2.0, 8))
    windowed = enhance(ramp, "window", centre=123, width=64)
    assert windowed.min() == 0 and windowed.max() == 255  # values outside the window clip
    assert np.abs(enhance(ramp, "window", centre=127.5, width=256).astype(int) - ramp).max() <= 1  # the full window: as is
    step = np.zeros((32, 32), np.uint8)
    step[:, 16:] = 200
    sharp = enhance(step, "unsharp", strength=1.0)
    assert sharp[:, 16:].max() == 255 and sharp[:, :16].min() == 0  # overshoot at the edge, flat far away
    assert np.array_equal(sharp[:, :8], step[:, :8]) and np.array_equal(enhance(step, "edges")[:, :8], step[:, :8])
    assert enhance(step, "edges")[:, 15:17].mean() > step[:, 15:17].mean()
    with pytest.raises(ValueError, match="unknown preset"):
        enhance(step, "sepia")


def test_a_running_run_reads_fresh_on_every_open(runs_dir):  # noqa: F811
    from test_runs import epoch_line

    before = data.open_run(CRASHED, runs_dir)
    metrics = runs_dir / CRASHED / "metrics.jsonl"
    text = metrics.read_text()
    cut = text.rindex("\n") + 1  # drop the half-written line, as the loop's next write would complete it
    metrics.write_text(text[:cut] + json.dumps(epoch_line(5)) + "\n")
    samples = runs_dir / CRASHED / "samples.jsonl"
    samples.write_text(samples.read_text() + json.dumps({"epoch": 5, "index": 0, "reward": 0.9, "components": {}}) + "\n")
    after = data.open_run(CRASHED, runs_dir)
    assert before["epochs_done"] == 4 and after["epochs_done"] == 5 and after["series"]["reward"]["total"][-1][0] == 5
    assert data.samples_table(runs_dir / CRASHED)[2] == [1, 5]  # the samples cache saw the file change


def test_the_command_without_gradio_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    import sys

    from pipelines.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: `import gradio` raises ImportError
    assert main(["dashboard", "--runs", str(tmp_path / "runs"), f"--agents.out={tmp_path / 'gen'}"]) == 2
    assert 'pip install -e ".[dashboard]"' in capsys.readouterr().err


def test_long_lines_are_thinned_for_the_browser_and_keep_their_shape():
    """A 200-epoch curve is drawn from 60 points (the Runs page's) or 100: the ends, a one-epoch spike and a dip
    survive, x stays in order; a short curve is drawn whole."""
    import math

    points = [(e, math.sin(e / 15) - (3.0 if e == 61 else 0.0) + (4.0 if e == 137 else 0.0)) for e in range(1, 201)]
    for n in (60, 100):
        thin = data.thin_points(points, n)
        assert len(thin) == n and thin[0] == points[0] and thin[-1] == points[-1]
        assert points[60] in thin and points[136] in thin
        assert all(a[0] < b[0] for a, b in zip(thin, thin[1:])) and set(thin) <= set(points)
    assert data.thin_points(points[:40], 60) == points[:40]
