-- 10,000 jobs (100 of them running), 40,000 events and 1,000,000 step-metric rows (100 steps of
-- each job), for the API latency benchmark. psql variable: spec (a job spec as JSON).
BEGIN;
INSERT INTO jobs (id, name, spec, state, reason, devices, placement, restarts, attempt, run_dir, step, created_ms, updated_ms)
SELECT g, 'bench-' || g, :'spec',
       CASE WHEN g > 9900 THEN 'running' WHEN g % 10 = 0 THEN 'failed' ELSE 'succeeded' END,
       'seeded for the benchmark', 1,
       CASE WHEN g > 9900 THEN 'cpu:' || (g - 9901) ELSE '' END,
       0, 1, '/nonexistent/gantry-bench/job-' || g, 100,
       1700000000000 + g * 1000, 1700000000000 + g * 1000
FROM generate_series(1, 10000) AS g;
SELECT setval(pg_get_serial_sequence('jobs', 'id'), 10000);
INSERT INTO job_events (job_id, at_ms, from_state, to_state, reason)
SELECT g, 1700000000000 + g * 1000 + k, s.f, s.t, 'seeded'
FROM generate_series(1, 10000) AS g,
     (VALUES (0, NULL, 'queued'), (1, 'queued', 'scheduled'), (2, 'scheduled', 'running'), (3, 'running', 'succeeded')) AS s(k, f, t)
WHERE NOT (g > 9900 AND s.k = 3);
INSERT INTO step_metrics (job_id, rank, step, loss, lr, grad_norm, tokens_per_s, mem_bytes, step_ms)
SELECT j, 0, s, 6.0 - s * 0.02, 1e-3, 0.5, 20000.0 + s, 14266368, 90.0
FROM generate_series(1, 10000) AS j, generate_series(1, 100) AS s;
COMMIT;
ANALYZE;
