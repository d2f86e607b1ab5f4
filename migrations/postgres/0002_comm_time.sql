-- Time each rank spent communicating in a step (data parallelism, ZeRO).
ALTER TABLE step_metrics ADD COLUMN comm_ms DOUBLE PRECISION NOT NULL DEFAULT 0;
