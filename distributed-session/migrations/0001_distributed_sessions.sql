-- Sessions of distributed-session's write-behind store. Idempotent.
CREATE TABLE IF NOT EXISTS distributed_sessions (
    -- 22 characters of URL-safe base64: 128 random bits.
    id text PRIMARY KEY,
    -- Monotonic per session; a write lands only over a lower version.
    version bigint NOT NULL,
    -- The session's data as JSON; NULL marks a deleted session (a tombstone).
    data bytea,
    expires_at timestamptz NOT NULL
);
CREATE INDEX IF NOT EXISTS distributed_sessions_expires_at_idx
    ON distributed_sessions (expires_at);
