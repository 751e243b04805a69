"""Screenshot the MLflow compare view of a search: its trials' parallel-coordinates chart (docs/BENCHMARKS.md).

    make ui &                          # or any MLflow server that holds the search
    python3 scripts/screenshot_search.py --parent-run <search run id> --output docs/tuning_cpu_parallel_coordinates.png

The trials are the child runs of the search's run (tag mlflow.parentRunId); the chart shows the tuned parameters
(the tag ``tuned`` of each trial) and the metric val_auc. Needs Playwright (``pip install playwright``, not a
dependency of the project) and a Chromium (Debian: ``apt-get install chromium``; --chromium to point elsewhere).
Only the MLflow REST API and the browser are used, so it runs from any virtual environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

logger = logging.getLogger("screenshot_search")


def search_trials(ui: str, parent_run: str) -> tuple[str, list[dict]]:
    """(experiment id, trial runs) of the search run ``parent_run``, oldest trial first."""
    run = _api(ui, "runs/get", query={"run_id": parent_run})["run"]
    experiment = run["info"]["experiment_id"]
    body = {
        "experiment_ids": [experiment],
        "filter": f"tags.mlflow.parentRunId = '{parent_run}'",
        "max_results": 1000,
    }
    trials = _api(ui, "runs/search", body=body).get("runs", [])
    if not trials:
        raise SystemExit(f"run {parent_run} has no child runs (trials) in experiment {experiment}")
    return experiment, sorted(trials, key=lambda r: int(_tags(r).get("trial", 0)))


def _tags(run: dict) -> dict:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def _api(ui: str, path: str, body: dict | None = None, query: dict | None = None) -> dict:
    """One call of MLflow's REST API: a GET with ``query`` or a POST of ``body``."""
    url = f"{ui.rstrip('/')}/api/2.0/mlflow/{path}"
    if body is None:
        url += "?" + urllib.parse.urlencode(query or {})
        request = urllib.request.Request(url)
    else:
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def choose(page, label: str, keys: list[str]) -> None:
    """Select ``keys`` (exactly, in order) in the multi-select that follows the text ``label``."""
    box = page.locator(f"xpath=//div[normalize-space(text())='{label}']/following-sibling::*[1]")
    for key in keys:
        box.click()
        page.keyboard.type(key)
        option = page.locator(f"[class*='select-item-option'][title='{key}']").last
        option.click()
        page.keyboard.press("Escape")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ui", default="http://127.0.0.1:5000", help="the MLflow server (make ui)")
    parser.add_argument("--parent-run", required=True, help="the search's MLflow run id (the trials' parent)")
    parser.add_argument("--metric", default="val_auc")
    parser.add_argument("--output", default="docs/tuning_parallel_coordinates.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    from playwright.sync_api import sync_playwright

    experiment, trials = search_trials(args.ui, args.parent_run)
    tuned = sorted({key.strip() for run in trials for key in _tags(run).get("tuned", "").split(",") if key.strip()})
    if not tuned:
        raise SystemExit("the trials carry no `tuned` tag: not runs of the search pipeline?")
    ids = [run["info"]["run_id"] for run in trials]
    url = f"{args.ui.rstrip('/')}/#/compare-runs?runs={json.dumps(ids)}&experiments={json.dumps([experiment])}"
    logger.info("%d trials of experiment %s; parameters %s; %s", len(ids), experiment, tuned, url)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1900, "height": 1100}, device_scale_factor=1)
        page.goto(url)
        page.get_by_text("Parallel Coordinates Plot").first.click()
        page.get_by_role("button", name="Clear All").click()
        choose(page, "Parameters:", tuned)
        choose(page, "Metrics:", [args.metric])
        plot = page.locator(".js-plotly-plot").first
        plot.wait_for(state="visible", timeout=30_000)
        page.wait_for_timeout(1500)  # plotly's transition
        container = plot.locator("xpath=ancestor::div[.//div[normalize-space(text())='Parameters:']][1]")
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        container.screenshot(path=args.output)  # the controls and the chart; fails if the page's layout changed
        browser.close()
    print(json.dumps({"output": args.output, "trials": len(ids), "parameters": tuned, "metric": args.metric}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
