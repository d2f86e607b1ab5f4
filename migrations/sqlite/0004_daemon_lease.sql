-- One daemon supervises the jobs in a database at a time. It holds this lease (one row) and
-- renews it while it runs; a second daemon on the same database refuses to start, since both
-- would take charge of the same running jobs and give away each other's devices.
CREATE TABLE daemon_lease (
    id          BIGINT PRIMARY KEY,
    host        TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    proc_start  BIGINT NOT NULL,
    address     TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
