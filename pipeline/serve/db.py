"""The web app's state: one SQLite file in WAL mode holding jobs (the creator page) and experiments, raters, items
and answers (the listening test).

Every statement takes its values as parameters (never formatted into the SQL). A connection is opened per unit of
work (cheap for SQLite) so that threads never share one; writers take the lock up front (`BEGIN IMMEDIATE`) and wait
up to `BUSY_TIMEOUT_S` for each other, so concurrent submissions queue instead of failing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BUSY_TIMEOUT_S = 30.0
CHOICES = ("A", "B", "tie")
CRITERIA = ("quality", "musicality", "alignment", "overall")

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    token TEXT NOT NULL UNIQUE,             -- unguessable; what URLs name
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'done', 'failed')),
    step TEXT NOT NULL DEFAULT '',          -- what a running job is doing, for the page
    progress REAL NOT NULL DEFAULT 0,       -- 0..1
    model TEXT NOT NULL,                    -- a name from the models list, never a path from the request
    seed INTEGER NOT NULL,
    prompt TEXT,
    original_name TEXT NOT NULL,            -- shown to the user only; files are stored under the token
    size_bytes INTEGER NOT NULL,
    duration_s REAL,
    output TEXT,                            -- file name under {{data_dir}}/outputs
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE TABLE IF NOT EXISTS experiments (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    join_token TEXT NOT NULL UNIQUE,        -- /study/{{join_token}} makes a new rater
    generated_dir TEXT NOT NULL,
    systems TEXT NOT NULL,                  -- JSON list
    clips TEXT NOT NULL,                    -- JSON list of ids
    check_good TEXT,                        -- attention check: check_good vs check_bad (null: no such check)
    check_bad TEXT,
    seed INTEGER NOT NULL,
    truth TEXT,                             -- JSON: the known preference of simulated raters (null: none)
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS raters (
    id INTEGER PRIMARY KEY,
    experiment_id INTEGER NOT NULL REFERENCES experiments(id),
    token TEXT NOT NULL UNIQUE,             -- the rater's link
    idx INTEGER NOT NULL,                   -- 0, 1, 2 ... in order of arrival: picks the balanced plan
    simulated INTEGER NOT NULL DEFAULT 0,
    careless INTEGER,                       -- simulated raters only: answered at random
    created_at REAL NOT NULL,
    finished_at REAL,
    UNIQUE (experiment_id, idx)
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY,
    rater_id INTEGER NOT NULL REFERENCES raters(id),
    position INTEGER NOT NULL,              -- order shown to the rater
    clip TEXT NOT NULL,
    kind TEXT NOT NULL CHECK (kind IN ('pair', 'identical', 'good_bad')),
    system_a TEXT NOT NULL,                 -- what plays as version A (blinded: the page never names it)
    system_b TEXT NOT NULL,
    UNIQUE (rater_id, position)
);
CREATE TABLE IF NOT EXISTS answers (
    item_id INTEGER PRIMARY KEY REFERENCES items(id),
    {", ".join(f"{c} TEXT NOT NULL CHECK ({c} IN ('A', 'B', 'tie'))" for c in CRITERIA)},
    mos_a INTEGER CHECK (mos_a BETWEEN 1 AND 5),
    mos_b INTEGER CHECK (mos_b BETWEEN 1 AND 5),
    seconds REAL,                           -- time on the item, as the page measured it
    answered_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_rater ON items (rater_id, position);
CREATE INDEX IF NOT EXISTS jobs_created ON jobs (created_at);
"""


class Database:
    """The SQLite file at `path` (created with its schema, WAL mode)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)

    @contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """A connection in autocommit mode (use `write` for transactions); closed on exit."""
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints, never corrupt
        try:
            yield conn
        finally:
            conn.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction that holds the write lock from its start: all of it commits, or none."""
        with self.connect() as conn:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def all(self, sql: str, args: tuple = ()) -> list[dict]:
        with self.connect() as conn:
            return [dict(row) for row in conn.execute(sql, args)]

    def one(self, sql: str, args: tuple = ()) -> dict | None:
        rows = self.all(sql, args)
        return rows[0] if rows else None

    def execute(self, sql: str, args: tuple = ()) -> int:
        """One statement in its own transaction; returns the last row id."""
        with self.write() as conn:
            return conn.execute(sql, args).lastrowid
