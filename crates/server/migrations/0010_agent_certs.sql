-- The server calls agents with its client certificate (mutual TLS), so it no longer keeps a
-- copy of each agent's secret; agents' certificates are recorded by serial so that a
-- replaced one can be revoked.
ALTER TABLE hosts DROP COLUMN agent_secret;

CREATE TABLE agent_certs (
    serial     TEXT PRIMARY KEY,
    host       TEXT NOT NULL,
    issued_at  BIGINT NOT NULL,
    not_after  BIGINT NOT NULL,
    revoked_at BIGINT
);
CREATE INDEX agent_certs_host ON agent_certs (host);
