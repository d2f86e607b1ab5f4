-- Who submitted each job (the user of its token; NULL on a daemon without tokens), and the
-- per-rank memory estimate made at submission (JSON).
ALTER TABLE jobs ADD COLUMN owner TEXT;
ALTER TABLE jobs ADD COLUMN memory_estimate TEXT;
-- The database's identity: its runs live under DATA_DIR/runs/<database_id>/, so a data directory
-- reused with another database never mixes their jobs' run directories.
CREATE TABLE store_identity (
    id          BIGINT PRIMARY KEY,
    database_id TEXT NOT NULL,
    created_ms  BIGINT NOT NULL
);
-- Every data directory that served this database (its id is in DATA_DIR/identity.json).
CREATE TABLE data_dirs (
    id            TEXT PRIMARY KEY,
    host          TEXT NOT NULL,
    path          TEXT NOT NULL,
    first_seen_ms BIGINT NOT NULL,
    last_seen_ms  BIGINT NOT NULL
);
