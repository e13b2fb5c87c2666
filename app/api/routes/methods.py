"""/v1/methods: the method catalog (torch-free), for clients and the web form."""

from __future__ import annotations

from functools import cache

from fastapi import APIRouter

from app.api.openapi_docs import PROBLEM_RESPONSES
from app.schemas import MethodOut
from merge_ops.params import CATALOG, default_params

router = APIRouter(prefix="/methods", tags=["methods"], responses={401: PROBLEM_RESPONSES[401]})


@cache
def _catalog() -> tuple[MethodOut, ...]:
    return tuple(
        MethodOut(
            name=info.name,
            pretty_name=info.pretty_name,
            reference_url=info.reference_url,
            summary=info.summary,
            needs_base=info.needs_base,
            kind=info.kind,
            default_scope=info.default_scope.value,
            min_models=info.min_models,
            # LiNeS scales a merged task vector per layer: not for soups, LiNeS itself, or interpolations
            lines_applies=info.kind == "task_vector"
            and info.needs_base
            and not info.needs_base_weights
            and info.name != "lines",
            params_schema=info.params.model_json_schema(by_alias=True),
            defaults=default_params(info.params),
        )
        for info in CATALOG.values()
    )


@router.get("", response_model=list[MethodOut], summary="List merge methods")
def list_methods() -> list[MethodOut]:
    """Every registered method: name, paper, defaults and the JSON schema of its params."""
    return list(_catalog())
