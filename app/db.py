"""Engine, sessions and migrations of the job store (SQLite by default, Postgres by URL).

SQLite is shared by the API and worker processes, so connections use WAL and a busy timeout: readers never block
the writer and short write bursts wait instead of failing with ``database is locked``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    url = make_url(database_url)
    if url.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

    @event.listens_for(engine, "connect")
    def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


def pool_for_threads(database_url: str, threads: int) -> dict[str, Any]:
    """Pool settings giving each of ``threads`` concurrent users a connection (in-memory SQLite keeps its one
    connection per thread: no pool to size)."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and (not url.database or url.database == ":memory:"):
        return {}
    return {"pool_size": threads, "max_overflow": 10}


@lru_cache(maxsize=8)
def get_engine(database_url: str) -> Engine:
    """One engine (and pool) per URL and process."""
    return make_engine(database_url)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    # expire_on_commit=False: rows returned by crud stay readable after their commit
    return sessionmaker(bind=engine, expire_on_commit=False)


_migrated: set[str] = set()


def default_engine() -> Engine:
    """The engine of ``get_settings().database_url``, migrated once per process (CLI entry points)."""
    from app.core.config import get_settings

    engine = get_engine(get_settings().database_url)
    if engine.url.render_as_string() not in _migrated:
        init_db(engine)
        _migrated.add(engine.url.render_as_string())
    return engine


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that rolls back on error and always closes (crud functions commit their own writes).
    Without an engine: the configured database, migrated first (``default_engine``)."""
    session = session_factory(engine or default_engine())()
    try:
        yield session
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def alembic_config(engine: Engine | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.set_main_option(
            "sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%")
        )
    return config


def init_db(engine: Engine) -> None:
    """Apply every Alembic migration (``upgrade head``); safe to call at each start."""
    from alembic import command

    config = alembic_config(engine)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
