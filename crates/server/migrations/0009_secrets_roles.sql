-- Schema version 9: secrets at rest are salted hashes; roles admin, operator, reader.
--
-- API tokens: each row keeps an argon2id hash (secret_hash) and a lookup key that finds the
-- row without hashing (the id embedded in `ferry_<id>_<secret>` secrets). Rows of older
-- versions kept an unsalted SHA-256; they keep working: their lookup key becomes `sha256:`
-- and the first 16 hex digits of that hash (64 bits, useless for guessing a 256-bit random
-- secret), their hash the old one marked `sha256:`, and the server replaces it by an argon2
-- hash at the token's next successful use. The role read_only is now called reader.
CREATE TABLE api_tokens_v9 (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL,
    lookup       TEXT NOT NULL UNIQUE,
    secret_hash  TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT,
    last_used_at BIGINT
);

INSERT INTO api_tokens_v9 (id, name, role, lookup, secret_hash, created_at)
SELECT id, name,
       CASE role WHEN 'read_only' THEN 'reader' ELSE role END,
       'sha256:' || substr(secret_sha256, 1, 16),
       'sha256:' || secret_sha256,
       created_at
FROM api_tokens;

DROP TABLE api_tokens;

ALTER TABLE api_tokens_v9 RENAME TO api_tokens;

CREATE INDEX api_tokens_name ON api_tokens (name);

-- Agent credentials, as the server checks them when an agent calls it: the same scheme.
-- agent_secret_sha256 is retired (it cannot be dropped without rebuilding a table others
-- reference): it now holds a placeholder unique per host, never a hash of a secret.
ALTER TABLE hosts ADD COLUMN agent_lookup TEXT;
ALTER TABLE hosts ADD COLUMN agent_secret_hash TEXT;

UPDATE hosts SET
    agent_lookup = 'sha256:' || substr(agent_secret_sha256, 1, 16),
    agent_secret_hash = 'sha256:' || agent_secret_sha256,
    agent_secret_sha256 = 'retired:' || name;

CREATE UNIQUE INDEX hosts_agent_lookup ON hosts (agent_lookup);
