"""The web form as a practitioner's daily tool (issue 16), in headless Chromium against the real API, a real
Celery worker and Redis: mergekit imports that keep local folders local, Validate running the worker's preflight,
no accidental submits or cancels, a live jobs list, links that work in a new tab, drafts that survive a reload,
error text a person can act on, and the small traps (a decimal comma, LiNeS where it does not apply).

Shares the deployment and page fixtures of ``test_web_form`` (one deployment per module); screenshots go to the
module's artifacts folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.app import test_web_form as web
from tests.app.test_web_form import (
    Deployment,
    choose_local_source,
    screenshot,
    wait_for_job_page,
    wait_for_status,
)

# test_web_form's fixtures: one deployment (API, worker, Redis) and one browser for this module
deployment, browser, page, artifacts = web.deployment, web.browser, web.page, web.artifacts

pytestmark = pytest.mark.browser


def _checkpoint(deployment: Deployment, name: str, **kwargs: Any) -> Path:
    from tests.utils.factories import make_llama_like

    folder = deployment.data / name
    if not folder.exists():
        make_llama_like(folder, **kwargs)
    return folder


def _import(page: Any, text: str) -> None:
    page.fill("#import-text", text)
    page.click("#import-button")


def _compose_plain(
    page: Any, deployment: Deployment, *, out: str, models: tuple[str, ...] = ("ft1", "ft2")
) -> None:
    page.select_option("#method", "task_arithmetic")
    choose_local_source(page, "#base-row", deployment.data / "base")
    while page.locator("#models-list > .model-row").count() < len(models):
        page.click("#add-model")
    for i, name in enumerate(models):
        choose_local_source(page, f"#models-list > .model-row:nth-child({i + 1})", deployment.data / name)
    page.fill("#output-path", str(deployment.data / out))


# ------------------------------------------------------------------------------------------------ defect 1
def test_mergekit_import_keeps_folders_in_the_data_dirs_local(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    _checkpoint(deployment, "small/ft1", perturb_from=deployment.data / "base", seed=7, scale=0.02)
    _import(
        page,
        "merge_method: task_arithmetic\nbase_model: base\nparameters: {weight: 1.0}\n"
        "models:\n  - model: small/ft1\n",
    )
    page.wait_for_function("() => document.querySelector('#method').value === 'task_arithmetic'")
    row = page.locator("#models-list > .model-row").first
    # mergekit: a path that exists (here, inside the data folders) is a local model, not a Hub repo
    assert row.locator(".src-kind").input_value() == "local"
    assert row.locator(".src-id").input_value() == "small/ft1"
    assert "hf://" not in page.text_content("#yaml-preview")
    page.fill("#output-path", "out-small")
    page.click("#submit")
    wait_for_job_page(page)
    assert wait_for_status(page, "succeeded|failed|cancelled") == "succeeded", page.text_content("#job-error")
    # defect 10: the model card names sources by folder (or Hub id), never by the server's absolute paths
    page.wait_for_selector("#job-card-section:not([hidden])")
    card = page.text_content("#job-card")
    assert "ft1" in card and str(deployment.data) not in card, card
    screenshot(page, artifacts / "mergekit-local-1280.png")

    # a reference that is not on disk is a repo id; the Hub failing says what to do, not the library's words
    page.goto(deployment.url + "/#/")
    page.wait_for_selector("#method option[value=ties]", state="attached")
    page.allowed_http_errors.update({422, 502, 503})
    _import(
        page, "merge_method: linear\nparameters: {weight: 1.0}\nmodels:\n  - model: nobody/nothing-here\n"
    )
    page.wait_for_function("() => document.querySelector('#method').value === 'linear'")
    assert page.locator("#models-list .src-kind").first.input_value() == "hub"
    page.fill("#output-path", "out-hub")
    page.click("#submit")
    page.wait_for_function(
        "() => !document.querySelector('#error-summary').hidden || !document.querySelector('#banner').hidden"
        " || /#\\/jobs\\//.test(location.hash)"
    )
    if "#/jobs/" in page.url:  # pinning off: the worker reports the Hub failure on the job
        wait_for_status(page, "failed")
        shown = page.text_content("#job-error")
    else:
        shown = page.text_content("#error-summary") + page.text_content("#banner")
    assert shown.strip()
    for raw in ("HF_HUB_OFFLINE", "Traceback", "huggingface_hub.", "OfflineModeIsEnabled"):
        assert raw not in shown, shown
    screenshot(page, artifacts / "mergekit-hub-error-1280.png")


# ------------------------------------------------------------------------------------------------ defect 2
def test_validate_runs_the_preflight_and_lists_every_problem_next_to_the_button(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    _checkpoint(deployment, "wide", layers=4, hidden=32, vocab=32, seed=9)
    taken = deployment.data / "taken-out"
    taken.mkdir(exist_ok=True)
    (taken / "keep.txt").write_text("someone's files")
    page.allowed_http_errors.add(422)
    _compose_plain(page, deployment, out="taken-out", models=("ft1", "wide"))
    page.click("#validate")
    result = page.locator("#validate-result.bad")
    result.wait_for()
    # right under the buttons, and every problem at once: a shape mismatch on model 2 and a used output folder
    box = page.evaluate(
        "() => { const b = document.querySelector('#validate-result').getBoundingClientRect();"
        " const a = document.querySelector('#validate').getBoundingClientRect(); return b.top - a.bottom; }"
    )
    assert 0 <= box < 80, box
    summary = page.text_content("#error-summary")
    assert "Model 2" in summary and "shape" in summary and "not empty" in summary, summary
    model2 = page.locator("#models-list > .model-row:nth-child(2) .field-error")
    assert "shape" in model2.first.text_content()
    assert page.get_attribute("#output-path", "aria-invalid") == "true"
    screenshot(page, artifacts / "validate-problems-1280.png")

    # a Hub destination without a Hub token is a problem now, not a failed push later
    page.check("input[name=dest][value=hub]")
    page.fill("#hub-repo", "org/merged")
    choose_local_source(page, "#models-list > .model-row:nth-child(2)", deployment.data / "ft2")
    page.click("#validate")
    page.wait_for_function(
        "() => document.querySelector('#hub-repo').getAttribute('aria-invalid') === 'true'"
    )
    assert "Hub token" in page.text_content("#error-summary")

    # fixed: the plan of the dry run, next to the button
    page.check("input[name=dest][value=local]")
    page.fill("#output-path", str(deployment.data / "validate-fresh"))
    page.click("#validate")
    page.locator("#validate-result.ok").wait_for()
    facts = page.text_content("#plan-facts")
    assert re.search(r"Tensors\d+ merged, \d+ copied", facts), facts
    assert "Estimated peak memory" in facts and re.search(r"\d+(\.\d)? [KM]?B", facts)
    assert page.locator("#error-summary").is_hidden()
    screenshot(page, artifacts / "validate-plan-1280.png")


# ------------------------------------------------------------------------------------------------ defect 5
def test_enter_never_submits_and_cancel_asks_first(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    _compose_plain(page, deployment, out="out-enter")
    submits: list[str] = []
    page.on(
        "request", lambda r: submits.append(r.url) if r.method == "POST" and "/v1/merges" in r.url else None
    )
    for field in ("#output-path", "#models-list .src-id", "#seed", "#job-name"):
        page.locator(field).first.press("Enter")
    page.wait_for_timeout(500)
    assert submits == [] and "#/jobs/" not in page.url
    # the submit button itself still submits, from the keyboard too
    page.focus("#submit")
    page.keyboard.press("Enter")
    wait_for_job_page(page)
    assert len(submits) == 1

    # cancel: a running job asks before it throws its work away
    page.goto(deployment.url + "/#/")
    page.wait_for_selector("#method option[value=ties]", state="attached")
    page.select_option("#method", "ties")
    choose_local_source(page, "#base-row", deployment.data / "big-base")
    page.locator("#models-list > .model-row:nth-child(2) .remove").click()
    choose_local_source(page, "#models-list > .model-row:nth-child(1)", deployment.data / "big-ft")
    page.fill("#output-path", str(deployment.data / "out-confirm-cancel"))
    page.click("#submit")
    wait_for_job_page(page)
    page.wait_for_selector("#job-cancel:not([hidden])")
    page.click("#job-cancel")
    page.locator("#job-cancel-confirm").wait_for()
    assert page.evaluate("document.activeElement.id") == "job-cancel-no"  # the safe choice has focus
    page.click("#job-cancel-no")
    assert page.locator("#job-cancel-confirm").is_hidden()
    status = page.get_attribute("#job-progress", "data-status")
    assert status in {"queued", "running", "succeeded"}  # not cancelled
    if status != "succeeded":
        page.click("#job-cancel")
        screenshot(page, artifacts / "cancel-confirm-1280.png")
        page.click("#job-cancel-yes")
        assert wait_for_status(page, "succeeded|failed|cancelled") in {"cancelled", "succeeded"}


# ------------------------------------------------------------------------------------------------ defect 6
def test_jobs_list_refreshes_and_shows_name_error_output_duration(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    page.goto(deployment.url + "/#/jobs")
    page.wait_for_selector("#status-filters button")
    # a job submitted elsewhere (another tab, the API) shows up without a reload, and moves on by itself
    import httpx

    recipe = {
        "method": "task_arithmetic",
        "base": str(deployment.data / "base"),
        "models": [{"source": str(deployment.data / "ft1")}],
        "output": {"path": str(deployment.data / "out-listed")},
    }
    created = httpx.post(
        f"{deployment.url}/v1/merges",
        json=recipe,
        headers={"Authorization": f"Bearer {deployment.token}"},
        timeout=30,
    ).json()
    row = page.locator(f"#jobs-body tr[data-id='{created['id']}']")
    row.wait_for()
    page.wait_for_function(
        f"() => document.querySelector(\"#jobs-body tr[data-id='{created['id']}'] .status\")?.textContent"
        " === 'succeeded'",
        timeout=60_000,
    )
    # the refresh never takes keyboard focus away from a row
    row.locator("a").first.focus()
    page.wait_for_timeout(2500)
    assert page.evaluate("document.activeElement.closest('#jobs-body tr')?.dataset.id") == created["id"]
    cells = row.locator("td").all_text_contents()
    assert "task_arithmetic" in cells and "out-listed" in cells, cells
    assert re.search(r"^\d+ s$", cells[7]), cells  # duration

    # a failed job names its error code in the list; a name given at submit identifies it
    _checkpoint(deployment, "wide", layers=4, hidden=32, vocab=32, seed=9)
    page.goto(deployment.url + "/#/")
    page.wait_for_selector("#method option[value=ties]", state="attached")
    _compose_plain(page, deployment, out="never-written-6", models=("ft1", "wide"))  # shapes differ
    page.fill("#job-name", "mismatched run")
    page.click("#submit")
    job_id = wait_for_job_page(page)
    assert wait_for_status(page, "succeeded|failed|cancelled") == "failed"
    page.goto(deployment.url + "/#/jobs")
    named = page.locator(f"#jobs-body tr[data-id='{job_id}']")
    named.wait_for()
    assert "mismatched run" in named.locator("td").nth(1).text_content()
    assert named.locator(".error-code").text_content().strip() == "incompatible_models"
    screenshot(page, artifacts / "jobs-live-1280.png")


# ------------------------------------------------------------------------------------------------ defect 7
def test_a_job_link_in_a_new_tab_asks_for_the_token_and_drafts_survive_a_reload(
    page: Any, browser: Any, deployment: Deployment, artifacts: Path
) -> None:
    _compose_plain(page, deployment, out="out-draft")
    page.fill("#f-params-lambda", "0.7")
    page.click("#tokens summary") if not page.is_visible("#hf-token") else None
    page.fill("#hf-token", "hf_never_stored_456")
    page.click("#submit")
    job_id = wait_for_job_page(page)
    wait_for_status(page, "succeeded|failed|cancelled")

    # a new tab (no token in its sessionStorage): no empty job with a live Cancel button; the token is asked for
    other = browser.new_context(viewport={"width": 1280, "height": 900})
    tab = other.new_page()
    errors: list[str] = []
    tab.on("pageerror", lambda exc: errors.append(str(exc)))
    tab.goto(f"{deployment.url}/#/jobs/{job_id}")
    tab.wait_for_selector("#banner:not([hidden])")
    assert tab.locator("#job-cancel").is_hidden()
    assert tab.evaluate("document.activeElement.id") == "api-token"
    screenshot(tab, artifacts / "job-link-new-tab-1280.png")
    tab.fill("#api-token", deployment.token)
    tab.press("#api-token", "Enter")
    tab.wait_for_function("() => document.querySelector('#job-progress').dataset.status === 'succeeded'")
    assert job_id[:8] in tab.text_content("#job-title")
    other.close()
    assert not errors, errors

    # the draft survives a reload; the Hub token never lands in storage
    page.goto(deployment.url + "/#/")
    page.wait_for_selector("#method option[value=ties]", state="attached")
    page.fill("#output-path", str(deployment.data / "out-draft-2"))
    page.reload()
    page.wait_for_function("() => document.querySelector('#method').value === 'task_arithmetic'")
    assert page.input_value("#output-path") == str(deployment.data / "out-draft-2")
    assert page.input_value("#f-params-lambda") == "0.7"
    stored = page.evaluate("JSON.stringify([{...sessionStorage}, {...localStorage}, document.cookie])")
    assert "hf_never_stored_456" not in stored and "out-draft-2" in stored
    # edit and resubmit: a job's recipe comes back into the form
    page.goto(f"{deployment.url}/#/jobs/{job_id}")
    page.wait_for_selector("#job-edit:not([hidden])")
    page.click("#job-edit")
    page.wait_for_function("() => location.hash === '#/'")
    assert page.input_value("#f-params-lambda") == "0.7"
    assert page.input_value("#output-path") == ""  # the finished job's folder is taken
    # start over clears the draft
    page.click("#reset-form")
    assert page.input_value("#output-path") == ""
    assert "out-draft" not in page.evaluate("localStorage.getItem('alloy.draft') || ''")


# ------------------------------------------------------------------------------------------------ defect 8
def test_error_text_counts_like_the_form_clears_when_fixed_and_shows_yaml_positions(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    page.allowed_http_errors.update({400, 422})
    _compose_plain(page, deployment, out="never-written-8")
    row2 = "#models-list > .model-row:nth-child(2)"
    page.fill(f"{row2} .src-weight", "500")
    page.fill("#f-params-lambda", "x")
    page.click("#submit")
    page.wait_for_selector("#error-summary:not([hidden])")
    summary = page.text_content("#error-summary")
    assert "Model 2" in summary and "models.1" not in summary, summary
    assert page.locator("#error-summary li").count() == 2
    # fixing a field clears its error at once, and the summary counts what is left
    page.fill(f"{row2} .src-weight", "0.5")
    assert page.locator(f"{row2} .field-error").count() == 0
    assert page.get_attribute(f"{row2} .src-weight", "aria-invalid") is None
    assert page.locator("#error-summary li").count() == 1
    assert "1 problem" in page.text_content("#error-summary p")
    page.fill("#f-params-lambda", "0.8")
    assert page.locator("#error-summary").is_hidden()

    # an import error is printed once, with its line and column for YAML
    _import(page, "merge_method: ties\nmodels:\n  - model: a\n   bad: [1\n")
    page.wait_for_function("() => document.querySelector('#import-errors').textContent.trim().length > 0")
    text = page.text_content("#import-errors")
    assert re.search(r"line \d+, column \d+", text), text
    assert text.count("not valid YAML") == 1, text
    screenshot(page, artifacts / "errors-1280.png")


# ------------------------------------------------------------------------------------------------ defect 10
def test_a_decimal_comma_is_called_out_and_lines_is_offered_only_where_it_applies(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    page.select_option("#method", "task_arithmetic")
    page.fill("#f-params-lambda", "1,0")
    note = page.locator("#f-params-lambda >> xpath=ancestor::div[contains(@class,'field')][1]").locator(
        ".field-note"
    )
    assert "gradient" in note.text_content() and "1.0" in note.text_content()
    assert "lambda: [1, 0]" in page.text_content("#yaml-preview")
    page.fill("#f-params-lambda", "1.0")
    assert note.count() == 0
    assert page.is_visible("#lines-fieldset")
    for method in ("lines", "linear", "model_soup", "slerp"):
        page.select_option("#method", method)
        assert page.locator("#lines-fieldset").is_hidden(), method
        assert "lines:" not in page.text_content("#yaml-preview")
    page.select_option("#method", "ties")
    assert page.is_visible("#lines-fieldset")
    screenshot(page, artifacts / "traps-1280.png")


# ------------------------------------------------------------------------------------------------ defect 9
@pytest.mark.parametrize("page", [390], indirect=True)
def test_charts_show_only_panels_with_data_and_stay_readable_at_390px(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    shown = page.evaluate("""() => {
        const tensors = [0, 1, 2, 3].map((layer) => ({name: `model.layers.${layer}.mlp.up_proj.weight`,
            action: 'merge', shape: [16, 16], layer, kept_density: 0.3 + 0.023 * layer}));
        const figs = AlloyCharts.fromReport({tensors}, {kind: 'merge'});
        const box = document.querySelector('#main');
        box.prepend(...figs);
        const out = figs.map((f) => {
            const ticks = [...f.querySelectorAll('text.tick')];
            const yTicks = ticks.filter((t) => t.getAttribute('text-anchor') === 'end').map((t) => Number(t.textContent));
            return {
                caption: f.querySelector('figcaption').textContent,
                missing: f.classList.contains('chart-missing'),
                yTop: Math.max(...yTicks),
                hovers: [...f.querySelectorAll('title')].map((t) => t.textContent),
                tickPx: Math.min(...ticks.map((t) => t.getBoundingClientRect().height)),
            };
        });
        return out;
    }""")
    # a plain sparsifying merge: only the panel it has data for, no placeholders
    assert [f["caption"] for f in shown] == ["Density kept per layer"], shown
    figure = shown[0]
    assert not figure["missing"]
    assert figure["yTop"] >= 0.3 + 0.023 * 3  # the axis shows a value at or above the highest point
    assert figure["hovers"] and all(h.startswith("layer ") for h in figure["hovers"]), figure["hovers"]
    assert figure["tickPx"] >= 10, figure  # readable on a phone
    assert page.evaluate("document.documentElement.scrollWidth") <= 390
    screenshot(page, artifacts / "charts-390.png")
    # a report without per-layer statistics: one note, not five empty panels
    empty = page.evaluate(
        "() => AlloyCharts.fromReport({tensors: [{name: 'w', action: 'merge', shape: [2]}]}, {kind: 'merge'})"
        ".map((f) => f.classList.contains('chart-missing'))"
    )
    assert empty == [True]


# ------------------------------------------------------------------------------------------------ defect 4
def test_a_first_pass_is_its_own_phase_counted_in_bytes_and_cancel_acts_in_it(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    import time

    _checkpoint(deployment, "huge-base", layers=24, hidden=512, vocab=64, seed=11)
    _checkpoint(deployment, "huge-ft", perturb_from=deployment.data / "huge-base", seed=12, scale=0.02)
    page.select_option("#method", "compeft")  # scope global: two first passes over every merged tensor
    choose_local_source(page, "#base-row", deployment.data / "huge-base")
    page.locator("#models-list > .model-row:nth-child(2) .remove").click()
    choose_local_source(page, "#models-list > .model-row:nth-child(1)", deployment.data / "huge-ft")
    page.fill("#output-path", str(deployment.data / "out-first-pass"))
    page.click("#submit")
    wait_for_job_page(page)
    page.wait_for_function(
        "() => /First pass/.test(document.querySelector('#job-progress-text').textContent)"
        " || ['succeeded', 'failed', 'cancelled'].includes(document.querySelector('#job-progress').dataset.status)"
    )
    text = page.text_content("#job-progress-text")
    assert "First pass: global statistics" in text, text
    # progress of the pass in bytes, moving (not 0 % for the whole first pass)
    page.wait_for_function(
        "() => Number(document.querySelector('#job-progress').getAttribute('aria-valuenow')) > 0"
        " || !/First pass/.test(document.querySelector('#job-progress-text').textContent)"
    )
    text = page.text_content("#job-progress-text")
    assert re.search(r"\d+(\.\d)? [KM]B / \d+(\.\d)? [KM]B", text), text
    screenshot(page, artifacts / "first-pass-1280.png")
    if "First pass" not in text:
        pytest.skip("the first pass ended before the cancel could be tried on this machine")
    page.click("#job-cancel")
    started = time.monotonic()
    page.click("#job-cancel-yes")
    assert wait_for_status(page, "succeeded|failed|cancelled") == "cancelled", deployment.logs()
    took = time.monotonic() - started
    # the worker stops at the next tensor of the pass; the rest is the ticker's poll and the event stream
    assert took < 3.0, took
    assert not (deployment.data / "out-first-pass").exists()


# ------------------------------------------------------------------------------------------------ features
def test_gallery_sweep_compare_and_file_list(page: Any, deployment: Deployment, artifacts: Path) -> None:
    # a README example is a starting point, loaded like a pasted recipe
    titles = page.locator("#gallery option").all_text_contents()
    assert "task negation: forget a skill" in titles, titles
    page.select_option("#gallery", label="task negation: forget a skill")
    page.click("#gallery-load")
    page.wait_for_function("() => document.querySelector('#method').value === 'task_arithmetic'")
    assert float(page.locator("#models-list .src-weight").first.input_value()) == -1.0
    assert page.input_value("#f-params-lambda") == "0.5"

    # a sweep over λ is one batch with a job per value
    page.click("#reset-form")
    _compose_plain(page, deployment, out="sweep-out")
    page.click("#sweep summary")
    page.select_option("#sweep-param", "lambda")
    page.fill("#sweep-values", "0.3, 0.9")
    page.click("#sweep-submit")
    page.wait_for_function("() => /^#\\/batches\\//.test(location.hash)")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#batch-body .status')].filter(s => s.textContent === 'succeeded')"
        ".length === 2",
        timeout=60_000,
    )
    links = page.locator("#batch-body td:nth-child(2) a").all_text_contents()
    assert sorted(link.split(" ")[0] for link in links) == ["lambda=0.3", "lambda=0.9"], links
    assert (deployment.data / "sweep-out-lambda-0.3").is_dir() and (
        deployment.data / "sweep-out-lambda-0.9"
    ).is_dir()
    screenshot(page, artifacts / "sweep-batch-1280.png")

    # compare the two: the swept value differs, the rest of the recipe is the same
    for box in page.locator("#batch-body .compare-pick").all():
        box.check()
    page.click("#batch-compare")
    page.wait_for_selector("#compare-body tr")
    differing = {
        row.locator("td").first.text_content(): row.locator("td").all_text_contents()[1:]
        for row in page.locator("#compare-body tr.differs").all()
    }
    assert sorted(differing["recipe.params.lambda"]) == ["0.3", "0.9"], differing
    assert "recipe.method" not in differing
    assert page.locator("#compare-body tr", has_text="totals.merged").count() == 1
    screenshot(page, artifacts / "compare-1280.png")

    # a finished job lists its files with sizes
    page.go_back()
    page.wait_for_selector("#batch-body a")
    page.locator("#batch-body td:nth-child(2) a").first.click()
    page.wait_for_selector("#job-files-section:not([hidden])")
    files = page.locator("#job-files-body td:first-child").all_text_contents()
    assert "alloy-report.json" in files and any(f.endswith(".safetensors") for f in files), files
    assert re.search(r"\d+ files, \d+(\.\d)? [KM]?B in ", page.text_content("#job-files-summary"))
    screenshot(page, artifacts / "files-1280.png")


def test_dark_theme_follows_the_system(browser: Any, deployment: Deployment, artifacts: Path) -> None:
    for scheme, dark in (("dark", True), ("light", False)):
        context = browser.new_context(viewport={"width": 390, "height": 900}, color_scheme=scheme)
        tab = context.new_page()
        errors: list[str] = []
        tab.on("pageerror", lambda exc, errors=errors: errors.append(str(exc)))
        tab.on("console", lambda msg, errors=errors: errors.append(msg.text) if msg.type == "error" else None)
        tab.goto(deployment.url + "/")
        tab.fill("#api-token", deployment.token)
        tab.press("#api-token", "Enter")
        tab.wait_for_selector("#method option[value=ties]", state="attached")
        background = tab.evaluate("getComputedStyle(document.documentElement).backgroundColor")
        channels = [int(c) for c in re.findall(r"\d+", background)[:3]]
        assert (sum(channels) < 150) == dark, (scheme, background)
        assert tab.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(tab, artifacts / f"compose-{scheme}-390.png")
        context.close()
        assert not errors, errors
