"""The dashboard in a real browser: headless Chromium from Debian's ``chromium`` package, driven by
Playwright's Python package through ``executable_path``, clicking through every page
(pipelines.dashboard.screenshots, which also makes docs/dashboard/*.png) over the real graph on tiny
models, two loop runs, a manifest and the ratings CSV.

Skips, with the reason, where gradio, playwright or the chromium binary is missing. Set
SYNTHMED_CHROMIUM to use another binary, SYNTHMED_DASHBOARD_SCREENSHOTS to keep the screenshots."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason='the dashboard extra is not installed: pip install -e ".[dashboard]"')
pytest.importorskip("playwright.sync_api", reason='playwright is not installed: pip install -e ".[dashboard,test]"')
CHROMIUM = os.environ.get("SYNTHMED_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).is_file():
    pytest.skip(f"no Chromium binary at {CHROMIUM}: apt-get install chromium (or set SYNTHMED_CHROMIUM)", allow_module_level=True)

from PIL import Image
from test_dashboard_app import free_port, tiny_agent  # noqa: F401
from test_runs import CRASHED, runs_dir  # noqa: F401

from pipelines.dashboard.app import DashboardSettings, build_app, launch
from pipelines.dashboard.screenshots import PAGES, click_through


@pytest.mark.slow
def test_click_through_every_page(tiny_agent, runs_dir, tmp_path):  # noqa: F811
    from rlhf.config import SelectorConfig
    from rlhf.selector import read_ratings

    data_dir = tmp_path / "data" / "set"
    (data_dir / "images").mkdir(parents=True)
    with open(data_dir / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "text", "modality", "findings"])
        for i in range(3):
            Image.new("L", (32, 32), 60 * i).save(data_dir / "images" / f"{i}.png")
            w.writerow([f"images/{i}.png", f"Report {i}: small right pleural effusion.", "cxr",
                        json.dumps([{"name": "pleural_effusion", "present": True, "side": "right"}])])
    for e in (1, 2, 3, 4):  # the crashed run's grids: real PNGs this time
        Image.new("L", (64, 32), 40 * e).save(runs_dir / CRASHED / "grids" / f"epoch_{e:04d}.png")
    agents_cfg = tiny_agent.cfg.agents
    settings = DashboardSettings(runs_dir=runs_dir, traces=Path(agents_cfg.traces), ratings=tmp_path / "ratings.csv",
                                 data_dirs=[tmp_path / "data"], outputs=Path(agents_cfg.out), profile="tiny")
    app = build_app(settings, agent_factory=lambda profile, lora: tiny_agent)
    port = free_port()
    launch(app, settings, "127.0.0.1", port, block=False, quiet=True)
    out = Path(os.environ.get("SYNTHMED_DASHBOARD_SCREENSHOTS") or tmp_path / "shots")
    try:
        seen = click_through(f"http://127.0.0.1:{port}/", out, CHROMIUM, ("Large left pleural effusion. No pneumothorax.", "cxr"),
                             enhance_image=str(data_dir / "images" / "1.png"), timeout_s=120)
    finally:
        app.close()
    for page in PAGES:
        shot = out / f"{page}.png"
        assert shot.is_file() and Image.open(shot).size[0] >= 1000, page
    assert seen["trace_id"] and "compose_prompt" in seen["generate_progress"] and "finish" in seen["generate_progress"]
    assert "status" in seen["trace_summary"] and "assess_pathology" in seen["trace_text"]
    assert CRASHED in seen["run_summary"] and "guard" in seen["run_summary"]
    assert "pleural effusion" in seen["data_report"]
    assert "saved: 4/5" in seen["rate_message"]
    assert "clahe" in seen["enhance_message"]
    table = read_ratings(settings.ratings, SelectorConfig())
    assert table.ratings.tolist() == [4.0] and Path(table.paths[0]).is_file()
    assert all(s < 60 for page, s in seen["seconds"].items() if page != "generate"), seen["seconds"]
