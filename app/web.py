"""The web form: a single page served at ``/`` with its assets under ``/static``.

Everything the page needs ships in ``app/static`` (no CDN, no build step), so it works offline. The page is a
client of the public API only (``/v1/...``); nothing here touches the database or the queue. Routes are left
out of the OpenAPI schema: they are not part of the API contract.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, JSONResponse

STATIC_DIR = Path(__file__).resolve().parent / "static"
README = Path(__file__).resolve().parents[1] / "README.md"
_YAML_BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
# The page is its own origin's only script source; a recipe or report can't inject markup that runs.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type=_MEDIA_TYPES[".html"], headers=_HEADERS)


@cache
def readme_examples() -> list[dict[str, str]]:
    """The README's recipe examples (its ```yaml blocks, split at ``---``), titled by their first comment or
    method line: the form's gallery, so the examples shown are the documented ones."""
    try:
        text = README.read_text(encoding="utf-8")
    except OSError:  # an installed package without the README: no gallery
        return []
    examples = []
    for block in _YAML_BLOCK.findall(text):
        for doc in block.split("---\n"):
            doc = doc.strip("\n")
            if "method:" not in doc:
                continue
            first = doc.splitlines()[0]
            title = first.lstrip("# ").strip() if first.startswith("#") else first.split("#")[0].strip()
            title = title.removeprefix("method: ")
            comment = first.split("#", 1)[1].strip() if "#" in first and not first.startswith("#") else ""
            examples.append({"title": f"{title} — {comment}" if comment else title, "yaml": doc + "\n"})
    return examples


@router.get("/examples.json")
def examples() -> JSONResponse:
    return JSONResponse(readme_examples(), headers=_HEADERS)


@router.get("/static/{asset_path:path}")
def static_asset(asset_path: str) -> FileResponse:
    path = (STATIC_DIR / asset_path).resolve()
    # realpath containment: `..` or symlinks must not leave the static folder
    if not path.is_relative_to(STATIC_DIR) or not path.is_file() or path.suffix not in _MEDIA_TYPES:
        raise HTTPException(status_code=404, detail="not found")
    return FileResponse(path, media_type=_MEDIA_TYPES[path.suffix], headers=_HEADERS)
