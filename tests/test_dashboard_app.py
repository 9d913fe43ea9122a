"""The dashboard served for real (Gradio on a local port) and driven through its API with gradio_client:
a request through the real agent graph on tiny models, streamed stage by stage; a rating saved in
MINIM's format; the file route refusing every escape; the login; the command's refusals.

Skips, with the reason, where gradio or gradio_client is not installed (pip install -e ".[dashboard,test]")."""

from __future__ import annotations

import json
import os
import socket
import urllib.parse
from pathlib import Path

import pytest

gr = pytest.importorskip("gradio", reason='the dashboard extra is not installed: pip install -e ".[dashboard]"')
gradio_client = pytest.importorskip("gradio_client", reason="gradio_client is not installed (it comes with gradio)")
httpx = pytest.importorskip("httpx")

import torch
from test_graph import MODALITIES, TINY, FailFirst
from test_runs import CRASHED, runs_dir  # noqa: F401

from pipelines.cli import main
from pipelines.dashboard.app import DashboardSettings, build_app, launch

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_agent(tmp_path_factory, embedder):
    """The real graph (rules reasoner over a real FAISS knowledge base, a tiny real generator, the real
    verifier failing its first round) with a real SQLite checkpointer, as pipelines.agent.Agent."""
    from agents.drawing import ImageGenerator
    from agents.graph import build_graph
    from agents.rules import RuleReasoner
    from agents.traces import open_checkpointer
    from generator.conditioning import TextEncoder
    from generator.models import LatentDiffusion
    from knowledge.build import build_knowledge_base, load_retriever
    from knowledge.lexicon import load_lexicon
    from pipelines.agent import Agent
    from pipelines.config import load_config
    from rlhf.classifiers import FindingScorer, fit_classifier, phantom_benchmark_rows
    from rlhf.config import ClassifierConfig

    root = tmp_path_factory.mktemp("dash")
    build_knowledge_base(root / "kb", load_lexicon(), iter([]), embedder, "Flat", "Flat", progress=False)
    retriever = load_retriever(root / "kb", embedder, modalities=MODALITIES)
    torch.manual_seed(0)
    model = LatentDiffusion(TINY, MODALITIES, text_encoder=TextEncoder(TINY.text_encoder, TINY.text_max_length)).eval()
    generator = ImageGenerator(model, {"cxr": 1, "chest_ct": 1, "brain_mri": 1, "fundus": 3, "oct": 1}, batch_size=4)
    ccfg = ClassifierConfig(image_size=32, epochs=1, batch_size=16, convnet_widths=[8, 16], resnet_widths=[8, 16], stem_patch=2,
                            benchmark_per_finding=0, augment=False)
    classifier, _ = fit_classifier(ccfg, "reward", "cxr", phantom_benchmark_rows("cxr", 2, 32, seed=3), progress=False)
    verifier = FailFirst(FindingScorer({"cxr": classifier}, "reward"))
    runs = root / "runs"
    runs.mkdir()
    cfg = load_config("tiny", {"agents.out": str(runs / "generate"), "agents.candidates": 2, "agents.steps": 2,
                               "agents.traces": str(runs / "traces.sqlite")})
    saver = open_checkpointer(runs / "traces.sqlite")
    reasoner = RuleReasoner(retriever)
    agent = Agent(cfg, build_graph(reasoner, generator, verifier, saver, cfg.agents), reasoner, generator, verifier, saver)
    yield agent
    agent.close()


@pytest.fixture(scope="module")
def served(tiny_agent, tmp_path_factory):
    """The dashboard on a free local port over the tiny agent's folders; a secret file and a symlink out beside them."""
    runs = Path(tiny_agent.cfg.agents.traces).parent
    data_dir = tmp_path_factory.mktemp("data")
    secret = tmp_path_factory.mktemp("secret")
    (secret / "key.png").write_bytes(b"\x89PNG\r\n\x1a\nsecret")
    os.symlink(secret / "key.png", runs / "escape.png")
    from PIL import Image

    Image.new("L", (8, 8), 200).save(runs / "inside.png")
    (runs / "notes.txt").write_text("secret notes")  # inside the runs folder, but not an image: Gradio alone would serve it
    settings = DashboardSettings(runs_dir=runs, traces=runs / "traces.sqlite", ratings=runs / "ratings.csv", data_dirs=[data_dir],
                                 outputs=runs / "generate", profile="tiny")
    built = {}
    app = build_app(settings, agent_factory=lambda profile, lora: built.setdefault("agent", tiny_agent))
    port = free_port()
    launch(app, settings, "127.0.0.1", port, block=False, quiet=True)
    yield {"url": f"http://127.0.0.1:{port}/", "settings": settings, "secret": secret, "port": port}
    app.close()


def test_generate_streams_each_stage_as_it_finishes(served):
    client = gradio_client.Client(served["url"], verbose=False)
    job = client.submit("Large left pleural effusion. No pneumothorax.", "cxr", "tiny", "", 3, 2, 4.0, 2, api_name="/generate")
    updates = list(job)  # every yielded tuple, in order
    assert job.status().success
    progress = [u[0] for u in updates]
    # stage by stage: the parse shows up before the report exists, the report before any image
    first_parsed = next(i for i, p in enumerate(progress) if "`parse_request`" in p)
    first_report = next(i for i, u in enumerate(updates) if u[5])
    first_candidates = next(i for i, u in enumerate(updates) if u[8])
    assert first_parsed < first_report < first_candidates < len(updates) - 1
    assert not updates[first_parsed][5] and "`compose_prompt`" not in progress[first_parsed]
    final = updates[-1]
    message, image, trace_id, findings, hits, report, prompt, negative, gallery, verdicts = final
    assert "`finish`" in message and "`refine`" in message  # the verifier failed round 0, so it refined
    findings_rows = {row[0]: row for row in findings["data"]}
    assert findings_rows["pleural_effusion"][1] == "present" and findings_rows["pneumothorax"][1] == "absent"
    assert {row[0] for row in hits["data"]} >= {"localize_anatomy", "assess_pathology"}
    assert all(isinstance(row[3], float) for row in hits["data"]) and any(row[8] for row in hits["data"])
    assert "pleural effusion" in prompt.lower() and "pneumothorax" in negative.lower() and "Findings" in report
    assert {row[0] for row in verdicts["data"]} == {0, 1} and len(gallery) == 4  # two rounds of two candidates
    assert image and Path(image).is_file() and trace_id
    from agents.traces import show_trace

    trace = show_trace(served["settings"].traces, trace_id)  # the same trace `synthmed trace show` reads
    assert len(trace["verdicts"]) == 2 and trace["composition"]["prompt"] == prompt

    listed = client.predict("cxr", "", "effusion", api_name="/traces")
    assert trace_id in [row[0] for row in listed[1]["data"]]
    opened = client.predict(trace_id, api_name="/trace")
    assert trace_id in opened[0] and "round 0: fail" in opened[3] and len(opened[1]) == 4


def test_generate_with_reward_guidance_says_what_guided_and_what_judged(served):
    client = gradio_client.Client(served["url"], verbose=False)
    out = client.predict("Large left pleural effusion.", "cxr", "tiny", "", 5, 2, 4.0, 1, 0.3, api_name="/generate")
    message, trace_id = out[0], out[2]
    # this app's verifier judges with the reward's own classifier (agents.verifier.role: reward), and the page says so
    assert "reward-guided (scale 0.3)" in message and "not independent evidence" in message
    from agents.traces import show_trace

    trace = show_trace(served["settings"].traces, trace_id)
    assert trace["settings"]["reward_guidance"] == 0.3 and all(c["reward_guidance"] == 0.3 for c in trace["candidates"])


def test_generate_with_an_empty_request_says_so(served):
    client = gradio_client.Client(served["url"], verbose=False)
    out = client.predict("", "cxr", "tiny", "", 0, 0, 0, 1, api_name="/generate")
    assert "Write a request first" in out[0]


def test_rate_appends_to_the_ratings_csv_that_the_selector_reads(served):
    from rlhf.config import SelectorConfig
    from rlhf.selector import read_ratings

    settings = served["settings"]
    client = gradio_client.Client(served["url"], verbose=False)
    if not any(settings.outputs.rglob("*.png")):  # run alone: draw something to rate first
        client.predict("Large left pleural effusion.", "cxr", "tiny", "", 3, 2, 4.0, 1, api_name="/generate")
    loaded = client.predict("folder", str(settings.outputs), "", 0, True, False, api_name="/rate_load")
    assert "image(s) to rate" in loaded[0] and loaded[1] and "of" in loaded[2] and "generated" not in loaded[2]  # blinded
    assert "pleural effusion" in loaded[3].lower() and loaded[4]["value"] == "cxr"  # prompt and modality from the image's trace
    first = client.predict(4, "cxr", "senior", "sharp enough", api_name="/rate")
    assert "saved: 4/5" in first[0]
    with pytest.raises(gradio_client.exceptions.AppError, match="not in the list of choices"):  # the radio's 1-5 hold on the API too
        client.predict(9, "cxr", "senior", "", api_name="/rate")
    assert "Choose a rating" in client.predict(None, "cxr", "senior", "", api_name="/rate")[0]
    client.predict(2, "cxr", "junior", "", api_name="/rate")
    table = read_ratings(settings.ratings, SelectorConfig())
    assert table.ratings.tolist() == [4.0, 2.0] and table.levels == ["senior", "junior"] and table.modalities == ["cxr", "cxr"]
    assert all(Path(p).is_file() and Path(p).is_relative_to(settings.outputs.resolve()) for p in table.paths)
    escape = client.predict("folder", "/etc", "", 0, True, False, api_name="/rate_load")
    assert "outside the folders" in escape[0]


def test_runs_and_a_missing_trace_show_messages_and_the_app_keeps_serving(served):
    client = gradio_client.Client(served["url"], verbose=False)
    assert "no trace 'nope'" in client.predict("nope", api_name="/trace")[0]
    assert "not a run id" in client.predict("../secret", api_name="/run")[0]
    assert "no run 'absent'" in client.predict("absent", api_name="/run")[0]
    assert "Write a request first" in client.predict("", "cxr", "tiny", "", 0, 0, 0, 1, api_name="/generate")[0]  # still serving


def _get(url: str, path: str, **kw) -> httpx.Response:
    # raw path: httpx must not normalise the ../ away before the server sees it
    return httpx.get(url.rstrip("/") + path, follow_redirects=False, timeout=10, **kw)


def test_path_escape_requests_to_the_file_route_get_no_file(served):
    url, settings, secret = served["url"], served["settings"], served["secret"]
    runs = settings.runs_dir.resolve()
    ok = _get(url, f"/gradio_api/file={runs / 'inside.png'}")
    assert ok.status_code == 200 and ok.content.startswith(b"\x89PNG")  # the route works, so the refusals below mean something
    attacks = [
        "/etc/passwd", str(secret / "key.png"), f"{runs}/../{secret.name}/key.png", f"{runs}/escape.png",
        str(settings.traces.resolve()), str(settings.ratings.resolve()), str(runs / "traces.sqlite-wal"),
        urllib.parse.quote(f"{runs}/../{secret.name}/key.png", safe=""), f"{runs}/%2e%2e/{secret.name}/key.png",
        f"{runs}/%252e%252e/{secret.name}/key.png", urllib.parse.quote("/etc/passwd", safe=""), "../../../../etc/passwd",
        str(Path.cwd() / "README.md"), str(Path.cwd() / "pyproject.toml"), str(runs / "notes.txt"),
    ]
    (settings.ratings).parent.mkdir(parents=True, exist_ok=True)
    if not settings.ratings.exists():
        settings.ratings.write_text("image_path,rating,modality,expert_level,prompt\n")
    for prefix in ("/gradio_api/file=", "/file="):
        for attack in attacks:
            response = _get(url, prefix + attack)
            assert response.status_code in (400, 403, 404, 405), (prefix + attack, response.status_code)
            assert b"secret" not in response.content and b"root:" not in response.content and b"SQLite" not in response.content
            assert b"image_path,rating" not in response.content


def test_auth_protects_pages_api_and_files(tiny_agent, tmp_path):
    settings = DashboardSettings(runs_dir=tmp_path, traces=tmp_path / "traces.sqlite", ratings=tmp_path / "ratings.csv")
    from PIL import Image

    Image.new("L", (8, 8), 10).save(tmp_path / "a.png")
    app = build_app(settings, agent_factory=lambda profile, lora: tiny_agent)
    port = free_port()
    launch(app, settings, "127.0.0.1", port, auth=("ada", "lovelace"), block=False, quiet=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert _get(url, "/config").status_code == 401
        assert _get(url, f"/gradio_api/file={tmp_path / 'a.png'}").status_code in (401, 403)
        assert _get(url, "/gradio_api/info").status_code == 401
        with pytest.raises(gradio_client.exceptions.AuthenticationError, match="credentials were not provided"):
            gradio_client.Client(url + "/", verbose=False)
        client = gradio_client.Client(url + "/", auth=("ada", "lovelace"), verbose=False)
        assert "no trace" in client.predict("nope", api_name="/trace")[0]
        with httpx.Client(base_url=url) as session:
            assert session.post("/login", data={"username": "ada", "password": "lovelace"}).status_code in (200, 302, 303)
            assert session.get("/config").status_code == 200
    finally:
        app.close()


def test_command_refuses_open_host_without_auth_and_a_taken_port(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    common = ["--runs", str(tmp_path / "runs"), f"--agents.out={tmp_path / 'gen'}", f"--agents.traces={tmp_path / 't.sqlite'}"]
    assert main(["dashboard", "--host", "0.0.0.0", *common]) == 2
    assert "--auth USER:PASS" in capsys.readouterr().err
    assert main(["dashboard", "--auth", "nocolon", *common]) == 2
    assert "USER:PASS" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["dashboard", "--port", str(port), *common]) == 2
    assert f"port {port} on 127.0.0.1 is taken" in capsys.readouterr().err


def test_bench_times_every_page(tmp_path):
    from pipelines.dashboard.bench import _write_manifest, _write_run, time_pages

    _write_run(tmp_path / "runs" / "r", epochs=12, per_epoch=4)
    _write_manifest(tmp_path / "data" / "set", rows=6)
    settings = DashboardSettings(runs_dir=tmp_path / "runs", traces=tmp_path / "runs" / "traces.sqlite",
                                 ratings=tmp_path / "ratings.csv", data_dirs=[tmp_path / "data"])
    times = time_pages(settings)
    assert set(times) == {"Generate", "Traces", "Traces: open the newest trace", "Runs (the newest run opened)",
                          "Data (the first manifest shown)", "Rate"}
    assert all(0 <= t["first_s"] < 30 and 0 <= t["again_s"] < 30 for t in times.values())
    from pipelines.dashboard import data

    assert data.open_run("r", tmp_path / "runs")["epochs_done"] == 12 and len(data.samples_table(tmp_path / "runs" / "r")[1]) == 4


def test_the_runs_page_fills_from_the_top_in_one_event(tmp_path):
    """Opening Runs is one event whose updates come top first: the pickers, summary, reward and held-out plots and grids;
    then the FD and per-modality plots; then the last epoch's samples table."""
    import pandas as pd

    from pipelines.dashboard.bench import _write_run

    _write_run(tmp_path / "runs" / "r", epochs=12, per_epoch=4)
    settings = DashboardSettings(runs_dir=tmp_path / "runs", traces=tmp_path / "runs" / "traces.sqlite",
                                 ratings=tmp_path / "ratings.csv", data_dirs=[tmp_path])
    app = build_app(settings)
    top, plots, table = app.synthmed_page_openers["Runs (the newest run opened)"]()
    n = len(top)
    assert "1 run(s)" in top[0] and "status" in top[4] and isinstance(top[5], pd.DataFrame) and len(top[5])
    skipped = [i for i, v in enumerate(top) if isinstance(v, dict) and v.get("__type__") == "update" and len(v) == 1]
    assert skipped == [n - 4, n - 3, n - 2, n - 1]  # the second row of plots, the untouched readings and the table come later
    assert isinstance(plots[n - 4], pd.DataFrame) and set(plots[n - 4]["series"]) == {"fd"} and len(plots[n - 3])
    assert plots[n - 2] is None  # no untouched reading: the run has no test prompts
    assert isinstance(table[n - 1], pd.DataFrame) and len(table[n - 1]) == 4  # the last epoch's four samples


def test_the_runs_page_tabulates_untouched_readings_and_generate_offers_every_kept_adapter(tmp_path):
    """A run's test prompts (its own test lines, then `synthmed runs test`'s test.json with every adapter it keeps) and
    its further splits, each adapter against its reading's base; Generate offers steered/ (with its gamma), scaled/,
    best/ and final/."""
    from test_runs import epoch_line, eval_line, step_lines, write_run

    from pipelines.dashboard import data
    from pipelines.dashboard.app import _lora_choices

    def test_line(adapter: str, shown: float, fd: float, **extra) -> dict:
        overall = {"all_requested_shown": shown, "fd": fd, "ms_ssim": 0.3}
        return {"kind": "test", "adapter": adapter, "epoch": 0 if adapter == "base" else 1, "overall": overall,
                "per_modality": {"cxr": overall, "oct": overall}, **extra}

    lines = [eval_line(0, 0.1, 50.0, True), test_line("base", 0.1, 50.0), *step_lines(1), epoch_line(1),
             eval_line(1, 0.2, 48.0, True), test_line("best", 0.2, 52.0), test_line("final", 0.15, 60.0)]
    run = write_run(tmp_path, "improve-20250107-090000", lines, "2025-01-07T09:00:00", status="finished")
    header, rows = data.untouched_table(data.open_run(run.name, tmp_path))
    assert header[:4] == ["reading", "adapter", "all shown ↑", "points"] and header[-1] == "FD, MS-SSIM within the gain's terms"
    assert [r[1] for r in rows] == ["base (epoch 0)", "best (epoch 1)", "final (epoch 1)"] and {r[0] for r in rows} == {"test prompts"}
    assert rows[1][3] == "+10.0" and rows[1][6] == "52.000 (+4%)" and rows[1][-1] == "yes"
    assert rows[2][-1].startswith("no: FD 60.00 more than 10% worse")
    # `runs test` judged the steered policy too (test.json), and a split
    steered = test_line("steered", 0.4, 51.0, gamma=1.25, steers="none", table_epoch=1)
    (run / "test.json").write_text(json.dumps({"prompts": 2, "images_per_prompt": 2, "results": [
        {k: v for k, v in r.items() if k != "kind"} for r in (lines[1], lines[-2], lines[-1], steered)]}))
    (run / "test_split1.json").write_text(json.dumps({"prompts": 4, "images_per_prompt": 2, "results": [
        {k: v for k, v in r.items() if k != "kind"} for r in (test_line("base", 0.2, 40.0), {**steered, "epoch": 1})]}))
    header, rows = data.untouched_table(data.open_run(run.name, tmp_path))
    assert [(r[0], r[1]) for r in rows] == [
        ("test prompts", "base (epoch 0)"), ("test prompts", "best (epoch 1)"), ("test prompts", "final (epoch 1)"),
        ("test prompts", "steered: base + table x1.25 (table of epoch 1)"),
        ("split 1", "base (epoch 0)"), ("split 1", "steered: base + table x1.25 (table of epoch 1)")]
    assert rows[3][3] == "+30.0" and rows[5][3] == "+20.0" and rows[5][6] == "51.000 (+27%)"
    # Generate's adapters: what the run keeps, steered/ first with its gamma
    from generator.steering import OffsetTable, save_steering

    save_steering(run / "steered", OffsetTable(["cxr|_bias"], [999], torch.zeros(1, 1, 1)), 1.25)
    for name in ("best", "final", "scaled"):
        (run / name).mkdir()
    labels = [label for label, _ in _lora_choices(tmp_path)]
    assert labels == ["none", f"{run.name}/steered (table x1.25)", f"{run.name}/scaled", f"{run.name}/best", f"{run.name}/final"]
    save_steering(run / "steered", OffsetTable(["cxr|_bias"], [999], torch.zeros(1, 1, 1)), 1.25, gammas={"cxr": 0.0})
    assert _lora_choices(tmp_path)[1][0] == f"{run.name}/steered (table a gamma per modality)"


def test_the_plotting_library_is_warmed_on_load():
    from pipelines.dashboard.app import plot_library_warmup

    script = plot_library_warmup()  # None would mean this Gradio build no longer ships one plotting bundle: look again
    assert script is not None and "import(url)" in script and "requestIdleCallback" in script
    assert (Path(gr.__file__).parent / "templates" / "frontend" / "assets" / json.loads(script.split("new URL(", 1)[1].split(",")[0])).is_file()


def test_the_run_summary_says_how_many_requested_findings_no_image_shows(tmp_path):
    from test_runs import MODALITIES as RUN_MODALITIES
    from test_runs import epoch_line, eval_line, step_lines, write_run

    from pipelines.dashboard import data
    from pipelines.dashboard.app import _run_summary

    def with_findings(line: dict, shown: float) -> dict:
        for row in line["per_modality"].values():
            row["requested_shown_by_finding"] = {"effusion": {"asked": 2, "shown": shown}, "oedema": {"asked": 2, "shown": 0.0}}
        return line

    lines = [with_findings(eval_line(0, 0.4, 50.0, True), 0.0), *step_lines(1), epoch_line(1),
             with_findings(eval_line(1, 0.5, 48.0, True), 0.5)]
    write_run(tmp_path, "improve-20250107-090000", lines, "2025-01-07T09:00:00")
    text = _run_summary(data.open_run("improve-20250107-090000", tmp_path))
    assert len(RUN_MODALITIES) == 2
    assert ("- never shown, of 4 requested findings: 4 at the base, 2 at epoch 1, on the held-out prompts "
            "(each one: `synthmed runs show improve-20250107-090000`)") in text
