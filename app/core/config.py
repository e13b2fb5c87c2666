"""One settings object for the API, the workers and the CLI (env prefix ``ALLOY_``).

The embedded default needs no configuration: a SQLite job store and Celery's ``filesystem://`` transport, both
under ``ALLOY_HOME`` (default ``~/.alloy``). Production sets ``ALLOY_DATABASE_URL`` (Postgres) and
``ALLOY_BROKER_URL`` (``redis://``). A ``filesystem://`` URL may carry the broker folder as its path
(``filesystem:///srv/alloy/broker``); producers and consumers must agree on it, so both take the transport
options from :meth:`Settings.broker_transport_options`.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _default_home() -> Path:
    return Path("~/.alloy").expanduser()


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ALLOY_", extra="ignore")

    home: Path = Field(
        default_factory=_default_home, description="Where the default job store, broker and data live."
    )
    database_url: str = Field(
        default="", description="SQLAlchemy URL; default sqlite:///$ALLOY_HOME/alloy.db."
    )
    broker_url: str = Field(
        default="", description="Celery broker URL; default filesystem:// under $ALLOY_HOME/broker."
    )
    # NoDecode: the env value is os.pathsep-separated, not JSON
    data_dirs: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Roots that local sources and outputs must stay inside."
    )
    hf_cache: Path | None = None
    hf_token: SecretStr | None = Field(
        default=None, description="Server-wide Hub token, used when a request sends none."
    )
    server_key: SecretStr = Field(
        default=SecretStr(""), description="Secret for signing/encrypting server-side values."
    )
    task_time_limit_s: int = Field(default=6 * 3600, gt=0)
    # a running job's lease: its attempt renews it every heartbeat_interval_s; a lease not renewed for
    # heartbeat_stale_s is lost (the worker died) and the reaper runs the job again: recovery in about
    # heartbeat_stale_s + reaper_interval_s (an attempt that died on a live worker's machine is taken over at once)
    heartbeat_interval_s: float = Field(default=3.0, gt=0)
    heartbeat_stale_s: float = Field(default=20.0, gt=0)
    publish_wait_s: float = Field(
        default=900.0,
        gt=0,
        description="How long a finished merge may wait in the io queue for its Hub push before it is re-sent.",
    )
    max_attempts: int = Field(default=3, ge=1)
    progress_interval_s: float = Field(default=1.0, gt=0, description="Min seconds between progress writes.")
    reaper_interval_s: float = Field(default=3.0, gt=0, description="How often each worker's reaper scans.")
    queued_resend_s: float = Field(
        default=120.0, gt=0, description="Re-send a queued job's message after this long unclaimed."
    )
    rate_limit_per_minute: int = Field(
        default=60, ge=1, description="Submissions per token per minute (in-process)."
    )
    validate_rate_limit_per_minute: int = Field(
        default=120, ge=1, description="Recipe validations and imports per token per minute (in-process)."
    )
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_upload_bytes: int = Field(
        default=64 * 1024 * 1024, ge=1024, description="Largest held-out JSONL accepted by POST /v1/files."
    )
    events_poll_s: float = Field(
        default=0.5, gt=0, description="How often the SSE stream re-reads the job row."
    )
    events_max_s: float = Field(
        default=600.0, gt=0, description="Longest one SSE stream stays open (clients reconnect)."
    )
    pin_hub_sources: bool = Field(
        default=True, description="Resolve Hub sources to commit SHAs at submission."
    )
    readiness_timeout_s: float = Field(
        default=1.0, gt=0, description="Broker connect / worker ping timeout for /readyz."
    )
    readiness_cache_s: float = Field(
        default=5.0, ge=0, description="How long /readyz reuses its last probe (one probe at a time)."
    )

    @field_validator("data_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.split(os.pathsep) if part.strip()]
        return value

    @model_validator(mode="after")
    def _fill_defaults(self) -> Settings:
        self.home = self.home.expanduser()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.home / 'alloy.db'}"
        if not self.broker_url:
            self.broker_url = f"filesystem://{self.home / 'broker'}"
        if not self.data_dirs:
            # never the working directory: started from / (a service manager's default) it would admit
            # base: /etc/passwd and output: /root/.ssh/...
            self.data_dirs = [self.home / "data"]
        self.data_dirs = [Path(p).expanduser() for p in self.data_dirs]
        return self

    @property
    def broker_dir(self) -> Path | None:
        """The folder of a ``filesystem://`` broker (``filesystem:///abs/dir``), else None."""
        if not self.broker_url.startswith("filesystem://"):
            return None
        path = self.broker_url.removeprefix("filesystem://")
        return Path(path) if path else self.home / "broker"

    def broker_transport_options(self) -> dict[str, Any]:
        """Celery ``broker_transport_options``; the filesystem folders are created here so both sides agree."""
        folder = self.broker_dir
        if folder is None:
            return {}
        queue_dir, control_dir, processed_dir = folder / "queue", folder / "control", folder / "processed"
        for path in (queue_dir, control_dir, processed_dir):
            # the broker folder can carry Hub tokens inside messages: keep it private to this user
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "control_folder": str(control_dir),
            "processed_folder": str(processed_dir),
            "store_processed": False,
        }

    def celery_broker_url(self) -> str:
        """The URL handed to Celery: ``filesystem://`` carries its folder in the transport options instead."""
        return "filesystem://" if self.broker_dir is not None else self.broker_url


@lru_cache
def get_settings() -> Settings:
    return Settings()
