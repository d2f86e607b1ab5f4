-- A step's metrics may be NaN (a diverged loss). SQLite stores a NaN as NULL, which the NOT NULL
-- columns refused: the report failed, and every report queued behind it. The metric columns take
-- NULL now, read back as NaN. (PostgreSQL stores NaN itself; its schema is unchanged.)
CREATE TABLE step_metrics_nullable (
    job_id       BIGINT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    rank         BIGINT NOT NULL,
    step         BIGINT NOT NULL,
    loss         REAL,
    lr           REAL,
    grad_norm    REAL,
    tokens_per_s REAL,
    mem_bytes    BIGINT NOT NULL,
    step_ms      REAL,
    comm_ms      REAL DEFAULT 0,
    PRIMARY KEY (job_id, rank, step)
);
INSERT INTO step_metrics_nullable (job_id, rank, step, loss, lr, grad_norm, tokens_per_s, mem_bytes, step_ms, comm_ms)
    SELECT job_id, rank, step, loss, lr, grad_norm, tokens_per_s, mem_bytes, step_ms, comm_ms FROM step_metrics;
DROP TABLE step_metrics;
ALTER TABLE step_metrics_nullable RENAME TO step_metrics;
