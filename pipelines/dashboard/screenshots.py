"""Click through every page of a running dashboard in headless Chromium (Playwright) and save a screenshot
of each: what the browser tests run, and how ``docs/dashboard/*.png`` are made.

    synthmed dashboard --runs ../longrun &            # or any running dashboard
    python -m pipelines.dashboard.screenshots http://127.0.0.1:7860/ --out docs/dashboard --chromium /usr/bin/chromium

Playwright's own browser download is not needed: Debian's ``chromium`` package is driven through
``executable_path``. Each step waits for what the page must show and raises if it does not appear.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

PAGES = ("generate", "traces", "runs", "data", "rate", "enhance")


def _value(page, elem_id: str) -> str:
    return page.evaluate(f"""() => {{ const el = document.querySelector('#{elem_id} textarea, #{elem_id} input');
                                       return el ? el.value : ''; }}""")


def _wait_text(page, selector: str, text: str, timeout_ms: int) -> None:
    page.locator(selector).filter(has_text=text).first.wait_for(state="visible", timeout=timeout_ms)


def _pick(page, elem: str, value: str) -> None:
    """Type a value into a Gradio dropdown that allows custom values, and commit it."""
    box = page.locator(f"{elem} input")
    box.click()
    box.fill(value)
    box.press("Enter")
    page.keyboard.press("Escape")


def click_through(url: str, out: Path, chromium: str = "/usr/bin/chromium", request: tuple[str, str] = ("large left pleural effusion, no pneumothorax", "cxr"),
                  auth: tuple[str, str] | None = None, enhance_image: str | None = None, timeout_s: float = 180,
                  width: int = 1400, run: str | None = None, compare: tuple[str, str] | None = None) -> dict[str, Any]:
    """Open every page, use it, save ``out/<page>.png``; returns what each page showed (for tests)."""
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, Any] = {"seconds": {}}
    t_ms = int(timeout_s * 1000)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 1000})
            page.set_default_timeout(t_ms)
            started = time.perf_counter()
            page.goto(url)
            if auth:
                page.get_by_label("username").fill(auth[0])
                page.get_by_label("password").fill(auth[1])
                page.get_by_role("button", name="Login").click()
            page.get_by_role("tab", name="Generate", exact=True).wait_for()
            seen["seconds"]["load"] = time.perf_counter() - started

            # Generate: the stages stream in; wait for the trace id and the final image
            started = time.perf_counter()
            page.locator("#gen-text textarea").fill(request[0])
            page.locator("#gen-go").click()
            page.wait_for_function("() => { const el = document.querySelector('#gen-trace textarea, #gen-trace input');"
                                   " return el && el.value.length > 0 }", timeout=t_ms)
            _wait_text(page, "#gen-progress", "finish", t_ms)
            page.locator("#gen-final img").first.wait_for(state="visible")
            seen["trace_id"] = _value(page, "gen-trace")
            seen["generate_progress"] = page.locator("#gen-progress").inner_text()
            seen["seconds"]["generate"] = time.perf_counter() - started
            page.screenshot(path=str(out / "generate.png"), full_page=True)

            # Traces: the list, then the newest trace opened by clicking its row
            started = time.perf_counter()
            page.get_by_role("tab", name="Traces", exact=True).click()
            _wait_text(page, "#traces-message", "trace(s)", t_ms)
            page.locator('#traces-table [data-testid="cell-0-1"]').first.click()
            _wait_text(page, "#traces-summary", "status", t_ms)
            seen["trace_summary"] = page.locator("#traces-summary").inner_text()
            seen["trace_text"] = _value(page, "traces-text")
            seen["seconds"]["traces"] = time.perf_counter() - started
            page.screenshot(path=str(out / "traces.png"), full_page=True)

            # Runs: the newest run opens with its plots, grid and samples
            started = time.perf_counter()
            page.get_by_role("tab", name="Runs", exact=True).click()
            _wait_text(page, "#runs-summary", "status", t_ms)
            page.locator("#runs-reward canvas, #runs-reward svg.marks").first.wait_for(state="visible")
            seen["seconds"]["runs"] = time.perf_counter() - started
            if run:  # another run than the newest
                _pick(page, "#runs-run", run)
                _wait_text(page, "#runs-summary", run, t_ms)
            seen["run_summary"] = page.locator("#runs-summary").inner_text()
            # the page fills from the top; the samples table comes last (after the second row of plots)
            page.wait_for_function("() => document.querySelectorAll('#runs-samples [role=row]').length > 1", timeout=t_ms)
            page.get_by_text("Compare two runs").click()  # open the accordion
            if compare:
                _pick(page, "#runs-a", compare[0])
                _pick(page, "#runs-b", compare[1])
            page.locator("#runs-compare").click()
            _wait_text(page, "#runs-message", "comparing", t_ms)
            page.screenshot(path=str(out / "runs.png"), full_page=True)

            # Data: the first manifest, then one image with its report and labels
            started = time.perf_counter()
            page.get_by_role("tab", name="Data", exact=True).click()
            _wait_text(page, "#data-message", "manifest", t_ms)
            page.locator("#data-show").click()
            _wait_text(page, "#data-message", "rows", t_ms)
            page.locator("#data-gallery button img, #data-gallery .thumbnail-item img").first.click()
            page.wait_for_function("() => { const el = document.querySelector('#data-report textarea'); return el && el.value.length > 0 }")
            seen["data_report"] = _value(page, "data-report")
            seen["seconds"]["data"] = time.perf_counter() - started
            page.screenshot(path=str(out / "data.png"), full_page=True)

            # Rate: load the images, rate the first one
            started = time.perf_counter()
            page.get_by_role("tab", name="Rate", exact=True).click()
            page.locator("#rate-source input").wait_for()
            page.locator("#rate-load").click()
            _wait_text(page, "#rate-message", "to rate", t_ms)
            page.locator("#rate-rating").get_by_text("4", exact=True).click()
            if not _value(page, "rate-modality"):
                page.locator("#rate-modality input").fill(request[1])
                page.keyboard.press("Enter")
            page.locator("#rate-comment textarea").fill("browser test")
            page.locator("#rate-submit").click()
            _wait_text(page, "#rate-message", "saved", t_ms)
            seen["rate_message"] = page.locator("#rate-message").inner_text()
            seen["seconds"]["rate"] = time.perf_counter() - started
            page.screenshot(path=str(out / "rate.png"), full_page=True)

            # Enhance: a served image, CLAHE beside the original, a PNG to download
            started = time.perf_counter()
            page.get_by_role("tab", name="Enhance", exact=True).click()
            if enhance_image:
                page.locator("#enhance-path textarea").fill(enhance_image)
                page.locator("#enhance-load").click()
                page.locator("#enhance-result img").first.wait_for(state="visible")
                page.locator("#enhance-download a").first.wait_for(state="attached")
                seen["enhance_message"] = page.locator("#enhance-message").inner_text()
            seen["seconds"]["enhance"] = time.perf_counter() - started
            page.screenshot(path=str(out / "enhance.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(out / "failure.png"), full_page=True)  # what the page showed when a step gave up
            (out / "failure.html").write_text(page.content(), encoding="utf-8")
            raise
        finally:
            browser.close()
    return seen


def page_open_times(url: str, chromium: str = "/usr/bin/chromium", timeout_s: float = 60) -> dict[str, float]:
    """Seconds from clicking each page's tab until what it opens with is on screen (the list of traces, the
    newest run's reward plot, and then its samples table too, the first manifest's name, the rating form), in a fresh
    headless Chromium."""
    from playwright.sync_api import sync_playwright

    t_ms = int(timeout_s * 1000)
    waits = {"Traces": lambda page: _wait_text(page, "#traces-message", "trace", t_ms),
             "Runs": lambda page: page.locator("#runs-reward canvas, #runs-reward svg.marks").first.wait_for(state="visible", timeout=t_ms),
             "Data": lambda page: _wait_text(page, "#data-message", "manifest", t_ms),
             "Rate": lambda page: page.wait_for_function("() => { const el = document.querySelector('#rate-source input');"
                                                         " return el && el.value.length > 0 }", timeout=t_ms),
             "Enhance": lambda page: page.locator("#enhance-preset").wait_for(state="visible", timeout=t_ms),
             "Generate": lambda page: page.locator("#gen-text textarea").wait_for(state="visible", timeout=t_ms)}
    times = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            started = time.perf_counter()
            page.goto(url)
            page.get_by_role("tab", name="Generate", exact=True).wait_for(timeout=t_ms)
            times["app (first load)"] = time.perf_counter() - started
            for name, wait in waits.items():
                started = time.perf_counter()
                page.get_by_role("tab", name=name, exact=True).click()
                wait(page)
                times[name] = time.perf_counter() - started
                if name == "Runs":  # the samples table follows the plots in a second event: when it is there too
                    page.wait_for_function("() => document.querySelectorAll('#runs-samples [role=row]').length > 1", timeout=t_ms)
                    times["Runs (and its samples table)"] = time.perf_counter() - started
        finally:
            browser.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url")
    parser.add_argument("--out", default="docs/dashboard")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--request", default="large left pleural effusion, no pneumothorax")
    parser.add_argument("--modality", default="cxr")
    parser.add_argument("--enhance-image", default=None, help="an image path the dashboard serves, for the Enhance page")
    parser.add_argument("--run", default=None, help="the run the Runs page shows (default: the newest)")
    parser.add_argument("--compare", nargs=2, default=None, metavar=("A", "B"), help="the two runs compared")
    parser.add_argument("--times-only", action="store_true", help="only time opening each page (no screenshots, no requests)")
    args = parser.parse_args(argv)
    if args.times_only:
        for page, seconds in page_open_times(args.url, args.chromium).items():
            print(f"{page}: {seconds:.2f} s" + ("  (over 2 s)" if seconds > 2 else ""))
        return 0
    seen = click_through(args.url, Path(args.out), args.chromium, (args.request, args.modality), enhance_image=args.enhance_image,
                         run=args.run, compare=tuple(args.compare) if args.compare else None)
    for page, seconds in seen["seconds"].items():
        print(f"{page}: {seconds:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
