"""The report of real jobs as a person sees it: the demo job's index.html in headless
Chromium (Debian's chromium and chromium-driver), every figure drawn, the headline numbers
the record's; and `bulkgen report` on a job while it runs, then after it failed.

BULKGEN_UPDATE_DOCS=1 also copies the screenshot to docs/report.png (the README shows it).
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import pytest

from jobs.core.spec import load_spec
from jobs.driver import run_job
from tests.conftest import REPO, job_dict, write_job, write_prompts
from tests.faults.conftest import Faults, bulkgen_procs, cli_env, commit_records, ray_tmpdirs  # noqa: F401
from tests.waiting import wait_for

pytestmark = pytest.mark.ray

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
UPDATE_DOCS = "BULKGEN_UPDATE_DOCS"
WIDTH = 1100

FIGURES = "Array.from(document.images, i => ({name: i.dataset.figure, complete: i.complete, width: i.naturalWidth}))"
FACTS = ("return Object.fromEntries(Array.from(document.querySelectorAll('[data-headline]'), "
         "e => [e.dataset.headline, e.textContent]))")


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through chromedriver, both Debian's: no browser is downloaded."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.fail(f"{CHROMIUM} and {CHROMEDRIVER} are needed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                f"--window-size={WIDTH},900", f"--user-data-dir={tmp_path / 'chromium'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _broken_figures(browser) -> list[dict]:
    return [f for f in browser.execute_script(f"return {FIGURES}") if not (f["complete"] and f["width"] > 0)]


def test_demo_report_in_a_browser(tmp_path, ray_cluster, monkeypatch, browser):
    monkeypatch.chdir(REPO)  # the demo's paths are relative to the repo
    out = tmp_path / "demo"
    record = run_job(load_spec(REPO / "examples/demo/job.yaml", [f"output.uri={out}"]), progress=False)
    assert record.state == "succeeded"
    page = out / "_report" / "index.html"
    assert page.exists(), "the driver did not write the report as the job ended"

    browser.get(page.as_uri())
    figures = browser.execute_script(f"return {FIGURES}")
    assert {"throughput", "replicas", "lengths", "finish_reasons"} <= {f["name"] for f in figures}, figures
    assert _broken_figures(browser) == []
    # Nothing came from elsewhere: the page stands alone (data: URIs are not network requests).
    assert browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)") == []

    # The headline numbers are the record's.
    doc = json.loads((out / "_job.json").read_text())
    c = doc["counts"]
    wall = (datetime.fromisoformat(doc["finished_at"]) - datetime.fromisoformat(doc["started_at"])).total_seconds()
    facts = browser.execute_script(FACTS)
    assert facts["state"] == "succeeded"
    assert facts["rows_generated"] == f"{c['rows_done'] - c['rows_cached']:,}" == "300"
    assert facts["rows_failed"] == "0" and facts["rows_total"] == "300"
    assert facts["shards"] == f"{c['shards_total']}/{c['shards_total']}"
    assert facts["completion_tokens"] == f"{c['completion_tokens']:,}"
    assert facts["tokens_per_second"] == f"{c['completion_tokens'] / wall:,.1f}"
    assert facts["replicas"] == str(doc["runs"][-1]["replica_plan"]["launched"])
    assert facts["engine"] == f"{doc['model']['replica']['engine']} {doc['model']['replica']['engine_version']}"
    assert facts["model"] == doc["model"]["path"]

    # The check above does catch a broken figure.
    browser.execute_script("document.body.appendChild(Object.assign(new Image(), {src: 'data:image/png;base64,AAAA'}))")
    wait_for(lambda: browser.execute_script("return Array.from(document.images).every(i => i.complete)"), 60,
             "the broken image to settle")
    assert len(_broken_figures(browser)) == 1

    browser.refresh()
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(WIDTH, height)
    shot = tmp_path / "report.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes().startswith(b"\x89PNG")
    if os.environ.get(UPDATE_DOCS) == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "report.png")


@pytest.mark.faults
def test_report_while_running_then_failed(tiny_model, tmp_path, bulkgen_procs, ray_tmpdirs, capsys):  # noqa: F811
    from jobs.cli import main

    write_prompts(tmp_path / "in.parquet", 40)
    out = str(tmp_path / "out")
    job = write_job(tmp_path / "job.yaml", job_dict(str(tmp_path / "in.parquet"), out, tiny_model,
                                                    output={"uri": out, "report": True},
                                                    shards={"rows_per_shard": 10, "max_attempts": 1}))
    faults = Faults(tmp_path / "faults")
    faults.hold(from_shard=1)  # shard 0 commits, the others wait: a job that is running
    faults.rule("replica.shard_end", action="raise", when={"shard": 3})  # and then fails, on its last shard
    driver = bulkgen_procs(["run", str(job), "--no-progress"], cli_env(ray_tmpdirs(), tmp_path / "faults"))

    def first_commit():
        assert driver.proc.poll() is None, f"the job ended early:\n{driver.output()[-3000:]}"
        return commit_records(out)

    wait_for(first_commit, 240, "shard 0 to commit")
    assert main(["report", out]) == 0
    assert "state:    running: a report of the 1 of 4 shards committed so far" in capsys.readouterr().out
    running = (Path(out) / "_report" / "index.html").read_text()
    assert 'data-state="running"' in running and 'data-headline="rows_generated">10<' in running

    faults.release()
    assert driver.wait(240) == 1, driver.output()[-3000:]
    # The driver wrote the failed job's report as it ended; `bulkgen report` says the same.
    failed = (Path(out) / "_report" / "index.html").read_text()
    assert 'data-state="failed"' in failed and "failed (while running): shard part-00003" in failed
    assert main(["report", out]) == 0
    printed = capsys.readouterr().out
    assert "state:    failed (while running): shard part-00003" in printed and "injected fault" in printed
