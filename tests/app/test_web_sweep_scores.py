"""A sweep's comparison table (issue 16), in headless Chromium against the real API, a Celery worker and Redis:
a λ list with an evaluator set (aTLAS on a tiny BERT classifier, which trains on the evaluator's loss) becomes a
batch whose page shows, once its jobs finish, one table: the value, each job's status, the evaluator's score, the
best marked; a plain sweep (no evaluator) shows the values and says why there is no score. At 1280 and 390 px.

Own deployment (its models are a sequence classifier and its few-shot data); the page fixtures of
``test_web_form``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.app import test_web_form as web
from tests.app.test_web_form import Deployment, choose_local_source, running_deployment, screenshot

browser, page, artifacts = web.browser, web.page, web.artifacts

pytestmark = pytest.mark.browser


def _classifier_models(data: Path) -> None:
    import torch
    import transformers

    from tests.merge_ops.test_evaluators import (
        TEXTS,
        save_model,
        state_dict_of,
        tiny_bert_config,
        write_jsonl,
    )
    from tests.utils.factories import make_checkpoint

    torch.manual_seed(0)
    base = save_model(
        transformers.BertForSequenceClassification(tiny_bert_config(num_labels=2)), data / "base"
    )
    weights = state_dict_of(base)
    for i, name in enumerate(("task_a", "task_b")):
        gen = torch.Generator().manual_seed(10 + i)
        tuned = {
            n: t + 0.2 * torch.randn(t.shape, generator=gen) if t.is_floating_point() else t
            for n, t in weights.items()
        }
        make_checkpoint(data / name, tuned)
    write_jsonl(data / "shots.jsonl", [{"text": t, "label": i % 2} for i, t in enumerate(TEXTS)] * 2)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    pytest.importorskip("transformers")
    with running_deployment(
        tmp_path_factory.mktemp("web-sweep"), env_extra={}, make_models=_classifier_models
    ) as d:
        yield d


def _compose(page: Any, deployment: Deployment, *, method: str, out: str) -> None:
    page.select_option("#method", method)
    choose_local_source(page, "#base-row", deployment.data / "base")
    for i, name in enumerate(("task_a", "task_b")):
        choose_local_source(page, f"#models-list > .model-row:nth-child({i + 1})", deployment.data / name)
    page.fill("#output-path", str(deployment.data / out))


def _sweep(page: Any, param: str, values: str) -> None:
    page.click("#sweep summary")
    page.select_option("#sweep-param", param)
    page.fill("#sweep-values", values)
    page.click("#sweep-submit")
    page.wait_for_function("() => /^#\\/batches\\//.test(location.hash)")


def _rows(page: Any) -> list[list[str]]:
    return [row.locator("td").all_text_contents() for row in page.locator("#sweep-body tr").all()]


@pytest.mark.parametrize("page", [1280, 390], indirect=True)
def test_a_sweep_with_an_evaluator_ranks_its_jobs_by_score(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    width = page.viewport_size["width"]
    _compose(page, deployment, method="atlas", out=f"atlas-{width}")
    page.wait_for_selector("#evaluator-fieldset:not([hidden])")
    page.select_option("#evaluator-kind", "sequence_classification_accuracy")
    page.fill("#evaluator-data", str(deployment.data / "shots.jsonl"))
    page.fill("#f-params-steps", "3")
    _sweep(page, "lambda", "0.1, 0.5, 1.5")
    # the table is there while the jobs run; the best is marked once all have ended
    page.wait_for_selector("#sweep-results:not([hidden])")
    page.wait_for_function(
        "() => document.querySelectorAll('#sweep-body tr').length === 3 && "
        "[...document.querySelectorAll('#sweep-body .status')].every(s => s.textContent === 'succeeded')"
        " && document.querySelector('#sweep-body .best-mark')",
        timeout=120_000,
    )
    assert page.text_content("#sweep-param-head") == "lambda"
    assert page.text_content("#sweep-score-head") == "Final loss (lower is better)"
    rows = _rows(page)
    assert [r[0] for r in rows] == ["0.1", "0.5", "1.5"], rows
    assert [r[1] for r in rows] == ["lambda=0.1", "lambda=0.5", "lambda=1.5"], rows

    # the scores are each job's final aTLAS loss, and the marked one is the lowest
    losses = {
        lam: json.loads((deployment.data / f"atlas-{width}-lambda-{lam}" / "alloy-report.json").read_text())[
            "atlas"
        ]["losses"][-1]
        for lam in ("0.1", "0.5", "1.5")
    }
    shown = [page.evaluate("(v) => Charts.fmt(v)", losses[r[0]]) for r in rows]
    assert [r[3].removesuffix(" ★ best") for r in rows] == shown, (rows, losses)
    best = min(losses, key=lambda lam: losses[lam])
    marked = [r[0] for r in rows if r[3].endswith("★ best")]
    assert marked == [best], (rows, losses)
    assert page.locator("#sweep-body tr.best").count() == 1
    assert page.evaluate("document.documentElement.scrollWidth") <= width
    # the score column is in view without scrolling the table sideways
    right = page.evaluate(
        "document.querySelector('#sweep-body tr.best td.score').getBoundingClientRect().right"
    )
    assert right <= width, right
    # keyboard: Tab reaches a job link in the table and Enter opens that job
    page.locator("#sweep-body tr.best a").focus()
    page.keyboard.press("Enter")
    page.wait_for_function("() => /^#\\/jobs\\//.test(location.hash)")
    page.go_back()
    page.wait_for_selector("#sweep-body tr.best")
    page.locator("#sweep-results").scroll_into_view_if_needed()
    screenshot(page, artifacts / f"sweep-scores-{width}.png")


def test_a_sweep_without_an_evaluator_lists_values_and_says_why_no_score(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    _compose(page, deployment, method="task_arithmetic", out="plain")
    _sweep(page, "lambda", "0.4, 0.8")
    page.wait_for_function(
        "() => [...document.querySelectorAll('#sweep-body .status')].filter(s => s.textContent === 'succeeded')"
        ".length === 2 && /No scores/.test(document.querySelector('#sweep-results-note').textContent)",
        timeout=60_000,
    )
    rows = _rows(page)
    assert [r[0] for r in rows] == ["0.4", "0.8"] and all(r[3] == "–" for r in rows), rows
    assert page.locator("#sweep-body .best-mark").count() == 0
    screenshot(page, artifacts / "sweep-no-scores-1280.png")
