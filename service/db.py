"""Database engine and sessions (SQLite in local mode, PostgreSQL in production)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TypeVar

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Session, sessionmaker

from service.settings import Settings

T = TypeVar("T")


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


def make_engine(url: str, max_connections: int = 15, pool_timeout_s: float = 30.0) -> Engine:
    """An engine whose pool holds at most `max_connections` (SQLAlchemy's default of 5 kept open plus
    10 on demand) and makes a caller wait at most `pool_timeout_s` for one (then sqlalchemy's
    TimeoutError, which the API answers with a 503)."""
    pool = {"pool_size": min(5, max_connections), "max_overflow": max_connections - min(5, max_connections),
            "pool_timeout": pool_timeout_s}
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **pool)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **pool)


class Database:
    """The engine and sessions of one database, built from the settings a process started with: the
    API keeps its own on `app.state.database`, a worker and each CLI command build theirs at start.
    Two of them (two apps in one test process) never share an engine."""

    def __init__(self, url: str, max_connections: int = 15, pool_timeout_s: float = 30.0) -> None:
        self.url = url
        self.engine = make_engine(url, max_connections, pool_timeout_s)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def from_settings(cls, settings: Settings) -> "Database":
        if settings.is_sqlite:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(settings.resolved_database_url, settings.database_max_connections,
                   settings.database_pool_timeout_s)

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


MAX_INTEGER = 2**31 - 1  # the largest value of an INTEGER column (PostgreSQL's int4)


def is_integer_literal(text: str) -> bool:
    """`text` is a plain decimal that an INTEGER column can hold: a number from a client (a token, an
    event id) is checked with this before it reaches a query, where PostgreSQL refuses a larger one."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) <= MAX_INTEGER


def release_connection(session: Session) -> None:
    """End `session`'s read transaction, so that its pooled connection goes back to the pool now; the
    session stays usable, and what it loaded stays loaded (expire_on_commit=False).

    A request calls this before it waits on anything but the database (an upload's body, an encoder
    pass, the backbone's load): sixteen classify requests each holding a connection through a
    30-second encoder pass emptied the pool of fifteen, and the sixteenth failed."""
    session.commit()


def is_conflict(error: BaseException) -> bool:
    """A deadlock or serialization failure (SQLSTATE class 40): PostgreSQL rolled this transaction back
    so that a concurrent one could go on, and running it again is the documented remedy."""
    sqlstate = getattr(getattr(error, "orig", None), "sqlstate", None)
    return isinstance(sqlstate, str) and sqlstate.startswith("40")


def commit_retrying_conflicts(session: Session, work: Callable[[], T], attempts: int = 3) -> T:
    """`work()` (writes on `session`) and commit; run again from the start when PostgreSQL picked this
    transaction as a deadlock's victim. Two transactions that lock a task's row and its candidates'
    rows in opposite orders can deadlock: a DELETE (`task_state.delete`) with a worker's claim or
    release of a candidate, say."""
    for attempt in range(1, attempts + 1):
        try:
            result = work()
            session.commit()
            return result
        except DBAPIError as error:
            session.rollback()
            if attempt == attempts or not is_conflict(error):
                raise
    raise AssertionError("unreachable")


def db_now(session: Session) -> datetime:
    """The database server's clock (UTC). Heartbeats are written and judged by it, so that workers and
    sweepers on hosts whose clocks disagree still agree on how old a heartbeat is."""
    if session.get_bind().dialect.name == "sqlite":  # one host: its clock, read by SQLite
        value = session.scalar(text("SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"))
        return datetime.fromisoformat(value).replace(tzinfo=timezone.utc)
    value = session.scalar(text("SELECT clock_timestamp()"))  # not now(): the transaction's start
    return value.astimezone(timezone.utc)
