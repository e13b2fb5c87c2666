"""The web form, end to end: headless Chromium (Debian's, driven by Playwright) against the real API + a real
Celery worker + Redis, on tiny llama-like checkpoints.

One deployment per module (starting the services dominates the cost); each test gets a fresh page whose console
errors fail the test. Screenshots of the main screens go to ``$ALLOY_TEST_ARTIFACTS`` (default: a tmp dir).
Needs ``apt-get install chromium`` and ``pip install playwright`` (no ``playwright install``: the system browser
is used); skipped when either is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("ALLOY_CHROMIUM", shutil.which("chromium") or "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 60_000


# ------------------------------------------------------------------------------------------------ static routes
def test_index_and_assets_are_served_with_a_strict_csp() -> None:
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.web import router

    app = FastAPI()
    app.include_router(router)
    client = TestClient(app)
    index = client.get("/")
    assert index.status_code == 200
    assert "script-src 'self'" in index.headers["content-security-policy"]
    # every asset the page references is served locally (works offline, no CDN)
    assets = re.findall(r'(?:src|href)="(/static/[^"]+)"', index.text)
    assert {"/static/app.js", "/static/app.css", "/static/charts.js"} <= set(assets)
    for asset in assets:
        assert client.get(asset).status_code == 200, asset
    assert "http://" not in index.text and "https://" not in index.text
    for bad in ["/static/../web.py", "/static/%2e%2e/web.py", "/static/nope.js", "/static/"]:
        assert client.get(bad).status_code == 404, bad


# ------------------------------------------------------------------------------------------------ deployment
class Deployment:
    def __init__(self, *, url: str, token: str, data: Path, worker: Any, api: Any) -> None:
        self.url, self.token, self.data, self.worker, self.api = url, token, data, worker, api

    def logs(self) -> str:
        return f"--- api ---\n{self.api.log()[-3000:]}\n--- worker ---\n{self.worker.log()[-3000:]}"


@contextlib.contextmanager
def running_deployment(
    root: Path, *, env_extra: dict[str, str], make_models: Callable[[Path], None]
) -> Iterator[Deployment]:
    """A real deployment under ``root``: Redis, SQLite, one Celery worker and the API as processes, models
    written into its data folder by ``make_models``, an admin token."""
    pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from app.serve import worker_command
    from tests.utils.services import (
        FAST_TIMINGS,
        REPO_ROOT,
        ApiProcess,
        JobStore,
        RedisServer,
        WorkerProcess,
        free_port,
        settings_from_env,
    )

    redis = RedisServer(root / "redis")
    redis.start()
    home, data = root / "home", root / "data"
    data.mkdir()
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALLOY_")}
    env.update(FAST_TIMINGS)
    env.update(
        {
            "ALLOY_HOME": str(home),
            "ALLOY_DATABASE_URL": f"sqlite:///{home / 'alloy.db'}",
            "ALLOY_BROKER_URL": redis.url,
            "ALLOY_DATA_DIRS": str(data),
            "ALLOY_KERNELS": "torch",
            "ALLOY_RATE_LIMIT_PER_MINUTE": "1000",
            "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
            "PYTHONUNBUFFERED": "1",
            "HF_HUB_OFFLINE": "1",
            **env_extra,
        }
    )
    token = JobStore(settings_from_env(env)).create_token(name="web", admin=True)
    make_models(data)
    worker = WorkerProcess(
        worker_command(name=f"{root.name}-{free_port()}@%h"), env=env, log_path=root / "worker.log"
    )
    api = ApiProcess(env=env, log_path=root / "api.log")
    try:
        worker.wait_ready()
        api.wait_ready()
        yield Deployment(url=api.url, token=token, data=data, worker=worker, api=api)
    finally:
        api.stop(grace=5)
        worker.stop(grace=5)
        redis.stop()


def _form_models(data: Path) -> None:
    from tests.utils.factories import make_llama_like

    base = make_llama_like(data / "base", layers=4, hidden=16, vocab=32, seed=0)
    for i in (1, 2):
        make_llama_like(data / f"ft{i}", perturb_from=base, seed=i, scale=0.02)
    # big enough that a merge runs for a few seconds on CI (the cancel test needs a running job)
    big = make_llama_like(data / "big-base", layers=32, hidden=256, vocab=64, seed=3)
    make_llama_like(data / "big-ft", perturb_from=big, seed=4, scale=0.02)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with running_deployment(tmp_path_factory.mktemp("web"), env_extra={}, make_models=_form_models) as d:
        yield d


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = Path(os.environ.get("ALLOY_TEST_ARTIFACTS") or tmp_path_factory.mktemp("web-artifacts"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def browser(deployment: Deployment) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, deployment: Deployment, request: pytest.FixtureRequest) -> Iterator[Any]:
    """A fresh tab (own sessionStorage) at ``/`` with the API token entered; fails the test on console errors."""
    width = getattr(request, "param", 1280)
    context = browser.new_context(viewport={"width": width, "height": 900})
    tab = context.new_page()
    tab.set_default_timeout(WAIT_MS)
    errors: list[str] = []
    tab.allowed_http_errors = set()  # a test that provokes e.g. a 422 on purpose lists it here

    def on_console(msg: Any) -> None:
        status = re.search(r"Failed to load resource: .* status of (\d+)", msg.text)
        if msg.type == "error" and not (status and int(status[1]) in tab.allowed_http_errors):
            errors.append(f"console.{msg.type}: {msg.text}")

    tab.on("console", on_console)
    if os.environ.get("H6_DEBUG"):
        tab.on("request", lambda r: print("REQ", r.method, r.url))
        tab.on("response", lambda r: print("RES", r.status, r.url))
        tab.on("requestfailed", lambda r: print("FAILED", r.url, r.failure))
    tab.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    tab.goto(deployment.url + "/")
    tab.fill("#api-token", deployment.token)
    tab.press("#api-token", "Enter")
    tab.wait_for_selector("#method option[value=ties]", state="attached")
    yield tab
    context.close()
    assert not errors, "\n".join(errors) + "\n" + deployment.logs()


def screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    # a full-page capture resizes the viewport; scroll back so the next click's hit test sees the live layout
    page.evaluate("window.scrollTo(0, 0)")


def choose_local_source(page: Any, row: str, path: Path) -> None:
    page.select_option(f"{row} .src-kind", "local")
    page.fill(f"{row} .src-id", str(path))


def compose_ties(
    page: Any,
    deployment: Deployment,
    *,
    out: str,
    base: str = "base",
    models: tuple[str, ...] = ("ft1", "ft2"),
) -> None:
    page.select_option("#method", "ties")
    choose_local_source(page, "#base-row", deployment.data / base)
    while page.locator("#models-list > .model-row").count() < len(models):
        page.click("#add-model")
    for i, name in enumerate(models):
        row = f"#models-list > .model-row:nth-child({i + 1})"
        choose_local_source(page, row, deployment.data / name)
        page.fill(f"{row} .src-weight", str(1.0 - 0.25 * i))
    page.fill("#f-params-density", "0.5")
    page.check("#lines-enabled")
    page.fill("#lines-beta", "0.8")
    page.select_option("#dtype", "float32")
    page.fill("#output-path", str(deployment.data / out))


def wait_for_job_page(page: Any) -> str:
    """After a submit: the job page's id, or a failure that shows what the form displayed instead."""
    page.wait_for_function(
        "() => /^#\\/jobs\\/[0-9a-f-]+$/.test(location.hash) || !document.querySelector('#error-summary').hidden"
        " || !document.querySelector('#banner').hidden"
    )
    shown = page.evaluate(
        "[location.hash, document.querySelector('#error-summary').innerText, "
        "document.querySelector('#banner').innerText]"
    )
    assert shown[0].startswith("#/jobs/"), shown
    return shown[0].rsplit("/", 1)[1]


def wait_for_status(page: Any, statuses: str) -> str:
    page.wait_for_function(
        f"() => {json.dumps(statuses.split('|'))}.includes(document.querySelector('#job-progress')?.dataset.status)",
        timeout=WAIT_MS,
    )
    return page.get_attribute("#job-progress", "data-status")


# ------------------------------------------------------------------------------------------------ browser tests
@pytest.mark.browser
def test_compose_submit_shows_live_progress_report_and_charts(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    compose_ties(page, deployment, out="out-ties")
    preview = page.text_content("#yaml-preview")
    recipe_lines = {"method: ties", "density: 0.5", "beta: 0.8", "dtype: float32", "weight: 0.75"}
    assert all(line in preview for line in recipe_lines), preview
    screenshot(page, artifacts / "compose-1280.png")

    streams: list[int] = []
    page.on("response", lambda r: streams.append(r.status) if r.url.endswith("/events") else None)
    page.click("#submit")
    wait_for_job_page(page)
    assert wait_for_status(page, "succeeded|failed|cancelled") == "succeeded", (
        page.text_content("#job-error") or ""
    )
    assert streams == [200]  # live status came over SSE (fetch-streamed, with the Authorization header)
    assert page.get_attribute("#job-progress", "aria-valuenow") == "100"
    progress = page.text_content("#job-progress-text")
    assert re.search(r"(\d+) / \1 tensors", progress), progress
    assert re.search(r"\d+(\.\d)? [KM]?B / ", progress), progress
    assert str(deployment.data / "out-ties") in page.text_content("#job-output")
    page.wait_for_selector("#job-card-section:not([hidden])")
    assert "Merged model" in page.text_content("#job-card")  # the rendered model card of the output

    page.wait_for_selector("#job-charts figure")
    captions = page.locator("#job-charts figcaption").all_text_contents()
    assert {"Sign-conflict rate per layer", "Density kept per layer", "LiNeS scale per layer"} <= set(
        captions
    )
    # the stats this TIES + LiNeS merge reports are drawn, one point (or bar) per layer
    for title in ("Sign-conflict rate per layer", "Density kept per layer", "LiNeS scale per layer"):
        figure = page.locator("#job-charts figure", has_text=title)
        assert figure.locator("svg circle, svg rect").count() >= 4, title
    screenshot(page, artifacts / "job-succeeded-1280.png")

    page.goto(deployment.url + "/#/jobs")
    page.click("#status-filters button:text-is('succeeded')")
    page.wait_for_selector("#jobs-body tr")
    statuses = page.locator("#jobs-body .status").all_text_contents()
    assert statuses and set(statuses) == {"succeeded"}
    screenshot(page, artifacts / "jobs-1280.png")


@pytest.mark.browser
def test_import_mergekit_yaml_fills_the_form(page: Any, deployment: Deployment, artifacts: Path) -> None:
    base, ft1, ft2 = (deployment.data / name for name in ("base", "ft1", "ft2"))
    mergekit = f"""
models:
  - model: {ft1}
    parameters: {{density: 0.4, weight: 0.7}}
  - model: {ft2}
    parameters: {{density: 0.6, weight: 0.3}}
merge_method: dare_ties
base_model: {base}
dtype: bfloat16
"""
    page.fill("#import-text", mergekit)
    page.click("#import-button")
    page.wait_for_function("() => document.querySelector('#method').value === 'dare_ties'")
    assert page.input_value("#dtype") == "bfloat16"
    assert page.input_value("#base-row .src-id") == str(deployment.data / "base")
    rows = page.locator("#models-list > .model-row")
    assert rows.count() == 2
    assert rows.nth(0).locator(".src-id").input_value() == str(deployment.data / "ft1")
    assert float(rows.nth(0).locator(".src-weight").input_value()) == pytest.approx(0.7)
    preview = page.text_content("#yaml-preview")
    assert "method: dare_ties" in preview and "dtype: bfloat16" in preview
    screenshot(page, artifacts / "import-mergekit-1280.png")

    # a Hub destination: repo, privacy and a pull request show up in the recipe
    page.check("input[name=dest][value=hub]")
    page.fill("#hub-repo", "org/merged-model")
    page.check("#hub-pr")
    preview = page.text_content("#yaml-preview")
    assert "repo: org/merged-model" in preview and "private: true" in preview and "create_pr: true" in preview
    page.allowed_http_errors.update({400, 422})
    page.fill("#import-text", "merge_method: [unclosed")
    page.click("#import-button")
    page.wait_for_function("() => document.querySelector('#import-errors').textContent.trim().length > 0")
    assert page.input_value("#method") == "dare_ties"  # a failed import leaves the form alone


@pytest.mark.browser
def test_bad_density_is_reported_next_to_its_field(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    compose_ties(page, deployment, out="never-written")
    page.allowed_http_errors.add(422)
    page.fill("#f-params-density", "1.5")
    page.click("#submit")
    error = page.locator("#f-params-density >> xpath=ancestor::div[contains(@class,'field')][1]").locator(
        ".field-error"
    )
    error.wait_for()
    assert re.search(r"less than or equal to 1|density", error.text_content(), re.I)
    assert page.get_attribute("#f-params-density", "aria-invalid") == "true"
    assert page.input_value("#f-params-density") == "1.5"  # the form keeps what was typed
    assert page.input_value("#base-row .src-id") == str(deployment.data / "base")
    assert "#/jobs/" not in page.url
    assert page.locator("#error-summary a").count() >= 1
    screenshot(page, artifacts / "field-error-1280.png")
    # the summary link moves keyboard focus to the field
    page.locator("#error-summary a").first.press("Enter")
    assert page.evaluate("document.activeElement.id") == "f-params-density"


@pytest.mark.browser
def test_cancel_a_running_job(page: Any, deployment: Deployment, artifacts: Path) -> None:
    page.select_option("#method", "ties")
    choose_local_source(page, "#base-row", deployment.data / "big-base")
    page.locator("#models-list > .model-row:nth-child(2) .remove").click()
    choose_local_source(page, "#models-list > .model-row:nth-child(1)", deployment.data / "big-ft")
    page.fill("#output-path", str(deployment.data / "out-cancelled"))
    page.click("#submit")
    wait_for_job_page(page)
    # live progress first (SSE), then cancel while tensors are still being merged
    page.wait_for_function("""() => { const bar = document.querySelector('#job-progress');
        return ['succeeded', 'failed', 'cancelled'].includes(bar.dataset.status)
            || (bar.dataset.status === 'running' && Number(bar.getAttribute('aria-valuenow')) > 0); }""")
    assert page.get_attribute("#job-progress", "data-status") == "running", deployment.logs()
    page.click("#job-cancel")  # at once: the screenshot can wait, the merge won't
    page.click("#job-cancel-yes")  # cancel asks first
    assert re.search(r"\d+ / \d+ tensors", page.text_content("#job-progress-text"))
    screenshot(page, artifacts / "job-cancelling-1280.png")
    assert wait_for_status(page, "succeeded|failed|cancelled") == "cancelled"
    assert page.locator("#job-cancel").is_hidden()
    assert not (deployment.data / "out-cancelled").exists()
    screenshot(page, artifacts / "job-cancelled-1280.png")


@pytest.mark.browser
def test_analysis_draws_norms_and_cosine_heatmap(page: Any, deployment: Deployment, artifacts: Path) -> None:
    compose_ties(page, deployment, out="unused")
    # the Hub token goes with the request as a header and is never stored by the page
    page.click("#tokens summary")
    page.fill("#hf-token", "hf_test_secret_123")
    sent: list[dict[str, str]] = []
    page.on("request", lambda r: sent.append(r.headers) if r.url.endswith("/v1/analyses") else None)
    page.click("#analyze")
    wait_for_job_page(page)
    assert sent and sent[0].get("x-hf-token") == "hf_test_secret_123"
    stored = page.evaluate("JSON.stringify([{...sessionStorage}, {...localStorage}, document.cookie])")
    assert "hf_test_secret_123" not in stored
    assert wait_for_status(page, "succeeded|failed|cancelled") == "succeeded", (
        page.text_content("#job-error") or ""
    )
    norms = page.locator("#job-charts figure", has_text="Task-vector norm per layer")
    norms.locator("svg path").first.wait_for()
    assert norms.locator("svg path").count() == 2  # one line per model
    assert norms.locator(".legend li").count() == 2
    heatmap = page.locator("#job-charts figure", has_text="Cosine similarity")
    assert heatmap.locator("svg rect").count() == 4  # 2 x 2 models
    assert "1" in heatmap.locator("svg text.cell").first.text_content()  # a task vector is parallel to itself
    conflicts = page.locator("#job-charts figure", has_text="Sign-conflict rate per layer")
    assert conflicts.locator("svg rect").count() >= 4
    screenshot(page, artifacts / "analysis-1280.png")


@pytest.mark.browser
@pytest.mark.parametrize("page", [390], indirect=True)
def test_narrow_screen_and_keyboard_only(page: Any, deployment: Deployment, artifacts: Path) -> None:
    # nothing overflows horizontally at 390 px
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, artifacts / "compose-390.png")
    # keyboard: on a fresh load the first Tab reaches the skip link, which moves focus to the content
    page.reload()
    page.wait_for_selector("#method option[value=ties]", state="attached")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.className") == "skip"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    # add a model row with the keyboard: focus lands in the new row's source field
    before = page.locator("#models-list > .model-row").count()
    page.focus("#add-model")
    page.keyboard.press("Enter")
    assert page.locator("#models-list > .model-row").count() == before + 1
    assert page.evaluate("document.activeElement.classList.contains('src-id')")
    page.keyboard.type(str(deployment.data / "ft1"))
    assert str(deployment.data / "ft1") in page.text_content("#yaml-preview")
    # the jobs table scrolls inside its own box; the page itself never scrolls sideways
    page.goto(deployment.url + "/#/jobs")
    page.wait_for_selector("#status-filters button")
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, artifacts / "jobs-390.png")


@pytest.mark.browser
def test_batch_view_follows_its_jobs(page: Any, deployment: Deployment, artifacts: Path) -> None:
    import httpx

    data = deployment.data
    recipes = [
        {
            "method": method,
            "base": str(data / "base"),
            "models": [{"source": str(data / "ft1")}, {"source": str(data / "ft2")}],
            "output": {"path": str(data / f"batch-{method}")},
        }
        for method in ("task_arithmetic", "dare_linear")
    ]
    created = httpx.post(
        f"{deployment.url}/v1/batches",
        json={"recipes": recipes},
        headers={"Authorization": f"Bearer {deployment.token}"},
        timeout=30,
    )
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]
    page.goto(f"{deployment.url}/#/batches/{batch_id}")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#batch-body .status')].map(s => s.textContent)"
        ".filter(s => s === 'succeeded').length === 2",
        timeout=WAIT_MS,
    )
    methods = page.locator("#batch-body tr td:nth-child(4)").all_text_contents()
    assert sorted(methods) == ["dare_linear", "task_arithmetic"]
    assert "succeeded 2" in page.text_content("#batch-facts")
    screenshot(page, artifacts / "batch-1280.png")
    page.locator("#batch-body a").first.click()
    assert wait_for_status(page, "succeeded|failed|cancelled") == "succeeded"


@pytest.mark.browser
def test_charts_and_model_card_renderers_tolerate_partial_reports(page: Any) -> None:
    # a series missing from a report is a note, never an exception
    notes = page.evaluate("""() => [
        {}, {tensors: null}, {tensors: [{layer: 0}, {layer: 'x', kept_density: 'NaN'}, null]},
        {models: ['a'], layers: [{layer: 'other', index: null, norms: [1]}], cosine: [[1, 2]]},
    ].map((r) => AlloyCharts.fromReport(r, {kind: 'merge'}).map((f) => [
        f.querySelector('figcaption').textContent, f.querySelectorAll('svg').length,
        f.querySelector('.chart-note')?.textContent || '']))""")
    for figures in notes:
        assert figures and all(svgs == 0 and note for _, svgs, note in figures), figures
    # the model card renderer builds text nodes only: markup in a card is shown, never run
    html = page.evaluate("""() => {
        const box = document.createElement('div');
        box.append(...renderMarkdown('---\\nlicense: mit\\n---\\n# Merged\\n<img src=x onerror=alert(1)>\\n'
            + '- uses **TIES** [paper](https://arxiv.org/abs/2306.01708)\\n- [bad](javascript:alert(1))\\n'));
        return box.innerHTML; }""")
    assert "<h4>Merged</h4>" in html and "<strong>TIES</strong>" in html
    assert '<a href="https://arxiv.org/abs/2306.01708"' in html
    assert "<img" not in html and "&lt;img" in html and 'href="javascript' not in html
    assert "license: mit" in html
