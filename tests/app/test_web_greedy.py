"""The web form's greedy-soup surface: the Evaluator fieldset, the held-out upload through POST /v1/files, evaluator
errors next to their fields, and the job page's table of ingredient scores. Reuses test_web_form's deployment
(real API + Celery worker + Redis, headless Chromium) and its page fixture, which fails a test on console errors.
"""

from __future__ import annotations

import hashlib
import shutil
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

# test_web_form's fixtures, shared by name: one deployment per module, a fresh tab per test
deployment = web.deployment
browser = web.browser
page = web.page
artifacts = web.artifacts

HELDOUT = b'{"text": "the cat sat on the mat"}\n{"text": "a dog ran on the mat"}\n'


def evaluator_model_folder(deployment: Deployment) -> Path:
    """The base's architecture with a real word-level tokenizer (the factory's tokenizer.json is a dummy)."""
    from tests.merge_ops.test_evaluators import write_tokenizer

    folder = deployment.data / "soup-eval"
    if not folder.exists():
        shutil.copytree(deployment.data / "base", folder)
        (folder / "tokenizer.json").unlink()
        write_tokenizer(folder)
    return folder


def compose_greedy_soup(page: Any, deployment: Deployment, *, out: str) -> None:
    page.select_option("#method", "greedy_soup")
    page.wait_for_selector("#evaluator-fieldset:not([hidden])")
    choose_local_source(page, "#base-row", deployment.data / "base")
    while page.locator("#models-list > .model-row").count() < 2:
        page.click("#add-model")
    for i, name in enumerate(("ft1", "ft2")):
        choose_local_source(page, f"#models-list > .model-row:nth-child({i + 1})", deployment.data / name)
    page.fill("#output-path", str(deployment.data / out))


@pytest.mark.browser
def test_greedy_soup_upload_preview_errors_and_submit(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    # the fieldset belongs to greedy soup only
    page.select_option("#method", "ties")
    assert page.locator("#evaluator-fieldset").is_hidden()
    assert "evaluator" not in page.text_content("#yaml-preview")
    compose_greedy_soup(page, deployment, out="out-soup")

    page.set_input_files(
        "#evaluator-file",
        files=[{"name": "heldout.jsonl", "mimeType": "application/x-ndjson", "buffer": HELDOUT}],
    )
    stored = deployment.data / "uploads" / f"{hashlib.sha256(HELDOUT).hexdigest()}.jsonl"
    page.wait_for_function(
        "(p) => document.querySelector('#evaluator-data').value === p", arg=str(stored.resolve())
    )
    assert stored.read_bytes() == HELDOUT
    assert "2 rows" in page.text_content("#evaluator-upload-status")
    page.fill("#evaluator-max-examples", "2")
    page.fill("#evaluator-model", str(evaluator_model_folder(deployment)))
    preview = page.text_content("#yaml-preview")
    for line in (
        "method: greedy_soup",
        "evaluator:",
        "kind: causal_lm_loss",
        f"data: {stored.resolve()}",
        "max_examples: 2",
    ):
        assert line in preview, preview
    screenshot(page, artifacts / "compose-greedy-soup-1280.png")

    # a held-out path outside the data dirs is reported next to the data field
    page.allowed_http_errors.add(422)
    page.fill("#evaluator-data", "../outside.jsonl")
    page.click("#submit")
    error = page.locator("#evaluator-data >> xpath=ancestor::div[contains(@class,'field')][1]").locator(
        ".field-error"
    )
    error.wait_for()
    assert "'..'" in error.text_content()
    assert page.get_attribute("#evaluator-data", "aria-invalid") == "true"
    assert "#/jobs/" not in page.url

    # with the uploaded path the submission is accepted (202) and the job page opens
    page.fill("#evaluator-data", str(stored.resolve()))
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/v1/merges") else None)
    page.click("#submit")
    # the earlier error summary stays up until the form navigates, so wait for the job page itself
    page.wait_for_function("() => /^#\\/jobs\\/[0-9a-f-]+$/.test(location.hash)")
    job_id = wait_for_job_page(page)
    assert statuses == [202]
    # the tiny llama-like models score the held-out text with causal_lm_loss; the job page tabulates the scores
    assert wait_for_status(page, "succeeded|failed|cancelled") == "succeeded", (
        page.text_content("#job-error") or ""
    )
    page.wait_for_selector("#job-soup-section:not([hidden])")
    rows = page.locator("#job-soup-body tr")
    assert rows.count() == 2
    sources = rows.locator("td:nth-child(2)").all_text_contents()
    assert [Path(s).name for s in sources] == ["ft1", "ft2"]
    verdicts = rows.locator("td:nth-child(5)").all_text_contents()
    assert "chosen" in verdicts and set(verdicts) <= {"chosen", "rejected"}
    assert job_id in page.url
    screenshot(page, artifacts / "job-greedy-soup-1280.png")


@pytest.mark.browser
def test_bad_upload_is_reported_and_leaves_the_path_alone(page: Any, deployment: Deployment) -> None:
    compose_greedy_soup(page, deployment, out="never-written")
    page.fill("#evaluator-data", "kept.jsonl")
    page.allowed_http_errors.add(422)
    page.set_input_files(
        "#evaluator-file",
        files=[{"name": "bad.jsonl", "mimeType": "application/x-ndjson", "buffer": b"[1]\n"}],
    )
    page.wait_for_function(
        "() => /Upload failed/.test(document.querySelector('#evaluator-upload-status').textContent)"
    )
    assert "not a JSON object" in page.text_content("#evaluator-upload-status")
    assert page.input_value("#evaluator-data") == "kept.jsonl"


@pytest.mark.browser
def test_job_page_table_shows_scores_and_the_chosen_ingredients(page: Any) -> None:
    # the renderer alone, on a report shaped like merge_ops.greedy_soup.GreedySoupResult
    rows = page.evaluate("""() => {
        document.querySelector('#job-soup-section').hidden = true;
        renderGreedySoup({greedy_soup: {
            ingredients: [{index: 0, source: 'ft-a', score: -2.5}, {index: 1, source: 'ft-b', score: -2.0},
                          {index: 2, source: 'ft-c', score: -3.25}],
            order: [1, 0, 2],
            steps: [{index: 0, score: -1.75, accepted: true}, {index: 2, score: -1.9, accepted: false}],
            chosen: [1, 0], final_score: -1.75, evaluations: 5, seconds: 0.1}});
        return [...document.querySelectorAll('#job-soup-body tr')].map(
            (tr) => [...tr.children].map((td) => td.textContent)); }""")
    assert rows == [
        ["1", "ft-a", "-2.5000", "-1.7500", "chosen"],
        ["2", "ft-b", "-2.0000", "–", "chosen"],
        ["3", "ft-c", "-3.2500", "-1.9000", "rejected"],
    ]
    assert page.locator("#job-soup-section").get_attribute("hidden") is None
    assert "2 of 3 ingredients chosen" in page.text_content("#job-soup-summary")
    # a report without greedy_soup hides the table
    page.evaluate("() => renderGreedySoup({method: 'ties'})")
    assert page.locator("#job-soup-section").get_attribute("hidden") is not None
