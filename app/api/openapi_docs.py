"""OpenAPI pieces FastAPI can't infer: raw-body routes (JSON or YAML recipes) and problem+json responses.

Recipe bodies are read by hand (YAML, mergekit translation, every error at once), so their schemas are added to
``components`` here: ``Recipe`` plus one ``Recipe_<method>`` per catalog entry with that method's params model,
joined in ``RecipeRequest`` as a union discriminated by ``method`` — openapi.yaml documents every method.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.schemas import AnalysisRequest, BatchRequest, Problem
from merge_ops.params import CATALOG
from merge_ops.recipe import Recipe

REF = "#/components/schemas/{model}"
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
PROBLEM_CONTENT = {"application/problem+json": {"schema": PROBLEM_REF}}


def problem_responses(described: list[tuple[int, str]]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for problem-detail answers: status -> description."""
    return {status: {"description": text, "content": PROBLEM_CONTENT} for status, text in described}


PROBLEM_RESPONSES = problem_responses(
    [
        (400, "Malformed body or cursor"),
        (401, "Missing or invalid API token"),
        (404, "Not found"),
        (409, "Conflict with the job's state"),
        (413, "Body too large"),
        (415, "Unsupported Content-Type"),
        (422, "Validation failed; `errors` lists every problem"),
        (429, "Rate limited; see Retry-After"),
        (503, "Queue unreachable"),
    ]
)

#: the Hub search's own answers, beside the common ones (``merge_ops.errors`` Hub errors)
HUB_SEARCH_RESPONSES = problem_responses(
    [
        (403, "The caller's Hub token is refused (`hub_access_denied`)"),
        (502, "The Hub answered with an error (`hub_error`)"),
        (503, "The Hub is unreachable (`hub_unavailable`)"),
    ]
)


def recipe_request_body() -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/RecipeRequest"}},
                "application/yaml": {
                    "schema": {"type": "string", "description": "An Alloy or mergekit YAML recipe."}
                },
            },
        }
    }


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}},
        }
    }


def extra_components() -> dict[str, Any]:
    """Schemas referenced by the hand-written request bodies and problem responses."""
    params_models = {info.params for info in CATALOG.values()}
    models: list[type[BaseModel]] = [
        Recipe,
        BatchRequest,
        AnalysisRequest,
        Problem,
        *sorted(params_models, key=lambda m: m.__name__),
    ]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    variants = {}
    for name, info in CATALOG.items():
        variant = f"Recipe_{name}"
        schemas[variant] = {
            "title": variant,
            "description": f"{info.pretty_name}: {info.summary} ({info.reference_url})",
            "allOf": [{"$ref": REF.format(model="Recipe")}],
            "type": "object",
            "properties": {
                "method": {"type": "string", "enum": [name]},
                "params": {"$ref": REF.format(model=info.params.__name__)},
            },
            "required": ["method"],
        }
        variants[name] = REF.format(model=variant)
    schemas["RecipeRequest"] = {
        "title": "RecipeRequest",
        "description": "An Alloy recipe; `params` follow the chosen method's params model (a param may also be "
        "a list of numbers, interpolated over layer depth).",
        "oneOf": [{"$ref": ref} for ref in variants.values()],
        "discriminator": {"propertyName": "method", "mapping": variants},
    }
    return schemas


def _job_links(*operations: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI links from a response carrying a job to the operations on it (clients and stateful tests
    follow them)."""
    return {
        202: {
            "links": {
                name: {"operationId": f"merges-{name}", "parameters": {"job_id": "$response.body#/id"}}
                for name in operations
            }
        }
    }


JOB_LINKS = _job_links("get_merge", "get_merge_report", "cancel_merge", "stream_merge_events")
