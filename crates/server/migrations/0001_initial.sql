-- Ferry control plane, schema version 1.
--
-- Written to run unchanged on SQLite and PostgreSQL: ids are TEXT (UUIDs in their hyphenated
-- lower-case form), timestamps are BIGINT unix milliseconds, structured values are JSON in
-- TEXT, flags are BOOLEAN. Sequence numbers are allocated by the store (MAX + 1 inside the
-- inserting statement) instead of AUTOINCREMENT / SERIAL, which the two databases spell
-- differently. Enum-like columns carry no CHECK constraint so a later version can add a value
-- without rebuilding the table; the store reports an unknown value as a corrupt row.

-- API tokens. Only the SHA-256 of a secret is kept: a copy of the database grants no access.
CREATE TABLE api_tokens (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL UNIQUE,
    created_at    BIGINT NOT NULL
);

-- One row per agent. The server must present agent_secret when it calls the agent, so the
-- secret itself is stored (not encrypted at rest); the hash column serves the reverse lookup
-- when an agent authenticates to the server.
CREATE TABLE hosts (
    name                TEXT PRIMARY KEY,
    agent_url           TEXT NOT NULL,
    agent_secret        TEXT NOT NULL,
    agent_secret_sha256 TEXT NOT NULL UNIQUE,
    enabled             BOOLEAN NOT NULL,
    facts               TEXT,
    last_heartbeat      BIGINT,
    joined_at           BIGINT NOT NULL
);

CREATE TABLE instances (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    host       TEXT NOT NULL REFERENCES hosts (name),
    state      TEXT NOT NULL,
    generation BIGINT NOT NULL,
    spec       TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE INDEX instances_host ON instances (host);

-- Migration jobs. instance_id has no foreign key on purpose: the history of a deleted
-- instance stays, named by the instance_name snapshot taken at creation.
CREATE TABLE migrations (
    id               TEXT PRIMARY KEY,
    seq              BIGINT NOT NULL UNIQUE,
    instance_id      TEXT NOT NULL,
    instance_name    TEXT NOT NULL,
    kind             TEXT NOT NULL,
    source           TEXT NOT NULL REFERENCES hosts (name),
    destination      TEXT NOT NULL REFERENCES hosts (name),
    state            TEXT NOT NULL,
    options          TEXT NOT NULL,
    created_at       BIGINT NOT NULL,
    preparing_at     BIGINT,
    migrating_at     BIGINT,
    completing_at    BIGINT,
    finished_at      BIGINT,
    error            TEXT,
    progress         TEXT,
    stats            TEXT,
    cancel_requested BOOLEAN NOT NULL
);

-- At most one unfinished migration per instance, even if two writers race.
CREATE UNIQUE INDEX migrations_one_open_per_instance
    ON migrations (instance_id)
    WHERE state NOT IN ('completed', 'failed', 'cancelled');

CREATE INDEX migrations_state_seq ON migrations (state, seq);
CREATE INDEX migrations_instance ON migrations (instance_id);

-- Progress history, for the charts of a finished migration.
CREATE TABLE migration_samples (
    migration_id TEXT NOT NULL REFERENCES migrations (id),
    seq          BIGINT NOT NULL,
    at           BIGINT NOT NULL,
    progress     TEXT NOT NULL,
    PRIMARY KEY (migration_id, seq)
);

CREATE TABLE migration_logs (
    migration_id TEXT NOT NULL REFERENCES migrations (id),
    seq          BIGINT NOT NULL,
    at           BIGINT NOT NULL,
    level        TEXT NOT NULL,
    message      TEXT NOT NULL,
    PRIMARY KEY (migration_id, seq)
);

-- Every change made through the API: who, what, to what.
CREATE TABLE audit_log (
    seq    BIGINT PRIMARY KEY,
    at     BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail TEXT NOT NULL
);
