-- Under pipeline parallelism, each stage's idle share of the step (the bubble), as a JSON array
-- in stage order; '[]' for jobs without pipeline stages.
ALTER TABLE step_metrics ADD COLUMN stage_idle TEXT NOT NULL DEFAULT '[]';
