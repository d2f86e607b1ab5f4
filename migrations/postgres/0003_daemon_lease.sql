-- One daemon supervises the jobs in a database at a time. It holds this lease (one row) and
-- renews it while it runs; a second daemon on the same database refuses to start, since both
-- would take charge of the same running jobs and give away each other's devices. `machine`
-- (boot id and PID namespace) says whether `pid` can be looked up where a new daemon starts;
-- `host` is the name shown in errors.
CREATE TABLE daemon_lease (
    id          BIGINT PRIMARY KEY,
    host        TEXT NOT NULL,
    machine     TEXT NOT NULL,
    pid         BIGINT NOT NULL,
    proc_start  BIGINT NOT NULL,
    address     TEXT NOT NULL,
    expires_ms  BIGINT NOT NULL
);
