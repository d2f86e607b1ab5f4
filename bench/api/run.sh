#!/usr/bin/env bash
# API latency under load: a daemon on PostgreSQL holding 10,000 jobs (100 running) and 1,000,000
# step-metric rows answers GET /v1/jobs?state=running and GET /v1/jobs/{id}/metrics at a fixed
# rate from an open-loop load tool on loopback (daemon/examples/api_load.rs).
# Usage: bench/api/run.sh [rate] [seconds]; GANTRY_BENCH_DATABASE_URL names the server
# (default: the local one). The benchmark database is created and dropped here.
set -euo pipefail
cd "$(dirname "$0")/../.."
rate="${1:-200}"; secs="${2:-30}"
admin="${GANTRY_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
db=gantry_api_bench
url="${admin%/*}/$db"
cargo build --release --quiet -p gantry --bin gantry --example api_load
gantry=target/release/gantry
data=$(mktemp -d)
http=127.0.0.1:18580
sleepers=()
daemon_pid=
cleanup() {
  [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null || true
  [ ${#sleepers[@]} -gt 0 ] && kill "${sleepers[@]}" 2>/dev/null || true
  psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap cleanup EXIT
start_daemon() {
  "$gantry" daemon --http $http --grpc 127.0.0.1:18581 --database-url "$url" --data-dir "$data" \
    --devices cpu:128 --heartbeat-timeout 86400 >>"$data/daemon.log" 2>&1 &
  daemon_pid=$!
  for _ in $(seq 100); do curl -sf "http://$http/readyz" >/dev/null && return; sleep 0.1; done
  echo "the daemon did not start:"; cat "$data/daemon.log"; exit 1
}
psql -q "$admin" -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" -c "CREATE DATABASE $db"
start_daemon                     # creates the schema
kill "$daemon_pid"; wait "$daemon_pid" || true; daemon_pid=
echo "seeding 10,000 jobs and 1,000,000 metric rows..."
spec='{"model":{"path":"/nonexistent/model"},"data":{"train":"/nonexistent/data.bin"}}'
time psql -q "$url" -v ON_ERROR_STOP=1 -v spec="$spec" -f bench/api/seed.sql
# The 100 running jobs get live "workers" (sleeping processes) that the daemon re-adopts, so the
# supervisor tracks 100 live jobs during the benchmark, as it would in service.
values=()
for j in $(seq 9901 10000); do
  sleep 3600 & p=$!; sleepers+=("$p")
  start=$(awk '{ sub(/^.*\) /, ""); print $20 }' "/proc/$p/stat")
  values+=("($j, 0, 1, $p, $start, 0)")
done
psql -q "$url" -c "INSERT INTO workers (job_id, rank, attempt, pid, proc_start, started_ms) VALUES $(IFS=,; echo "${values[*]}")"
start_daemon
echo "daemon up: $(curl -s "http://$http/v1/jobs?state=running&limit=1000" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["jobs"]), "running jobs")')"
load=target/release/examples/api_load
echo "== GET /v1/jobs?state=running at $rate/s for ${secs}s"
$load "http://$http" "$rate" "$secs" '/v1/jobs?state=running'
echo "== GET /v1/jobs/{id}/metrics at $rate/s for ${secs}s (100 steps a job)"
$load "http://$http" "$rate" "$secs" '/v1/jobs/{id}/metrics'
echo "== both, alternating, $rate/s in all"
$load "http://$http" "$rate" "$secs" '/v1/jobs?state=running' '/v1/jobs/{id}/metrics'
