-- Jobs, their state transitions, step metrics, logs, workers and checkpoints.
-- Times are milliseconds since the Unix epoch (BIGINT), the same in PostgreSQL and SQLite.

CREATE TABLE jobs (
    id              BIGSERIAL PRIMARY KEY,
    name            TEXT NOT NULL,
    spec            TEXT NOT NULL,          -- the job spec as JSON
    state           TEXT NOT NULL,
    reason          TEXT NOT NULL DEFAULT '',
    devices         BIGINT NOT NULL,
    placement       TEXT NOT NULL DEFAULT '', -- comma-separated device slots while held
    restarts        BIGINT NOT NULL DEFAULT 0,
    attempt         BIGINT NOT NULL DEFAULT 0,
    run_dir         TEXT NOT NULL DEFAULT '',
    step            BIGINT,
    checkpoint_step BIGINT,
    checkpoint_path TEXT,
    created_ms      BIGINT NOT NULL,
    updated_ms      BIGINT NOT NULL
);
CREATE INDEX jobs_state_id ON jobs (state, id);

CREATE TABLE job_events (
    id         BIGSERIAL PRIMARY KEY,
    job_id     BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    at_ms      BIGINT NOT NULL,
    from_state TEXT,
    to_state   TEXT NOT NULL,
    reason     TEXT NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE step_metrics (
    job_id       BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    rank         BIGINT NOT NULL,
    step         BIGINT NOT NULL,
    loss         DOUBLE PRECISION NOT NULL,
    lr           DOUBLE PRECISION NOT NULL,
    grad_norm    DOUBLE PRECISION NOT NULL,
    tokens_per_s DOUBLE PRECISION NOT NULL,
    mem_bytes    BIGINT NOT NULL,
    step_ms      DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (job_id, rank, step)
);

CREATE TABLE log_lines (
    job_id  BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    rank    BIGINT NOT NULL,
    "offset" BIGINT NOT NULL,
    at_ms   BIGINT NOT NULL,
    line    TEXT NOT NULL,
    PRIMARY KEY (job_id, rank, "offset")
);

CREATE TABLE workers (
    job_id        BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    rank          BIGINT NOT NULL,
    attempt       BIGINT NOT NULL,
    pid           BIGINT NOT NULL,
    started_ms    BIGINT NOT NULL,
    -- the process's start time in clock ticks since boot (/proc/PID/stat), so that a reused
    -- PID is never mistaken for the worker after a daemon restart
    proc_start    BIGINT NOT NULL,
    PRIMARY KEY (job_id, rank)
);

CREATE TABLE checkpoints (
    job_id BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    step   BIGINT NOT NULL,
    path   TEXT NOT NULL,
    at_ms  BIGINT NOT NULL,
    PRIMARY KEY (job_id, step)
);
