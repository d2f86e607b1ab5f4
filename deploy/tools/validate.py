#!/usr/bin/env python3
"""Offline validation of Gantry's deployment files; run through `deploy/check`, which installs the
tools (requirements.txt) into a virtual environment first.

Three sections, each with the real tool where one installs from a package registry and checks of
its own for what ties the files together:

- dockerfile: hadolint; stages and targets, the build commands against daemon/Cargo.toml, the
  runtime stages (user, ports, health check, data volume, glibc of the base against the builder's),
  and .dockerignore.
- compose: the compose-spec JSON schema (check-jsonschema), yamllint, promtool on the Prometheus
  config; cross-references between the services (database URL, scrape targets, Grafana's mounts
  and data source, the tokens secret, ports, volumes).
- chart: Helm's own Go SDK (helm-python-sdk) lints and renders the chart with several value sets;
  every rendered manifest is validated against Kubernetes' schemas (kubernetes-validate, strict),
  the ServiceMonitor against a subset schema (tools/schemas/servicemonitor.json); cross-references
  between the rendered objects; ShellCheck on the init container's script; every `.Values` key the
  templates read exists in values.yaml.

Everywhere `gantry daemon` is started (the images' CMD, the compose service, the chart's
DaemonSet), its arguments are checked against `gantry daemon --help` of a built binary: each flag
exists, the whole argument list parses (`gantry daemon ARGS --help` exits 0), every GANTRY_*
variable is one the binary or its sources read, and a non-loopback listener has a tokens file.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from pathlib import Path

from deploycheck.chart import check_chart
from deploycheck.compose import check_compose
from deploycheck.daemon import Daemon
from deploycheck.dockerfile import Stage, check_dockerfile
from deploycheck.report import Report, first_lines, run, shellcheck


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--tools", type=Path, required=True, help="the virtual environment's bin/")
    p.add_argument("--gantry-bin", type=Path, required=True)
    p.add_argument("--dockerfile", type=Path)
    p.add_argument("--compose", type=Path)
    p.add_argument("--project-directory", type=Path, help="where the compose file's relative paths start "
                   "(docker compose's --project-directory; default: the compose file's folder)")
    p.add_argument("--prometheus", type=Path)
    p.add_argument("--chart", type=Path)
    p.add_argument("--only", default="dockerfile,compose,chart", help="sections, comma-separated")
    a = p.parse_args()
    root = a.root.resolve()
    dockerfile = (a.dockerfile or root / "deploy/Dockerfile").resolve()
    compose = (a.compose or root / "deploy/compose.yaml").resolve()
    project = (a.project_directory or compose.parent).resolve()
    prometheus = (a.prometheus or root / "deploy/prometheus/prometheus.yml").resolve()
    chart = (a.chart or root / "deploy/helm/gantry").resolve()
    only = set(a.only.split(","))
    unknown = only - {"dockerfile", "compose", "chart"}
    if unknown:
        p.error(f"--only: unknown sections {sorted(unknown)}")

    report = Report()
    for tool in ("hadolint", "check-jsonschema", "yamllint", "shellcheck"):
        out = run([str(a.tools / tool), "--version"])
        text = out.stdout + out.stderr
        m = re.search(r"version:? ?v?(\d+\.\d+(?:\.\d+)?)|(\d+\.\d+\.\d+)", text)
        report.tools[tool] = (m.group(1) or m.group(2)) if m else first_lines(text, 1)
    print("== deploy/check", flush=True)
    shellcheck(a.tools, "deploy/check", (root / "deploy/check").read_text(), report, shell="bash")
    print("== gantry daemon", flush=True)
    daemon = Daemon(a.gantry_bin, root, report)
    stages: dict[str, Stage] = {}

    def section(name: str, check) -> None:
        # A file malformed beyond what a check expects is a finding, not a crash without a summary.
        try:
            check()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            report.fail(name, f"the check stopped: {e!r}")

    if only & {"dockerfile", "compose"}:
        print("== Dockerfile", flush=True)
        section(os.path.relpath(dockerfile, root),
                lambda: stages.update(check_dockerfile(root, dockerfile, a.tools, daemon, report)))
        report.validated.append(f"{os.path.relpath(dockerfile, root)}: hadolint; targets cpu and cuda, builds, runtime "
                                "stages, glibc, .dockerignore (own checks)")
    if "compose" in only:
        print("== compose", flush=True)
        section(os.path.relpath(compose, root),
                lambda: check_compose(root, compose, project, prometheus, a.tools, stages, daemon, report))
        report.validated.append(f"{os.path.relpath(compose, root)}: compose-spec schema (check-jsonschema), yamllint; "
                                "services, database URL, scrape targets, Grafana mounts and data source, tokens secret, "
                                "ports, volumes, Grafana's provisioning files (own checks)")
    if "chart" in only:
        print("== Helm chart", flush=True)
        section("chart", lambda: check_chart(root, chart, a.tools, daemon, report))
    if daemon.used_flags:
        report.validated.append("daemon flags checked against `gantry daemon --help`: " + " ".join(sorted(daemon.used_flags)))
        report.validated.append("GANTRY_* variables checked: " + " ".join(sorted(daemon.used_env)))
    report.not_validated += [
        "the images are not built (no Docker engine here): base image tags, apt packages, the CUDA image's libraries "
        "(its build fails naming a missing one) and the build itself are checked only by a real `docker build`",
        "the compose project is not started: `docker compose config`/`up` (no compose plugin or engine here); "
        "the schema and cross-reference checks stand in",
        "the chart is not installed: no API server, so admission, defaulting, the ServiceMonitor CRD's own schema "
        "(a subset stands in), PVC binding, GPU scheduling and the init container's SQL are not exercised",
    ]
    print("\n== summary", flush=True)
    print("tools:")
    for name, version in report.tools.items():
        print(f"  {name}: {version}")
    print("validated:")
    for line in report.validated:
        print(f"  - {line}")
    print("not validated offline:")
    for line in report.not_validated:
        print(f"  - {line}")
    if report.failures:
        print("failed:")
        for f in report.failures:
            print(f"  - {f}")
    print(f"deploy/check: {report.passed} checks passed, {len(report.failures)} failed", flush=True)
    return 1 if report.failures else 0


if __name__ == "__main__":
    sys.exit(main())
