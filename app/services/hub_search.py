"""Hub search through the server, with the caller's own Hub token (``X-HF-Token``; none: anonymous): repo ids
that contain the query (``HfApi.list_models``), each with its architecture and size (``HfApi.model_info``:
the repo's config and the Hub's safetensors metadata), so a source is known before a merge reads it.

The endpoint is the one every Hub call of the service uses (``HF_ENDPOINT``). The server's own token is never
sent for a search: a caller sees what their token sees. huggingface_hub's errors become ``merge_ops.errors``
Hub errors (``merge_ops.hub.map_hub_error``), so the answer is a problem detail, never the library's text.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

from app.schemas import HubModel, HubSearch, ModelFacts
from merge_ops.errors import HubError, HubTransientError

#: repos described per search (each is one model_info call)
MAX_RESULTS = 10
#: seconds an interactive search waits for the Hub. huggingface_hub retries an unreachable Hub 5 times with
#: backoff (~24 s, not configurable per call); the form's Find… dialog should say "unreachable" well before.
#: The abandoned call finishes in its thread and is discarded.
SEARCH_DEADLINE_S = 8.0
_searches = ThreadPoolExecutor(max_workers=4, thread_name_prefix="alloy-hub-search")


def _api(token: str | None) -> Any:
    from huggingface_hub import HfApi, constants

    endpoint = (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    # token=False: never a token saved on the server's disk; only the caller's
    return HfApi(endpoint=endpoint, token=token or False)


def search_hub(search: str, *, token: str | None, limit: int = MAX_RESULTS) -> HubSearch:
    from merge_ops.hub import map_hub_error

    api = _api(token)
    pending = _searches.submit(lambda: list(api.list_models(search=search, limit=min(limit, MAX_RESULTS))))
    try:
        found = pending.result(timeout=SEARCH_DEADLINE_S)
    except FutureTimeout:
        raise HubTransientError(
            f"the Hub at {api.endpoint} did not answer a search within {SEARCH_DEADLINE_S:g} s; try again later"
        ) from None
    except Exception as exc:  # noqa: BLE001 - mapped below; an unknown error re-raises unchanged
        mapped = map_hub_error(exc, what=f"searching the Hub for {search!r}")
        if mapped is None:
            raise
        raise mapped from None
    return HubSearch(search=search, items=[_describe(api, m) for m in found])


def _describe(api: Any, listed: Any) -> HubModel:
    from merge_ops.hub import map_hub_error

    repo = str(listed.id)
    try:
        info = api.model_info(repo, files_metadata=True)
    except Exception as exc:  # noqa: BLE001 - this repo's details only; the search still answers
        mapped: HubError | None = map_hub_error(exc, what=repo)
        if mapped is None:
            raise
        return HubModel(repo=repo, private=listed.private, gated=listed.gated, problem=mapped.detail)
    config = info.config if isinstance(info.config, dict) else {}
    architectures = config.get("architectures")
    shards = [s for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    safetensors = info.safetensors
    facts = ModelFacts(
        kind="adapter"
        if any(s.rfilename == "adapter_config.json" for s in info.siblings or [])
        else "checkpoint",
        architecture=architectures[0] if isinstance(architectures, list) and architectures else None,
        model_type=config.get("model_type") if isinstance(config.get("model_type"), str) else None,
        parameters=int(safetensors.total) if safetensors is not None else None,
        bytes=sum(s.size or 0 for s in shards) if shards else None,
        dtypes=sorted(safetensors.parameters) if safetensors is not None else [],
        files=len(shards),
    )
    return HubModel(repo=repo, revision=info.sha, private=info.private, gated=info.gated, model=facts)
