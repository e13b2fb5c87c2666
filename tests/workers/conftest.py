"""Service fixtures (real redis-server, celery workers, uvicorn); see tests/utils/services.py."""

from tests.utils.services import (  # noqa: F401  (pytest fixtures)
    alloy_env,
    alloy_settings,
    api_server,
    celery_worker,
    job_store,
    redis_server,
)
