"""/v1/sources: find a model before merging it — the data folders as a browser, and Hub search by repo id."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app.api.deps import CurrentToken, HfToken, SettingsDep
from app.api.openapi_docs import HUB_SEARCH_RESPONSES, PROBLEM_RESPONSES
from app.schemas import FolderListing, HubSearch
from app.services.hub_search import search_hub
from app.services.local_models import list_folder

router = APIRouter(prefix="/sources", tags=["sources"], responses=PROBLEM_RESPONSES)


@router.get("/local", response_model=FolderListing, summary="Browse the data folders")
def list_local_sources(
    settings: SettingsDep,
    caller: CurrentToken,
    path: Annotated[
        str | None,
        Query(
            max_length=4096,
            description="A folder inside the data dirs (absolute, or relative to one); "
            "empty: the data dirs themselves.",
        ),
    ] = None,
) -> FolderListing:
    """The sub-folders of ``path``, each checkpoint with its architecture (config.json) and its parameter count
    and size (safetensors headers only). ``..``, symlinks out and paths elsewhere: 422 ``path_not_allowed``."""
    return list_folder(path, roots=settings.data_dirs)


@router.get("/hub", response_model=HubSearch, summary="Search the Hub", responses=HUB_SEARCH_RESPONSES)
def search_hub_sources(
    caller: CurrentToken,
    hf_token: HfToken,
    search: Annotated[str, Query(min_length=2, max_length=200, description="Part of a repo id (org/name).")],
) -> HubSearch:
    """Up to 10 repos whose id contains ``search``, as the caller's ``X-HF-Token`` sees them (none: anonymous),
    each with its architecture and size from the Hub before any download."""
    return search_hub(search, token=hf_token)
