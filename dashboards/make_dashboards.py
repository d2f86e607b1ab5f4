#!/usr/bin/env python3
"""Writes Gantry's Grafana dashboards (dashboards/*.json) from one description, so their panels
share a layout and every query is written once. Run it after changing a panel:

    python3 dashboards/make_dashboards.py

The queries use only series the daemon exports (docs/daemon.md, "Metrics") and, on the node view,
NVIDIA DCGM exporter series; daemon/tests/dashboards.rs checks that against a live /metrics.
"""
import json
import pathlib

DS = {"type": "prometheus", "uid": "${datasource}"}


def panel(pid, title, exprs, x, y, w=12, h=8, unit="short", kind="timeseries", legend=None, desc=""):
    targets = []
    for i, e in enumerate(exprs):
        expr, fmt = e if isinstance(e, tuple) else (e, legend)
        t = {"refId": chr(65 + i), "datasource": DS, "expr": expr}
        if fmt:
            t["legendFormat"] = fmt
        targets.append(t)
    return {
        "id": pid,
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "targets": targets,
    }


def dashboard(uid, title, panels, variables=()):
    templating = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "hide": 0},
        *variables,
    ]
    return {
        "uid": uid,
        "title": title,
        "tags": ["gantry"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": templating},
        "panels": panels,
    }


def query_var(name, label, query):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": name},
        "definition": query,
        "refresh": 2,
        "includeAll": False,
        "multi": False,
        "hide": 0,
    }


cluster = dashboard(
    "gantry-cluster",
    "Gantry: cluster",
    [
        panel(1, "Jobs by state", ["sum by (state) (gantry_jobs)"], 0, 0, legend="{{state}}", desc="Jobs in each state (gantry_jobs)."),
        panel(2, "Queue length", ["sum(gantry_queue_length)"], 12, 0, w=6, kind="stat", desc="Jobs waiting for devices: queued or restarting."),
        panel(3, "Devices busy", ["sum(gantry_devices_busy)"], 18, 0, w=6, kind="stat", desc="Device slots held by jobs."),
        panel(4, "API latency (p50, p99)", [
            ("histogram_quantile(0.5, sum by (le) (rate(gantry_http_request_duration_seconds_bucket[5m])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(gantry_http_request_duration_seconds_bucket[5m])))", "p99"),
        ], 0, 8, unit="s", desc="REST request latency over all routes."),
        panel(5, "REST requests by status", ["sum by (status) (rate(gantry_http_requests_total[5m]))"], 12, 8, unit="reqps", legend="{{status}}"),
        panel(6, "gRPC calls by outcome", ["sum by (code) (rate(gantry_grpc_requests_total[5m]))"], 0, 16, unit="reqps", legend="{{code}}",
              desc="ok, rejected, unauthorized, unavailable, internal."),
        panel(7, "Restarts (last hour)", ["sum(increase(gantry_worker_restarts_total[1h]))"], 12, 16, kind="stat",
              desc="Jobs restarted after a worker failure."),
    ],
)

job_var = query_var("job", "Job", "label_values(gantry_job_step, job)")
job = dashboard(
    "gantry-job",
    "Gantry: job",
    [
        panel(1, "Loss", ['gantry_job_loss{job="$job"}'], 0, 0, legend="rank {{rank}}"),
        panel(2, "Throughput", ['gantry_job_tokens_per_second{job="$job"}'], 12, 0, legend="rank {{rank}}", unit="short",
              desc="Tokens per second of each rank's last step."),
        panel(3, "Step time", ['gantry_job_step_seconds{job="$job"}'], 0, 8, unit="s", legend="rank {{rank}}"),
        panel(4, "Communication time per step", ['gantry_job_comm_seconds{job="$job"}'], 12, 8, unit="s", legend="rank {{rank}}",
              desc="Time each rank spent in collectives in its last step (data parallelism, ZeRO)."),
        panel(5, "Step", ['gantry_job_step{job="$job"}'], 0, 16, legend="rank {{rank}}"),
        panel(6, "Memory per rank", ['gantry_job_memory_bytes{job="$job"}'], 12, 16, unit="bytes", legend="rank {{rank}}",
              desc="Parameters, gradients and optimizer state the rank holds."),
        panel(7, "Restarts", ['sum(gantry_worker_restarts_total{job="$job"})'], 0, 24, w=6, kind="stat"),
    ],
    [job_var],
)

node = dashboard(
    "gantry-node",
    "Gantry: node",
    [
        panel(1, "Devices busy", ["sum(gantry_devices_busy)"], 0, 0, w=6, kind="stat"),
        panel(2, "Jobs running", ['sum(gantry_jobs{state="running"})'], 6, 0, w=6, kind="stat"),
        panel(3, "Memory held by ranks", ["sum by (job, rank) (gantry_job_memory_bytes)"], 12, 0, unit="bytes", legend="job {{job}} rank {{rank}}"),
        panel(4, "GPU utilisation (DCGM)", ["DCGM_FI_DEV_GPU_UTIL"], 0, 8, unit="percent", legend="GPU {{gpu}}",
              desc="From NVIDIA's DCGM exporter, beside Gantry's series."),
        panel(5, "GPU memory used (DCGM)", [("DCGM_FI_DEV_FB_USED", "GPU {{gpu}} used"), ("DCGM_FI_DEV_FB_FREE", "GPU {{gpu}} free")], 12, 8,
              unit="decmbytes"),
        panel(6, "GPU power and temperature (DCGM)", [("DCGM_FI_DEV_POWER_USAGE", "GPU {{gpu}} W"), ("DCGM_FI_DEV_GPU_TEMP", "GPU {{gpu}} °C")],
              0, 16),
        panel(7, "Throughput of the node's jobs", ["max by (job) (gantry_job_tokens_per_second)"], 12, 16, legend="job {{job}}"),
    ],
)

out = pathlib.Path(__file__).parent
for name, d in [("gantry-cluster", cluster), ("gantry-job", job), ("gantry-node", node)]:
    (out / f"{name}.json").write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote dashboards/{name}.json")
