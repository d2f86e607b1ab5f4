-- The whole step record (skipped is 0 or 1: sqlx's Any driver reads no SQLite BOOLEAN) reaches the store: whether the update was skipped, the tokens trained,
-- the gradient collectives' time (and the part training waited for), and MFU (NaN when the
-- devices' peak is not known: sqlx's Any driver binds no typed NULL; the daemon reads it as none).
ALTER TABLE step_metrics ADD COLUMN skipped BIGINT NOT NULL DEFAULT 0;
ALTER TABLE step_metrics ADD COLUMN tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE step_metrics ADD COLUMN grad_comm_ms DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE step_metrics ADD COLUMN grad_comm_waited_ms DOUBLE PRECISION NOT NULL DEFAULT 0;
ALTER TABLE step_metrics ADD COLUMN mfu DOUBLE PRECISION;
