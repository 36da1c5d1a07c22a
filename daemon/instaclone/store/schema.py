"""The store's SQLite schema and its migrations.

Each migration takes the database from one version to the next and runs, with
the version bump, in one transaction: a daemon killed during a migration
leaves the previous version behind, which the next start migrates again.
A database newer than this daemon is refused, never changed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

SCHEMA_VERSION = 7

# Version 1: jobs, their states, the resource ledger, frozen sources, clones.
_V1 = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    source TEXT NOT NULL,
    spec TEXT NOT NULL,
    state TEXT NOT NULL,
    error TEXT,
    result TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS job_states (
    job_id TEXT NOT NULL REFERENCES jobs(id),
    n INTEGER NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (job_id, n)
);
CREATE TABLE IF NOT EXISTS resources (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL REFERENCES jobs(id),
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    clone TEXT,
    status TEXT NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS resources_job ON resources(job_id);
CREATE TABLE IF NOT EXISTS frozen (
    name TEXT PRIMARY KEY,
    since REAL NOT NULL,
    status TEXT NOT NULL,
    paused_by_us INTEGER NOT NULL,
    backend TEXT NOT NULL,
    image TEXT,
    clones INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS clones (
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL,
    source TEXT NOT NULL,
    job_id TEXT NOT NULL,
    dir TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""

# Version 2: the event outbox. An event row and its delivery rows are written
# in the same transaction as the change they describe.
_V2 = """
CREATE TABLE IF NOT EXISTS events (
    cursor INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    job_id TEXT,
    at REAL NOT NULL,
    body TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events(job_id);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_cursor INTEGER NOT NULL REFERENCES events(cursor) ON DELETE CASCADE,
    webhook TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at REAL NOT NULL,
    last_status INTEGER,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE (event_cursor, webhook)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(status, next_at);
CREATE TABLE IF NOT EXISTS webhooks (
    name TEXT PRIMARY KEY,
    disabled_at REAL,
    reason TEXT
);
"""

# Version 3: one undo ledger. Each resource names its owner, the backend (or
# "core") that removes it. Its owner id is a job's id or a frozen source's
# ledger id ("frozen-<name>"), so resources.job_id no longer references jobs:
# SQLite cannot drop a foreign key, hence the copy.
_V3 = """
CREATE TABLE resources_v3 (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    ref TEXT NOT NULL,
    clone TEXT,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT 'core'
);
INSERT INTO resources_v3(id, job_id, kind, ref, clone, status, created_at)
    SELECT id, job_id, kind, ref, clone, status, created_at FROM resources;
DROP TABLE resources;
ALTER TABLE resources_v3 RENAME TO resources;
CREATE INDEX IF NOT EXISTS resources_job ON resources(job_id);
"""


# Version 4: pools, and a clone's pool, claim and expiry (TTL).
_V4 = """
CREATE TABLE IF NOT EXISTS pools (
    name TEXT PRIMARY KEY,
    source TEXT NOT NULL,
    size INTEGER NOT NULL,
    spec TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS clones_expiry ON clones(expires_at);
"""
_V4_CLONE_COLUMNS = (("expires_at", "REAL"), ("pool", "TEXT"), ("claimed_at", "REAL"),
                     ("generation", "INTEGER NOT NULL DEFAULT 0"))

# Version 5: owners. Each job, clone and pool records the uid that made it
# (a claim makes the claimer a member's owner). Rows from before have NULL:
# owner unknown, which the API treats as root's (only admins see them).
_V5_OWNER_TABLES = ("jobs", "clones", "pools")


# Version 6: a domain's ledger record carries the UUID instaclone gave it, so
# that its undo removes that domain and never another one defined under the
# name since (NULL in rows written before: those are undone by name).
_V6_RESOURCE_COLUMNS = (("uuid", "TEXT"),)


# Version 7: what instaclone made, by identity. A ledger row is written before
# its file exists (recovery must find it); once the file is made, the row gets
# its (st_dev, st_ino) and file type (``ftype``: the S_IFMT bits), and garbage
# collection and destroy delete a file only if the name still holds that
# inode, of that type. ``removed_at``: deleted by instaclone (or found gone),
# never a candidate again.
_V7_RESOURCE_COLUMNS = (("dev", "INTEGER"), ("ino", "INTEGER"), ("ftype", "INTEGER"), ("removed_at", "REAL"))


def _statements(script: str) -> list[str]:
    return [s.strip() for s in script.split(";") if s.strip()]


def _v1(db: sqlite3.Connection) -> None:
    for stmt in _statements(_V1):
        db.execute(stmt)


def _v2(db: sqlite3.Connection) -> None:
    for stmt in _statements(_V2):
        db.execute(stmt)


def _v3(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(resources)")}
    if "owner" in columns:
        return  # already copied: a migration commits with its version bump, so this is a re-run
    for stmt in _statements(_V3):
        db.execute(stmt)


def _v4(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(clones)")}
    for name, decl in _V4_CLONE_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE clones ADD COLUMN {name} {decl}")
    for stmt in _statements(_V4):
        db.execute(stmt)


def _v5(db: sqlite3.Connection) -> None:
    for table in _V5_OWNER_TABLES:
        columns = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if "owner" not in columns:
            db.execute(f"ALTER TABLE {table} ADD COLUMN owner INTEGER")
    db.execute("CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, seq)")  # a user's own jobs, newest first


def _v6(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(resources)")}
    for name, decl in _V6_RESOURCE_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE resources ADD COLUMN {name} {decl}")


def _v7(db: sqlite3.Connection) -> None:
    columns = {row[1] for row in db.execute("PRAGMA table_info(resources)")}
    for name, decl in _V7_RESOURCE_COLUMNS:
        if name not in columns:
            db.execute(f"ALTER TABLE resources ADD COLUMN {name} {decl}")
    db.execute("CREATE INDEX IF NOT EXISTS resources_made ON resources(removed_at, dev)")


#: (version, migration to it from the version before), in order.
MIGRATIONS: tuple[tuple[int, Callable[[sqlite3.Connection], None]], ...] = (
    (1, _v1), (2, _v2), (3, _v3), (4, _v4), (5, _v5), (6, _v6), (7, _v7))


def _version(db: sqlite3.Connection) -> int:
    db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    return int(row[0]) if row else 0


def migrate(db: sqlite3.Connection, path: Path) -> int:
    """Bring the database on ``db`` (autocommit mode) to :data:`SCHEMA_VERSION`; returns the version found.

    Raises RuntimeError if the database is newer than this daemon.
    """
    found = _version(db)
    if found > SCHEMA_VERSION:
        raise RuntimeError(f"journal {path} has schema {found}, this daemon knows {SCHEMA_VERSION}")
    for version, step in MIGRATIONS:
        if version <= found:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            step(db)
            db.execute("INSERT INTO meta(key, value) VALUES ('schema_version', ?) "
                       "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(version),))
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    return found
