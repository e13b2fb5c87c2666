"""Service fixtures (real redis-server, celery workers, uvicorn); see tests/utils/services.py."""

import pytest  # noqa: E402

from tests.utils.services import (  # noqa: F401  (pytest fixtures)
    alloy_env,
    alloy_settings,
    api_server,
    broker_kind,
    celery_worker,
    job_store,
    redis_server,
)

from .helpers import make_models  # noqa: E402

# A model big enough that a merge (helpers.long_recipe) takes seconds on 2 CPU cores (real size, no sleep hook): 12 layers at
# hidden 512 (~84 MB per checkpoint in float32), a base and 3 fine-tunes. Built once per session (~15 s).
LONG_MERGE = {"hidden": 512, "layers": 12, "vocab": 64, "k": 3}


@pytest.fixture(scope="session")
def long_models(tmp_path_factory: pytest.TempPathFactory):
    return make_models(tmp_path_factory.mktemp("long-models"), **LONG_MERGE)
