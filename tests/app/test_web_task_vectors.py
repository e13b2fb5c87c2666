"""Task-vector norms and cosines of a merge (issue 16), in headless Chromium against the real API, a Celery
worker and Redis: a plain merge submitted from the form reports per-layer norms and pairwise cosines
(``totals.task_vectors`` of ``alloy-report.json``), and the job page draws them: a norm chart per layer with a
line per model, a cosine heatmap for the whole model, readable at 390 px.

Shares the deployment and page fixtures of ``test_web_form`` (one deployment per module).
"""

from __future__ import annotations

import json
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

deployment, browser, page, artifacts = web.deployment, web.browser, web.page, web.artifacts

pytestmark = pytest.mark.browser


@pytest.mark.parametrize("page", [1280, 390], indirect=True)
def test_a_plain_merge_draws_its_task_vector_norms_and_cosines(
    page: Any, deployment: Deployment, artifacts: Path
) -> None:
    width = page.viewport_size["width"]
    out = deployment.data / f"out-tv-{width}"
    page.select_option("#method", "task_arithmetic")  # the fused path: no method statistics of its own
    choose_local_source(page, "#base-row", deployment.data / "base")
    for i, name in enumerate(("ft1", "ft2")):
        choose_local_source(page, f"#models-list > .model-row:nth-child({i + 1})", deployment.data / name)
    page.fill("#output-path", str(out))
    page.click("#submit")
    wait_for_job_page(page)
    assert wait_for_status(page, "succeeded|failed|cancelled") == "succeeded", page.text_content("#job-error")
    page.wait_for_selector("#job-charts figure")

    stats = json.loads((out / "alloy-report.json").read_text())["totals"]["task_vectors"]
    assert [row["layer"] for row in stats["layers"]] == [0, 1, 2, 3]
    norms = page.locator("#job-charts figure", has_text="Task-vector norm per layer")
    hovers = norms.locator("svg circle title").all_text_contents()
    assert len(hovers) == 2 * 4, hovers  # a line per model, a point per layer
    legend = norms.locator(".legend li").all_text_contents()
    assert [label.rsplit("/", 1)[-1] for label in legend] == ["ft1", "ft2"], legend
    drawn = {h for h in hovers}
    for i, label in enumerate(legend):
        for row in stats["layers"]:
            value = page.evaluate("(v) => Charts.fmt(v)", row["norms"][i])
            assert f"{label} · layer {row['layer']}: {value}" in drawn, (label, row, drawn)

    heatmap = page.locator("#job-charts figure", has_text="Cosine similarity of the task vectors")
    cells = heatmap.locator("svg text.cell").all_text_contents()
    expected = [page.evaluate("(v) => Charts.fmt(v)", v) for row in stats["cosine"] for v in row]
    assert cells == expected and cells[0] == "1" and cells[3] == "1", (cells, stats["cosine"])
    per_layer = page.locator("#job-charts figure", has_text="Cosine of the task vectors per layer")
    assert per_layer.locator("svg circle").count() == 4  # one pair, a point per layer

    assert page.evaluate("document.documentElement.scrollWidth") <= width
    tick_px = page.evaluate(
        "Math.min(...[...document.querySelectorAll('#job-charts text.tick')]"
        ".map((t) => t.getBoundingClientRect().height))"
    )
    assert tick_px >= 10, tick_px
    page.locator("#job-charts-section").scroll_into_view_if_needed()
    screenshot(page, artifacts / f"task-vectors-{width}.png")

    # the compare view lines up fields, not the per-layer matrices
    flat = page.evaluate("() => Object.keys(withoutTaskVectors({merged: 1, task_vectors: {norms: [1]}}))")
    assert flat == ["merged"]
