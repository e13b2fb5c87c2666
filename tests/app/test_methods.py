"""GET /v1/methods mirrors the catalog (names, papers, defaults, params JSON schema)."""

from __future__ import annotations

from merge_ops.params import CATALOG
from tests.app.conftest import Api


def test_methods_list_every_catalog_entry(api: Api) -> None:
    response = api.client.get("/v1/methods", headers=api.headers())
    assert response.status_code == 200
    methods = {m["name"]: m for m in response.json()}
    assert set(methods) == set(CATALOG)
    ties = methods["ties"]
    assert ties["pretty_name"] == CATALOG["ties"].pretty_name
    assert ties["reference_url"].startswith("https://arxiv.org/")
    assert ties["defaults"]["density"] == 0.2 and ties["defaults"]["lambda"] == 1.0
    assert ties["params_schema"]["properties"]["density"]["exclusiveMinimum"] == 0
    assert "lambda" in ties["params_schema"]["properties"]
    assert methods["linear"]["needs_base"] is False and methods["transfer"]["kind"] == "transfer"
    assert methods["compeft"]["default_scope"] == "global"
    for method in methods.values():
        # the defaults validate against the method's own params model
        model = CATALOG[method["name"]].params
        required = {n: 0.5 for n, f in model.model_fields.items() if f.is_required()}  # slerp's t: no default
        assert not set(required) & set(method["defaults"])
        model.model_validate({**required, **method["defaults"]})
