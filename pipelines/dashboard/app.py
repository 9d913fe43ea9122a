"""The dashboard's Gradio Blocks: Generate, Traces, Runs, Data, Rate, Enhance.

Every page only calls ``pipelines.dashboard.data`` / ``.streaming`` / ``.enhance``; expected failures
(a missing or damaged run, trace or manifest, a refused path, a bad rating) become a message on the
page, and the app keeps serving. Files reach the browser only through Gradio's file route, which
``FileRouteGuard`` narrows to the folders the app was given (and Gradio's own cache), never the traces
database or the ratings CSV; ``launch`` passes the same folders as ``allowed_paths`` and the private
files as ``blocked_paths``.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr
import numpy as np
import pandas as pd
from PIL import Image

from generator.config import default_modalities

from ..runs import never_shown_text
from . import data
from .data import FileGuard, PathRefused
from .enhance import PRESETS, enhance

EXPECTED = (ValueError, OSError, LookupError, sqlite3.Error)  # shown on the page; anything else is a bug and raises
TRACE_COLUMNS = ["trace_id", "started", "modality", "status", "rounds", "steps", "text"]
STATUSES = ["", "passed", "failed", "refused", "composed", "running"]


@dataclass
class DashboardSettings:
    """What the app serves. ``data_dirs``: folders of manifests and images (Data and Rate pages);
    ``outputs``: where the Generate page's images are written (agents.out); ``profile``: the config
    profile requests use unless the page names another."""

    runs_dir: Path
    traces: Path
    ratings: Path
    data_dirs: list[Path] = field(default_factory=list)
    outputs: Path | None = None
    profile: str | None = None
    modalities: list[str] = field(default_factory=lambda: list(default_modalities()))  # the dashboard command passes data.modalities
    expert_levels: list[str] = field(default_factory=lambda: ["junior", "senior", "expert"])
    refresh_s: float = 5.0  # how often the Runs page re-reads a running run when asked to

    def __post_init__(self) -> None:
        # absolute from here on: pages, the file guard and Gradio's allowed_paths all see the same paths
        self.runs_dir, self.traces, self.ratings = (Path(os.path.abspath(p)) for p in (self.runs_dir, self.traces, self.ratings))
        self.data_dirs = [Path(os.path.abspath(p)) for p in self.data_dirs]
        self.outputs = Path(os.path.abspath(self.outputs)) if self.outputs else None

    def guard(self) -> FileGuard:
        return FileGuard(self.roots(), denied=[self.traces, self.ratings])

    def roots(self) -> list[Path]:
        return [Path(r) for r in [self.runs_dir, *self.data_dirs] + ([self.outputs] if self.outputs else [])]


class AgentCache:
    """Agents built on first use, one per (profile, LoRA adapter); ``factory(profile, lora)`` builds one."""

    def __init__(self, factory: Callable[[str | None, str | None], Any]):
        self.factory = factory
        self._agents: dict[tuple, Any] = {}

    def get(self, profile: str | None, lora: str | None):
        key = (profile or None, lora or None)
        if key not in self._agents:
            self._agents[key] = self.factory(*key)
        return self._agents[key]


def default_agent_factory(traces: Path, overrides: dict[str, Any] | None = None) -> Callable[[str | None, str | None], Any]:
    """Agents as ``synthmed generate`` builds them: the profile, the command line's dotted overrides, the LoRA adapter."""

    def build(profile: str | None, lora: str | None):
        from pipelines.agent import build_agent
        from pipelines.config import load_config

        cfg = load_config(profile, {**(overrides or {}), **({"sample.lora": [lora]} if lora else {})})
        return build_agent(cfg, traces=str(traces), progress=False)

    return build


# -- plots ------------------------------------------------------------------------------------
SERIES_COLUMNS = ["x", "value", "series"]


PLOT_POINTS = 60  # a line of more points is drawn thinned to this many (data.thin_points): each point is an SVG node of the hover layer, and 60 opened the Runs page of a 200-epoch run ~0.35 s sooner than 100


def series_frame(series: dict[str, list], skip: Sequence[str] = (), only: Sequence[str] | None = None) -> pd.DataFrame:
    """Series ``{name: [(x, y), ...]}`` as the long table a ``gr.LinePlot`` draws, one line per name, each of at
    most :data:`PLOT_POINTS` points (the run's logs and tables keep every value)."""
    rows = [(x, y, name) for name, points in series.items() if name not in skip and (not only or name in only)
            for x, y in data.thin_points(points, PLOT_POINTS)]
    return pd.DataFrame(rows, columns=SERIES_COLUMNS)


def line_plot(label: str, x_title: str = "epoch", elem_id: str | None = None) -> gr.LinePlot:
    """An interactive line chart (Vega-Lite: hover shows the values, drag zooms) of a ``series_frame``."""
    return gr.LinePlot(x="x", y="value", color="series", label=label, x_title=x_title, y_title="", tooltip=SERIES_COLUMNS,
                       elem_id=elem_id)


def _table(rows: list[list], header: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=header)


def _error(exc: BaseException) -> str:
    return f"**Cannot show this:** {exc}"


# -- the app ----------------------------------------------------------------------------------
def build_app(settings: DashboardSettings, agent_factory: Callable[[str | None, str | None], Any] | None = None,
              overrides: dict[str, Any] | None = None) -> gr.Blocks:
    """The app over ``settings``; ``agent_factory(profile, lora)`` builds the Generate page's agent (default: the
    configured one, with the dotted ``overrides`` of the command line)."""
    guard = settings.guard()
    agents = AgentCache(agent_factory or default_agent_factory(settings.traces, overrides))
    trace_index = data.TraceIndex(settings.traces)
    modalities = settings.modalities

    with gr.Blocks(title="synthmed dashboard", analytics_enabled=False) as app:
        gr.Markdown("# synthmed dashboard")
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_page(settings, agents, guard, modalities)
            with gr.Tab("Traces", id="traces") as traces_tab:
                traces_open = _traces_page(settings, trace_index, guard, modalities)
            with gr.Tab("Runs", id="runs") as runs_tab:
                runs_open = _runs_page(settings, guard)
            with gr.Tab("Data", id="data") as data_tab:
                data_open = _data_page(settings, guard, modalities)
            with gr.Tab("Rate", id="rate") as rate_tab:
                rate_open = _rate_page(settings, guard, modalities)
            with gr.Tab("Enhance", id="enhance"):
                _enhance_page(guard)
        for tab, page in ((traces_tab, traces_open), (runs_tab, runs_open), (data_tab, data_open), (rate_tab, rate_open)):
            tab.select(page["open"], page.get("inputs"), page["outputs"], api_visibility="private")
    # what opening each page runs, for `synthmed dashboard --bench` (the Generate page does its work while the app is built)
    app.synthmed_page_openers = {"Generate": lambda: _lora_choices(settings.runs_dir),
                                 **{name: fn for page in (traces_open, runs_open, data_open, rate_open) for name, fn in page["bench"].items()}}
    return app


# -- Generate ---------------------------------------------------------------------------------
def _lora_choices(runs_dir: Path) -> list[tuple[str, str]]:
    """The adapters a request can draw with: each run's steered/ (its table at the kept gamma: a table-stage run's best
    policy), scaled/, best/ and final/, where it has them."""
    from generator.steering import STEERING_FILE

    choices = [("none", "")]
    for r in data.list_all_runs(runs_dir):
        for name in ("steered", "scaled", "best", "final"):
            folder = Path(r["path"]) / name
            if name == "steered" and (folder / STEERING_FILE).is_file():
                try:
                    info = json.loads((folder / STEERING_FILE).read_text())
                    gamma, split = info.get("gamma"), info.get("gammas")
                except (OSError, ValueError, AttributeError):
                    continue  # a damaged steering: `synthmed runs steer` rewrites it
                by = "a gamma per modality" if split else f"x{gamma:g}" if isinstance(gamma, (int, float)) else None
                choices.append((f"{r['id']}/steered (table {by})" if by else f"{r['id']}/steered", str(folder)))
            elif name != "steered" and folder.is_dir():
                choices.append((f"{r['id']}/{name}", str(folder)))
    return choices


def _generate_page(settings: DashboardSettings, agents: AgentCache, guard: FileGuard, modalities: list[str]) -> None:
    with gr.Row():
        with gr.Column(scale=2):
            text = gr.Textbox(label="request", lines=2, placeholder="large left pleural effusion, no pneumothorax", elem_id="gen-text")
            with gr.Row():
                modality = gr.Dropdown(modalities, value=modalities[0], label="modality", allow_custom_value=True, elem_id="gen-modality")
                profile = gr.Textbox(label="profile", value=settings.profile or "", placeholder="tiny")
                lora = gr.Dropdown(_lora_choices(settings.runs_dir), value="", label="LoRA adapter")
            with gr.Row():
                seed = gr.Number(label="seed", value=0, precision=0)
                steps = gr.Number(label="steps (0: profile's)", value=0, precision=0)
                guidance = gr.Number(label="guidance (0: profile's)", value=0)
                rounds = gr.Number(label="rounds", value=2, precision=0)
                reward = gr.Number(label="reward guidance (0: off; 0.1 measured)", value=0, minimum=0, elem_id="gen-reward-guidance")
            go_button = gr.Button("Generate", variant="primary", elem_id="gen-go")
        with gr.Column(scale=1):
            final = gr.Image(label="final image", type="filepath", interactive=False, elem_id="gen-final")
            trace_id = gr.Textbox(label="trace id", interactive=False, elem_id="gen-trace")
    progress = gr.Markdown(elem_id="gen-progress")
    findings = gr.Dataframe(headers=["finding", "stated", "laterality", "severity", "location", "hedged", "codes"], label="parsed findings",
                            interactive=False, wrap=True)
    hits = gr.Dataframe(headers=data.RETRIEVAL_COLUMNS, label="retrieval hits per stage", interactive=False, wrap=True, max_height=360)
    with gr.Row():
        report = gr.Textbox(label="report", lines=8, interactive=False)
        with gr.Column():
            prompt = gr.Textbox(label="prompt", lines=3, interactive=False)
            negative = gr.Textbox(label="negative", lines=2, interactive=False)
    candidates = gr.Gallery(label="candidates, round by round", columns=6, height=220, elem_id="gen-candidates")
    verdicts = gr.Dataframe(headers=["round", "image", "passed", "score", "checks", "quality"], label="verifier's verdicts",
                            interactive=False, wrap=True)

    def run(text_value, modality_value, profile_value, lora_value, seed_value, steps_value, guidance_value, rounds_value,
            reward_value=0):
        from .streaming import (
            CANDIDATE_COLUMNS,
            FINDING_COLUMNS,
            candidate_images,
            candidate_rows,
            composition_texts,
            final_image,
            finding_rows,
            progress_markdown,
            stream_request,
        )

        empty = (None, "", _table([], FINDING_COLUMNS), _table([], data.RETRIEVAL_COLUMNS), "", "", "", [], _table([], CANDIDATE_COLUMNS))
        if not (text_value or "").strip():
            yield ("**Write a request first.**", *empty)
            return
        try:
            lora_path = str(guard.check(lora_value)) if lora_value else None
            yield ("building the agent (first request of a profile only) ...", *empty)
            agent = agents.get(profile_value or settings.profile, lora_path)
            overrides = {"seed": int(seed_value) if seed_value is not None else None,
                         "steps": int(steps_value) if steps_value else None, "guidance": float(guidance_value) if guidance_value else None,
                         "max_rounds": int(rounds_value) if rounds_value else None,
                         "reward_guidance": max(0.0, float(reward_value or 0))}  # the reward's classifier guides; the page says so
            for _nodes, state in stream_request(agent, text_value, modality_value, **overrides):
                report_text, prompt_text, negative_text = composition_texts(state)
                image = final_image(state)
                # the graph writes paths relative to this process's folder
                gallery = [(str(guard.image(os.path.abspath(p))), caption) for p, caption in candidate_images(state)]
                yield (progress_markdown(state), str(guard.image(os.path.abspath(image))) if image else None, state["settings"]["trace_id"],
                       _table(finding_rows(state), FINDING_COLUMNS),
                       _table(data.retrieval_rows(state.get("retrievals") or []), data.RETRIEVAL_COLUMNS),
                       report_text, prompt_text, negative_text, gallery, _table(candidate_rows(state), CANDIDATE_COLUMNS))
        except EXPECTED as exc:
            yield (_error(exc), *[gr.skip()] * 9)

    # one request at a time through the (not thread-safe) models; the other pages stay responsive meanwhile
    go_button.click(run, [text, modality, profile, lora, seed, steps, guidance, rounds, reward],
                    [progress, final, trace_id, findings, hits, report, prompt, negative, candidates, verdicts], api_name="generate",
                    concurrency_limit=1, concurrency_id="agent")


# -- Traces -----------------------------------------------------------------------------------
def _traces_page(settings: DashboardSettings, index: data.TraceIndex, guard: FileGuard, modalities: list[str]):
    message = gr.Markdown(elem_id="traces-message")
    with gr.Row():
        modality = gr.Dropdown(["", *modalities], value="", label="modality")
        status = gr.Dropdown(STATUSES, value="", label="status")
        text = gr.Textbox(label="text or id contains")
        refresh = gr.Button("Filter / refresh", elem_id="traces-refresh")
    table = gr.Dataframe(headers=TRACE_COLUMNS, label="traces (newest first; click a row to open it)", interactive=False,
                         max_height=360, elem_id="traces-table")
    with gr.Row():
        chosen = gr.Textbox(label="trace id", elem_id="traces-id")
        open_button = gr.Button("Open", elem_id="traces-open")
    summary = gr.Markdown(elem_id="traces-summary")
    images = gr.Gallery(label="candidates", columns=6, height=220, elem_id="traces-images")
    hits = gr.Dataframe(headers=data.RETRIEVAL_COLUMNS, label="retrieval hits", interactive=False, wrap=True, max_height=360)
    text_view = gr.Textbox(label="as `synthmed trace show` prints it", lines=24, max_lines=400, interactive=False, elem_id="traces-text")
    with gr.Accordion("the whole trace (JSON)", open=False):
        raw = gr.JSON()

    def listing(modality_value="", status_value="", text_value=""):
        try:
            rows = data.filter_traces(index.rows(), modality_value or None, status_value or None, text_value)
        except EXPECTED as exc:
            return _error(exc), _table([], TRACE_COLUMNS)
        note = f"{len(rows)} trace(s) in `{settings.traces}`" if settings.traces.is_file() else \
            f"no traces yet in `{settings.traces}`: ask for an image on the Generate page or with `synthmed generate`"
        return note, _table([[r.get(c) for c in TRACE_COLUMNS] for r in rows], TRACE_COLUMNS)

    def open_trace(trace_id):
        try:
            trace = data.open_trace(settings.traces, (trace_id or "").strip(), guard)
        except EXPECTED as exc:
            return _error(exc), [], _table([], data.RETRIEVAL_COLUMNS), "", None
        flat = [r for records in trace["retrievals"].values() for r in records]
        head = (f"**{trace['trace_id']}** · status **{trace['status']}** · {trace['steps']} steps · started {trace['started']}\n\n"
                f"request: _{trace['text']}_" + (f"\n\nrefused: {trace['error']}" if trace.get("error") else "")
                + "".join(f"\n\nimage not shown: {m}" for m in trace["missing_images"]))
        return head, trace["images"], _table(data.retrieval_rows(flat), data.RETRIEVAL_COLUMNS), trace["text_view"], \
            json.loads(json.dumps({k: v for k, v in trace.items() if k not in ("text_view", "images")}, default=str))

    def pick(evt: gr.SelectData, frame):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        trace_id = frame.iloc[row]["trace_id"] if hasattr(frame, "iloc") else frame[row][0]
        return (trace_id, *open_trace(trace_id))

    detail = [summary, images, hits, text_view, raw]
    refresh.click(listing, [modality, status, text], [message, table], api_name="traces")
    text.submit(listing, [modality, status, text], [message, table], api_visibility="private")
    open_button.click(open_trace, [chosen], detail, api_name="trace")
    chosen.submit(open_trace, [chosen], detail, api_visibility="private")
    table.select(pick, [table], [chosen, *detail], api_visibility="private")

    def open_newest():
        listing()
        rows = index.rows()
        return open_trace(rows[0]["trace_id"]) if rows else None

    return {"open": listing, "outputs": [message, table], "bench": {"Traces": listing, "Traces: open the newest trace": open_newest}}


# -- Runs -------------------------------------------------------------------------------------
def _runs_page(settings: DashboardSettings, guard: FileGuard):
    message = gr.Markdown(elem_id="runs-message")
    with gr.Row():
        run = gr.Dropdown([], label="run", elem_id="runs-run", scale=3, allow_custom_value=True)
        auto = gr.Checkbox(label=f"refresh every {settings.refresh_s:g} s while running", value=False, elem_id="runs-auto")
        reload_button = gr.Button("Reload", elem_id="runs-reload")
    summary = gr.Markdown(elem_id="runs-summary")
    untouched = gr.Dataframe(label=f"untouched prompts: {data.UNTOUCHED_NOTE}", interactive=False, wrap=True,
                             elem_id="runs-untouched")
    with gr.Row():
        reward_plot = line_plot("reward per component (mean per epoch)", elem_id="runs-reward")
        heldout_plot = line_plot("held-out metrics (evaluator)", elem_id="runs-heldout")
    with gr.Row():
        fd_plot = line_plot("held-out FD (evaluator features) ↓", elem_id="runs-fd")
        modality_plot = line_plot("total reward per modality", elem_id="runs-modality")
    with gr.Row():
        grid_epoch = gr.Slider(0, 1, step=1, value=0, label="grid of epoch", elem_id="runs-epoch")
        grid = gr.Image(label="rollouts of this epoch", interactive=False, elem_id="runs-grid")
        heldout_grid = gr.Image(label="held-out images (nearest evaluated epoch at or before)", interactive=False)
    with gr.Row():
        samples_epoch = gr.Dropdown([], label="samples of epoch")
    samples = gr.Dataframe(headers=data.SAMPLE_COLUMNS, label="samples (prompt, rewards, advantage, selected)", interactive=False,
                           wrap=True, max_height=400, elem_id="runs-samples")
    with gr.Accordion("Compare two runs", open=False, elem_id="runs-compare-section"):  # drawn when opened
        with gr.Row():
            first = gr.Dropdown([], label="run A", allow_custom_value=True, elem_id="runs-a")
            second = gr.Dropdown([], label="run B", allow_custom_value=True, elem_id="runs-b")
            compare_button = gr.Button("Compare", elem_id="runs-compare")
        compare_table = gr.Dataframe(label="held-out, base → best (mean of modalities)", interactive=False, wrap=True)
        with gr.Row():
            with gr.Column():
                reward_a = line_plot("A: reward")
                heldout_a = line_plot("A: held-out (FD left out)")
            with gr.Column():
                reward_b = line_plot("B: reward")
                heldout_b = line_plot("B: held-out (FD left out)")
    timer = gr.Timer(settings.refresh_s, active=False)
    grids_state = gr.State({})

    def pages():
        try:
            choices = data.run_choices(settings.runs_dir)
        except EXPECTED as exc:
            return _error(exc), gr.Dropdown(), gr.Dropdown(), gr.Dropdown()
        note = f"{len(choices)} run(s) in `{settings.runs_dir}`" if choices else f"no runs in `{settings.runs_dir}` yet: start one with `synthmed improve`"
        first_id = choices[0][1] if choices else None
        return (note, gr.Dropdown(choices=choices, value=first_id), gr.Dropdown(choices=choices, value=first_id),
                gr.Dropdown(choices=choices, value=choices[1][1] if len(choices) > 1 else first_id))

    def show(run_id):
        """The top of a run's page (summary, first row of plots, grids, the samples' epochs) and the opened run
        (None when there is none to show)."""
        blank = (None, None, gr.Slider(), None, None, gr.Dropdown(), {})
        if not run_id:
            return ("choose a run", *blank), None
        try:
            r = data.open_run(run_id, settings.runs_dir)
            epochs = data.samples_table(r["path"], limit=0)[2] if r["kind"] == "improve" else []
        except EXPECTED as exc:
            return (_error(exc), *blank), None
        text = _run_summary(r)
        if r["kind"] == "improve":
            s = r["series"]
            figs = (series_frame(s["reward"]), series_frame(s["heldout"], skip=("fd",)))
        else:  # a train or eval run: every logged number against its step
            figs = (series_frame(r["series"]["metrics"]), None)
        grids = {"rollouts": r["grids"], "heldout": r.get("heldout_grids") or []}
        epochs_with_grids = [e for e, _ in r["grids"]]
        slider = gr.Slider(minimum=min(epochs_with_grids, default=0), maximum=max(epochs_with_grids, default=1), step=1,
                           value=max(epochs_with_grids, default=0))
        last = max(epochs_with_grids, default=None)
        grid_img, held_img = _grid_for(grids, last, guard)
        return (text, *figs, slider, grid_img, held_img, gr.Dropdown(choices=epochs, value=epochs[-1] if epochs else None), grids), r

    def more_plots(r):
        """The second row of plots (FD, reward per modality) of a loop run, and its untouched readings' table."""
        if r["kind"] != "improve":
            return None, None, None
        header, rows = data.untouched_table(r)
        return (series_frame(r["series"]["heldout"], only=("fd",)), series_frame(r["series"]["per_modality"]),
                _table(rows, header) if rows else None)

    def show_all(run_id):
        """A run's page, from the top, in one event: the top first, then the FD and per-modality plots and the
        untouched readings, then the samples table of the last epoch, each sent as soon as it is ready (the browser
        draws the top meanwhile)."""
        top, r = show(run_id)
        yield (*top, *[gr.skip()] * len(rest))
        if r is None:
            return
        yield (*[gr.skip()] * len(outputs), *more_plots(r), gr.skip())
        yield (*[gr.skip()] * (len(outputs) + 3), samples_of(run_id, getattr(top[6], "value", None)))  # the epoch it shows

    def samples_of(run_id, epoch):
        """The samples table of the run's epoch (its last when none is chosen)."""
        try:
            header, rows, _ = data.samples_table(data.run_folder(run_id, settings.runs_dir), int(epoch) if epoch is not None else None)
        except (*EXPECTED, TypeError, ValueError):
            return _table([], data.SAMPLE_COLUMNS)
        return _table(rows, header)

    def grid_of(grids, epoch):
        return _grid_for(grids or {}, int(epoch) if epoch is not None else None, guard)

    def compare(a, b):
        if not a or not b:
            return "choose two runs", None, None, None, None, None
        try:
            both = data.compare_runs(a, b, settings.runs_dir)
        except EXPECTED as exc:
            return _error(exc), None, None, None, None, None
        frame = pd.DataFrame(both["table"]).set_index("id").T.reset_index().rename(columns={"index": "metric"})
        figs = []
        for r in both["runs"]:
            s = r["series"]
            figs += [series_frame(s.get("reward", s.get("metrics", {}))), series_frame(s.get("heldout", {}), skip=("fd",))]
        return f"comparing `{a}` and `{b}`", frame, *figs

    def tick(run_id):
        try:
            status = data.open_run(run_id, settings.runs_dir)["status"] if run_id else None
        except EXPECTED:
            status = None
        if status not in ("running", "unknown"):
            yield (gr.skip(),) * (len(outputs) + len(rest))
            return
        yield from show_all(run_id)

    outputs = [summary, reward_plot, heldout_plot, grid_epoch, grid, heldout_grid, samples_epoch, grids_state]
    rest = [fd_plot, modality_plot, untouched, samples]  # what show_all sends after the top, in this order
    # .input, not .change: a value set by the app itself (opening the page) must not ask the server a second time
    run.input(show_all, [run], outputs + rest, api_name="run")
    reload_button.click(show_all, [run], outputs + rest, api_visibility="private")
    samples_epoch.input(samples_of, [run, samples_epoch], [samples], api_visibility="private")
    grid_epoch.release(grid_of, [grids_state, grid_epoch], [grid, heldout_grid], api_visibility="private")
    compare_button.click(compare, [first, second], [message, compare_table, reward_a, heldout_a, reward_b, heldout_b], api_name="compare")
    auto.change(lambda on: gr.Timer(active=bool(on)), [auto], [timer], api_visibility="private")
    timer.tick(tick, [run], outputs + rest, api_visibility="private")

    def open_page(current=None):
        """Selecting the tab: the pickers filled and the chosen run (else the newest) shown, in one event that
        fills the page from the top (see show_all)."""
        note, run_dd, a_dd, b_dd = pages()
        ids = [value for _, value in (run_dd.choices or [])] if isinstance(run_dd, gr.Dropdown) else []
        chosen = current if current in ids else (ids[0] if ids else None)
        head = (note, gr.Dropdown(choices=run_dd.choices, value=chosen) if ids else run_dd, a_dd, b_dd)
        if not chosen:
            yield (*head, "", *[gr.skip()] * (len(outputs) + len(rest) - 1))
            return
        for i, part in enumerate(show_all(chosen)):
            yield (*(head if i == 0 else [gr.skip()] * len(head)), *part)

    return {"open": open_page, "inputs": [run], "outputs": [message, run, first, second, *outputs, *rest],
            "bench": {"Runs (the newest run opened)": lambda: list(open_page())}}


def _grid_for(grids: dict, epoch: int | None, guard: FileGuard) -> tuple[str | None, str | None]:
    def nearest(items, exact: bool):
        chosen = None
        for e, path in items:
            if epoch is not None and (e == epoch if exact else e <= epoch):
                chosen = path
        return chosen

    out = []
    for key, exact in (("rollouts", True), ("heldout", False)):
        path = nearest(grids.get(key) or [], exact)
        try:
            out.append(str(guard.image(path)) if path else None)
        except PathRefused:
            out.append(None)
    return out[0], out[1]


def _run_summary(r: dict) -> str:
    if r["kind"] != "improve":
        return f"**{r['id']}** ({r['kind']}) · status {r['status']} · {r['lines']} logged lines"
    parts = [f"**{r['id']}** · status **{r['status']}** · epoch {r['epochs_done']}/{r['epochs_planned'] or '-'} · "
             f"started {r['started'] or '-'}" + (f" · finished {r['finished']}" if r.get("finished") else "")
             + (f" · best epoch {r['best_epoch']}" if r.get("best_epoch") is not None else "")]
    if r.get("policy"):
        p = r["policy"]
        parts.append(f"- its policy by held-out share: **{p['label']}**, every requested shown "
                     f"{p['heldout_all_requested_shown']:.3f} (LoRA adapter `{p['name']}` on Generate; `--lora {p['folder']}`)")
    for g in r.get("guards") or []:
        parts.append(f"- guard (epoch {g['epoch']}): {g['message']}")
    if r.get("end"):
        parts.append(f"- end (epoch {r['end']['epoch']}): {r['end']['status']}" + (f": {r['end']['message']}" if r["end"].get("message") else ""))
    t = r.get("timing") or {}
    if t.get("epochs"):
        parts.append("- seconds per epoch: " + ", ".join(f"{k} {t[k]:.1f}" for k in ("sampling", "reward", "update", "selection", "total")
                                                        if t.get(k) is not None))
    if r.get("findings"):
        parts.append(f"- {never_shown_text(r['findings'])}, on the held-out prompts (each one: `synthmed runs show {r['id']}`)")
    for w in r.get("warnings") or []:
        parts.append(f"- note: {w}")
    return "\n".join(parts)


# -- Data -------------------------------------------------------------------------------------
def _data_page(settings: DashboardSettings, guard: FileGuard, modalities: list[str]):
    message = gr.Markdown(elem_id="data-message")
    with gr.Row():
        manifest = gr.Dropdown([], label="manifest", allow_custom_value=True, scale=3, elem_id="data-manifest")
        modality = gr.Dropdown(["", *modalities], value="", label="modality")
        finding = gr.Dropdown([""], value="", label="finding", allow_custom_value=True)
        show_button = gr.Button("Show", elem_id="data-show")
    gallery = gr.Gallery(label="images (click one for its report and labels)", columns=8, height=300, elem_id="data-gallery")
    with gr.Row():
        image = gr.Image(label="image", interactive=False, elem_id="data-image")
        with gr.Column():
            report = gr.Textbox(label="report", lines=6, interactive=False, elem_id="data-report")
            labels = gr.JSON(label="structured labels")
    shown = gr.State([])
    limit = 120

    def pages():
        found = data.find_manifests(settings.data_dirs)
        note = f"{len(found)} manifest(s) under {', '.join(f'`{d}`' for d in settings.data_dirs)}" if found else \
            "no manifests found in the data folders (`synthmed data phantoms` draws one; pass --data DIR)"
        return note, gr.Dropdown(choices=found, value=found[0] if found else None)

    def show(path, modality_value, finding_value):
        if not path:
            return "choose a manifest", [], [], gr.Dropdown()
        try:
            rows, skipped = data.read_manifest(path, guard)
            picked = data.filter_manifest(rows, modality_value or None, finding_value or None)
            gallery_items = []
            for r in picked[:limit]:
                try:
                    gallery_items.append((str(guard.image(r["path"])), f"{r['modality']}: {r['text'][:60]}"))
                except PathRefused:
                    continue
        except EXPECTED as exc:
            return _error(exc), [], [], gr.Dropdown()
        note = (f"{len(picked)} of {len(rows)} rows" + (f" (first {limit} shown)" if len(picked) > limit else "")
                + (f"; {len(skipped)} row(s) skipped: {skipped[0]}" if skipped else ""))
        return note, gallery_items, picked[:limit], gr.Dropdown(choices=["", "normal", *data.finding_names(rows)], value=finding_value or "")

    def pick(evt: gr.SelectData, rows):
        r = rows[evt.index]
        try:
            path = str(guard.image(r["path"]))
        except PathRefused as exc:
            return None, r["text"] + f"\n\n({exc})", r["findings"]
        return path, r["text"], {"modality": r["modality"], "source": r["source"], "findings": r["findings"]}

    show_button.click(show, [manifest, modality, finding], [message, gallery, shown, finding], api_name="data")
    gallery.select(pick, [shown], [image, report, labels], api_visibility="private")

    def open_page():
        filled = pages()
        first = filled[1].value if hasattr(filled[1], "value") else None
        return show(first, "", "") if first else filled

    return {"open": pages, "outputs": [message, manifest], "bench": {"Data (the first manifest shown)": open_page}}


# -- Rate -------------------------------------------------------------------------------------
def _rate_page(settings: DashboardSettings, guard: FileGuard, modalities: list[str]):
    gr.Markdown(f"Ratings are added to `{settings.ratings}` (MINIM's `image_path,rating,modality,expert_level,prompt`, then "
                f"`comment`); train the selector on them with `synthmed judges train selector --ratings {settings.ratings}`.")
    message = gr.Markdown(elem_id="rate-message")
    with gr.Row():
        kind = gr.Radio(["run", "folder", "manifest"], value="folder", label="images from")
        source = gr.Dropdown([], label="run folder, image folder or manifest", allow_custom_value=True, scale=3, elem_id="rate-source")
    with gr.Row():
        real = gr.Dropdown([""], value="", label="mix in real images from (manifest)", allow_custom_value=True)
        real_count = gr.Number(label="how many real", value=0, precision=0)
        blind = gr.Checkbox(label="blinded (hide where an image came from)", value=True)
        shuffle = gr.Checkbox(label="shuffled", value=True)
        load = gr.Button("Load", elem_id="rate-load")
    with gr.Row():
        image = gr.Image(label="image", interactive=False, elem_id="rate-image", height=320)
        with gr.Column():
            where = gr.Markdown(elem_id="rate-where")
            prompt = gr.Textbox(label="prompt / report", lines=3, interactive=False)
            modality = gr.Dropdown(modalities, value=None, label="modality", elem_id="rate-modality")
            rating = gr.Radio([1, 2, 3, 4, 5], label="rating (1 worst, 5 best)", elem_id="rate-rating")
            level = gr.Dropdown(settings.expert_levels, value=settings.expert_levels[-1], label="your expert level", elem_id="rate-level")
            comment = gr.Textbox(label="comment", elem_id="rate-comment")
            submit = gr.Button("Save rating and next", variant="primary", elem_id="rate-submit")
    queue = gr.State({"items": [], "at": 0, "blind": True})

    def current(state, note=""):
        items, at = state["items"], state["at"]
        if at >= len(items):
            return (note + ("\n\nAll images rated." if items else ""), None, "", "", gr.Dropdown(value=None), None, state)
        item = items[at]
        where_text = f"image {at + 1} of {len(items)}" + ("" if state["blind"] else f" · {item['origin']} · `{item['path']}`")
        return (note, item["path"], where_text, item["prompt"], gr.Dropdown(value=item["modality"]), None, state)

    def pages():
        manifests = data.find_manifests(settings.data_dirs)
        folders = [r["path"] for r in data.list_all_runs(settings.runs_dir)]
        if settings.outputs and Path(settings.outputs).is_dir():
            folders.insert(0, str(settings.outputs))
        return "", gr.Dropdown(choices=folders + manifests, value=folders[0] if folders else None), \
            gr.Dropdown(choices=["", *manifests], value="")

    def start(kind_value, source_value, real_value, count, blind_value, shuffle_value):
        try:
            items = data.rating_items(source_value or "", guard, kind_value, real_value or None, int(count or 0),
                                      bool(shuffle_value), seed=int(time.time()) if shuffle_value else 0,
                                      traces=settings.traces, outputs=settings.outputs)
        except EXPECTED as exc:
            return current({"items": [], "at": 0, "blind": True}, _error(exc))
        state = {"items": [vars(i) for i in items], "at": 0, "blind": bool(blind_value)}
        return current(state, f"{len(items)} image(s) to rate")

    def rate(state, rating_value, modality_value, level_value, comment_value):
        items, at = state["items"], state["at"]
        if at >= len(items):
            return current(state, "**Load images to rate first.**")
        if rating_value in (None, ""):
            return current(state, "**Choose a rating from 1 to 5.**")
        item = items[at]
        try:
            data.append_rating(settings.ratings, item["path"], int(rating_value), modality_value, level_value, item["prompt"],
                               comment_value or "", settings.expert_levels, None)
        except EXPECTED as exc:
            return current(state, _error(exc))
        state = {**state, "at": at + 1}
        return current(state, f"saved: {rating_value}/5 ({len(data.read_ratings_rows(settings.ratings))} rating(s) in the file)")

    outputs = [message, image, where, prompt, modality, rating, queue]
    load.click(start, [kind, source, real, real_count, blind, shuffle], outputs, api_name="rate_load")
    submit.click(rate, [queue, rating, modality, level, comment], outputs, api_name="rate").then(
        lambda: "", None, [comment], api_visibility="private")
    return {"open": pages, "outputs": [message, source, real], "bench": {"Rate": pages}}


# -- Enhance ----------------------------------------------------------------------------------
def _enhance_page(guard: FileGuard) -> None:
    message = gr.Markdown(elem_id="enhance-message")
    with gr.Row():
        path = gr.Textbox(label="image path in a run or data folder (or upload below)", scale=3, elem_id="enhance-path")
        load = gr.Button("Load", elem_id="enhance-load")
    with gr.Row():
        preset = gr.Radio(list(PRESETS), value="clahe", label="preset", elem_id="enhance-preset")
        strength = gr.Slider(0.1, 4.0, value=1.0, step=0.1, label="strength")
        centre = gr.Slider(0, 255, value=128, step=1, label="window centre")
        width = gr.Slider(2, 512, value=128, step=1, label="window width")
    with gr.Row():
        original = gr.Image(label="original", type="numpy", sources=["upload"], elem_id="enhance-original")
        enhanced = gr.Image(label="enhanced", type="numpy", interactive=False, elem_id="enhance-result")
    download = gr.File(label="download the enhanced image (PNG)", interactive=False, elem_id="enhance-download")
    out_dir = Path(tempfile.gettempdir()) / "synthmed-dashboard"

    def load_image(path_value):
        try:
            real = guard.image((path_value or "").strip())
            return "", np.asarray(Image.open(real).convert("L" if Image.open(real).mode in ("L", "I;16", "I") else "RGB"))
        except EXPECTED as exc:
            return _error(exc), gr.skip()

    def apply(image, preset_value, strength_value, centre_value, width_value):
        if image is None:
            return "load or upload an image first", None, None
        try:
            array = np.asarray(image)
            if array.dtype != np.uint8:
                array = np.clip(array, 0, 255).astype(np.uint8)
            if array.ndim == 3 and array.shape[2] >= 3 and np.array_equal(array[..., 0], array[..., 1]) and np.array_equal(array[..., 1], array[..., 2]):
                array = array[..., 0]  # grey stored as RGB
            result = enhance(array, preset_value, float(strength_value), float(centre_value), float(width_value))
        except EXPECTED as exc:
            return _error(exc), None, None
        out_dir.mkdir(exist_ok=True)
        target = out_dir / f"enhanced_{preset_value}_{time.strftime('%Y%m%d-%H%M%S')}_{os.getpid()}.png"
        Image.fromarray(result).save(target)
        return f"{preset_value}: {array.shape[1]}x{array.shape[0]} px", result, str(target)

    inputs = [original, preset, strength, centre, width]
    load.click(load_image, [path], [message, original], api_name="enhance_load").then(apply, inputs, [message, enhanced, download],
                                                                                      api_visibility="private")
    for control in (preset, strength, centre, width):
        control.change(apply, inputs, [message, enhanced, download], api_visibility="private")
    original.upload(apply, inputs, [message, enhanced, download], api_visibility="private")
    gr.Button("Apply", elem_id="enhance-apply").click(apply, inputs, [message, enhanced, download], api_name="enhance")


# -- serving ----------------------------------------------------------------------------------
class FileRouteGuard:
    """ASGI middleware: a request to Gradio's file route (``/gradio_api/file=...``, ``/file=...``) passes
    only for a file in Gradio's own cache or one ``FileGuard`` allows (images in the given folders);
    anything else, however encoded, gets 403 and no bytes."""

    def __init__(self, app, guard: FileGuard, cache: Path):
        self.app, self.guard, self.cache = app, guard, Path(os.path.realpath(cache))

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            raw = scope.get("raw_path") or scope.get("path", "").encode()
            text = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
            decoded = unquote(unquote(text))
            marker = next((m for m in ("/gradio_api/file=", "/file=") if m in decoded), None)
            if marker is not None and not self._allowed(decoded.split(marker, 1)[1].split("?", 1)[0]):
                await send({"type": "http.response.start", "status": 403, "headers": [(b"content-type", b"text/plain")]})
                await send({"type": "http.response.body", "body": b"refused: not a file this dashboard serves"})
                return
        await self.app(scope, receive, send)

    def _allowed(self, path: str) -> bool:
        real = Path(os.path.realpath(unquote(path)))
        if ".." not in Path(unquote(path)).parts and real.is_relative_to(self.cache) and real.is_file():
            return True
        try:
            self.guard.image(path)
            return True
        except PathRefused:
            return False


def port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        # as uvicorn binds: a port held only by closed connections (TIME_WAIT) is free, a listening one is not
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def plot_library_warmup() -> str | None:
    """JavaScript, run once the app has loaded, that imports Gradio's plotting bundle (vega-embed, ~650 kB, which
    its plots otherwise import the first time one is drawn) when the browser is idle: the first page with plots
    then opens without waiting for it. None when this Gradio build has no single such bundle (nothing is warmed)."""
    assets = Path(gr.__file__).parent / "templates" / "frontend" / "assets"
    bundles = sorted(assets.glob("embed-*.js"))
    if len(bundles) != 1:
        return None
    name = json.dumps(bundles[0].name)
    return ("() => { const main = document.querySelector('script[type=module][src*=\"/assets/index-\"]');"
            f" const url = main ? new URL({name}, main.src).href : new URL('assets/' + {name}, document.baseURI).href;"
            " const warm = () => import(url).catch(() => {});"
            " if ('requestIdleCallback' in window) { requestIdleCallback(warm, {timeout: 2000}); } else { setTimeout(warm, 200); } }")


def launch(app: gr.Blocks, settings: DashboardSettings, host: str = "127.0.0.1", port: int = 7860,
           auth: tuple[str, str] | None = None, block: bool = True, quiet: bool = False):
    """Serve ``app`` on host:port (no share link, analytics off). A taken port is a ValueError."""
    from starlette.middleware import Middleware

    if not port_free(host, port):
        raise ValueError(f"port {port} on {host} is taken (another dashboard or program listens there); choose another with --port")
    guard = settings.guard()
    from gradio.utils import get_upload_folder

    cache = Path(get_upload_folder())
    blocked = [str(p) for p in (settings.traces, settings.ratings)]
    blocked += [b + suffix for b in blocked for suffix in ("-wal", "-shm", "-journal", ".lock")]
    return app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, share=False, auth=auth, prevent_thread_lock=not block, quiet=quiet,
        allowed_paths=[str(r) for r in guard.real_roots], blocked_paths=blocked, ssr_mode=False, mcp_server=False,
        show_error=False, footer_links=[], js=plot_library_warmup(), app_kwargs={"middleware": [Middleware(FileRouteGuard, guard=guard, cache=cache)]})


__all__ = ["DashboardSettings", "FileRouteGuard", "build_app", "default_agent_factory", "launch", "line_plot", "port_free", "series_frame"]
