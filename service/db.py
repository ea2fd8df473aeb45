"""Database engine and sessions (SQLite in local mode, PostgreSQL in production)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from service.settings import Settings


class Base(DeclarativeBase):
    pass


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # The API and the worker are separate processes writing the same file: WAL lets readers
    # proceed during a write, and the busy timeout makes writers wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True)


class Database:
    """The engine and sessions of one database, built from the settings a process started with: the
    API keeps its own on `app.state.database`, a worker and each CLI command build theirs at start.
    Two of them (two apps in one test process) never share an engine."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Database":
        if settings.is_sqlite:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.resolved_database_url)

    def session(self) -> Session:
        """A session the caller closes (`with database.session() as session:`); nothing is committed."""
        return self._sessions()

    @contextmanager
    def scope(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def dispose(self, close: bool = True) -> None:
        """Drop the pooled connections (close=False in a forked child: the parent still owns them)."""
        self.engine.dispose(close=close)


def db_now(session: Session) -> datetime:
    """The database server's clock (UTC). Heartbeats are written and judged by it, so that workers and
    sweepers on hosts whose clocks disagree still agree on how old a heartbeat is."""
    if session.get_bind().dialect.name == "sqlite":  # one host: its clock, read by SQLite
        value = session.scalar(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))
        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
    value = session.scalar(text("SELECT clock_timestamp()"))  # not now(): the transaction's start
    return value.astimezone(timezone.utc)
