"""openapi.yaml is generated from the app (`python -m app.openapi > openapi.yaml`); this fails on drift."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from merge_ops.params import CATALOG

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_openapi_matches_the_app() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "app.openapi"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    checked_in = (ROOT / "openapi.yaml").read_text()
    assert generated == checked_in, "openapi.yaml is stale: run `python -m app.openapi > openapi.yaml`"


def test_document_conventions() -> None:
    document = yaml.safe_load((ROOT / "openapi.yaml").read_text())
    operation_ids = [op["operationId"] for path in document["paths"].values() for op in path.values()]
    assert len(operation_ids) == len(set(operation_ids))
    assert all(re.fullmatch(r"[a-z]+-[a-z_]+", op) for op in operation_ids)
    assert all(path.startswith(("/v1/", "/healthz", "/readyz", "/metrics")) for path in document["paths"])
    schemas = document["components"]["schemas"]
    # every method is documented with its params model, as a union discriminated by `method`
    assert set(schemas["RecipeRequest"]["discriminator"]["mapping"]) == set(CATALOG)
    for name, info in CATALOG.items():
        assert schemas[f"Recipe_{name}"]["properties"]["params"]["$ref"].endswith(info.params.__name__)
    create = document["paths"]["/v1/merges"]["post"]
    assert set(create["requestBody"]["content"]) == {"application/json", "application/yaml"}
    assert "application/problem+json" in create["responses"]["422"]["content"]
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
