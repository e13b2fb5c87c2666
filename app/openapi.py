"""Print the OpenAPI document as YAML: ``python -m app.openapi > openapi.yaml`` (tests fail on drift)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml


def openapi_document() -> dict[str, Any]:
    from app.core.config import Settings
    from app.main import create_app

    # settings that touch nothing on disk: the document must not depend on the machine
    with tempfile.TemporaryDirectory() as home:
        settings = Settings(
            home=Path(home), database_url="sqlite://", broker_url="memory://", data_dirs=[Path(home)]
        )
        return create_app(settings).openapi()


def render() -> str:
    return yaml.safe_dump(openapi_document(), sort_keys=False, allow_unicode=True, width=110)


if __name__ == "__main__":
    sys.stdout.write(render())
