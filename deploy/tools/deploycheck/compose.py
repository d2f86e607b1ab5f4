"""deploy/compose.yaml, the Prometheus config it mounts, and Grafana's provisioning files."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .daemon import Daemon, daemon_flag, listen_port
from .dockerfile import Stage
from .report import Report, first_lines, lint, run, shellcheck


def interpolate(value, env: dict[str, str], errors: list[str]):
    """Compose's variable interpolation, against ENV (deploy/check uses an empty environment: the
    file's defaults)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env, errors) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("braced") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg") or ""
        val = env.get(name)
        if op in (":-", "-"):
            return val if (val if op == ":-" else val is not None) else arg
        if op in (":?", "?"):
            if not val:
                errors.append(f"${{{name}}} must be set: {arg}")
            return val or ""
        if op in (":+", "+"):
            return arg if val else ""
        return val or ""

    pattern = r"\$\$|\$\{(?P<braced>\w+)(?P<op>:?[-?+])?(?P<arg>[^}]*)\}|\$(?P<bare>[A-Za-z_]\w*)"
    return re.sub(pattern, sub, value)


def as_list(x) -> list:
    if x is None:
        return []
    if isinstance(x, dict):
        return list(x)
    return list(x)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def mounts_of(service: dict, project: Path) -> list[dict]:
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            src, dst = parts[0], parts[1] if len(parts) > 1 else parts[0]
            kind = "bind" if src.startswith((".", "/", "~")) else "volume"
            out.append({"type": kind, "source": src, "target": dst})
        else:
            out.append({"type": v.get("type", "volume"), "source": v.get("source", ""), "target": v.get("target", "")})
    for m in out:
        if m["type"] == "bind":
            m["path"] = (project / m["source"]).resolve()
    return out


def published(service: dict) -> set[int]:
    ports = set()
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.add(int(p.get("target")))
        else:
            ports.add(int(str(p).split(":")[-1].split("/")[0]))
    return ports


def check_compose(root: Path, compose: Path, project: Path, prometheus: Path, tools: Path,
                  stages: dict[str, Stage], daemon: Daemon, report: Report) -> None:
    rel = os.path.relpath(compose, root)
    out = run([str(tools / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose)])
    report.check(out.returncode == 0, f"{rel}: compose-spec schema", first_lines(out.stdout + out.stderr),
                 "check-jsonschema --builtin-schema vendor.compose-spec")
    lint(tools, root / "deploy/tools/yamllint.yaml", [compose, prometheus], report)
    errors: list[str] = []
    doc = interpolate(yaml.safe_load(compose.read_text()), {}, errors)
    report.check(not errors, f"{rel}: interpolation", "; ".join(errors), "every ${VAR} has a default")
    services: dict[str, dict] = doc.get("services") or {}
    volumes = set(doc.get("volumes") or {})
    secrets = doc.get("secrets") or {}

    # What each service is.
    daemons = {}
    for name, s in services.items():
        build = s.get("build") or {}
        cmd = s.get("command")
        if isinstance(cmd, str):
            cmd = shlex.split(cmd)
        if build and isinstance(build, dict):
            context = (project / build.get("context", ".")).resolve()
            dockerfile = (context / build.get("dockerfile", "Dockerfile")).resolve()
            report.check(dockerfile.is_file(), f"{rel}: {name} build", f"{dockerfile} does not exist",
                         os.path.relpath(dockerfile, root))
            report.check(context == root, f"{rel}: {name} build context", f"{context} is not the repository root", ".")
            target = build.get("target")
            stage = stages.get(target or "")
            if not report.check(stage is not None, f"{rel}: {name} build target",
                                f"target {target!r} is not a stage of {os.path.relpath(dockerfile, root)}", target or ""):
                continue
            argv = cmd or json.loads(stage.last("CMD") or "[]")
            if argv[:1] == ["daemon"]:
                env = {**stage.env(), **env_of(s)}
                daemons[name] = (argv, env, stage)
    if not report.check(bool(daemons), f"{rel}: daemon service", "no service runs `gantry daemon` from deploy/Dockerfile",
                        ", ".join(daemons)):
        return
    for name, (argv, env, stage) in daemons.items():
        where = f"{rel} {name}"
        daemon.check_argv(where, argv[1:], env)
        http = daemon_flag(argv, "--http") or env.get("GANTRY_HTTP", "127.0.0.1:8080")
        grpc = daemon_flag(argv, "--grpc") or env.get("GANTRY_GRPC", "127.0.0.1:8081")
        want = {listen_port(http), listen_port(grpc)}
        report.check(want <= published(services[name]), f"{where}: ports",
                     f"publishes {sorted(published(services[name]))}, listens on {sorted(want)}", f"{sorted(want)} published")
        mounts = mounts_of(services[name], project)
        tokens = daemon_flag(argv, "--tokens") or env.get("GANTRY_TOKENS")
        targets = []
        for sec in services[name].get("secrets") or []:
            src = sec if isinstance(sec, str) else sec.get("source")
            tgt = f"/run/secrets/{src}" if isinstance(sec, str) else sec.get("target", f"/run/secrets/{src}")
            if not tgt.startswith("/"):
                tgt = f"/run/secrets/{tgt}"
            report.check(src in secrets, f"{where}: secret {src}", "not declared under the top-level secrets")
            targets.append(tgt)
            file = (secrets.get(src) or {}).get("file")
            if file and not (project / file).exists():
                report.note(f"{where}: secret {src}", f"{file} does not exist here: the operator makes it "
                            "(`gantry token new --append`, see docs/operations.md); deploy/tokens.example.toml shows its form")
        report.check(tokens in targets or any(m["target"] == tokens for m in mounts), f"{where}: tokens file",
                     f"GANTRY_TOKENS/--tokens {tokens} is not where a secret or volume is mounted", f"{tokens} (a secret)")
        data_dir = daemon_flag(argv, "--data-dir") or env.get("GANTRY_DATA_DIR")
        report.check(any(m["target"] == data_dir and m["type"] == "volume" for m in mounts), f"{where}: data directory",
                     f"{data_dir} is not on a named volume (runs and checkpoints would die with the container)", data_dir or "")
        url = daemon_flag(argv, "--database-url") or env.get("GANTRY_DATABASE_URL")
        if report.check(bool(url), f"{where}: database", "no GANTRY_DATABASE_URL or --database-url: SQLite in the volume"):
            check_database_url(rel, name, url, services, report)
        deps = services[name].get("depends_on") or {}
        host = urlsplit(url or "").hostname
        if host in services:
            cond = deps.get(host, {}).get("condition") if isinstance(deps, dict) else None
            report.check(cond == "service_healthy", f"{where}: depends_on {host}",
                         f"should wait for {host} with condition service_healthy (has {cond})", "service_healthy")

    # Every service: dependencies, volumes, bind mounts.
    for name, s in services.items():
        deps = s.get("depends_on") or {}
        for dep in as_list(deps):
            if not report.check(dep in services, f"{rel}: {name} depends_on", f"{dep} is not a service"):
                continue
            cond = deps[dep].get("condition") if isinstance(deps, dict) else None
            if cond == "service_healthy":
                has = bool((services[dep].get("healthcheck") or {}).get("test")) or \
                    (dep in daemons and daemons[dep][2].last("HEALTHCHECK") is not None)
                report.check(has, f"{rel}: {name} depends_on {dep}", f"{dep} has no healthcheck to be healthy by",
                             "healthy by its healthcheck")
        test = (s.get("healthcheck") or {}).get("test")
        if isinstance(test, list) and test[:1] == ["CMD-SHELL"]:
            shellcheck(tools, f"{rel}: {name} healthcheck", test[1], report)
        for m in mounts_of(s, project):
            if m["type"] == "volume":
                report.check(m["source"] in volumes or not m["source"], f"{rel}: {name} volume {m['source']}",
                             "not declared under the top-level volumes")
            elif m["type"] == "bind":
                report.check(m["path"].exists(), f"{rel}: {name} mount {m['source']}", f"{m['path']} does not exist",
                             os.path.relpath(m["path"], root))
    check_prometheus(root, rel, project, prometheus, tools, services, daemons, report)
    check_grafana(root, rel, project, tools, services, report)


def check_database_url(rel: str, name: str, url: str, services: dict, report: Report) -> None:
    u = urlsplit(url)
    db = services.get(u.hostname or "")
    if not report.check(db is not None and str(db.get("image", "")).startswith("postgres:"), f"{rel} {name}: database host",
                        f"{u.hostname} is not a postgres service of the file", f"{u.hostname} (postgres)"):
        return
    env = env_of(db)
    want = {"user": env.get("POSTGRES_USER", "postgres"), "password": env.get("POSTGRES_PASSWORD"),
            "database": env.get("POSTGRES_DB") or env.get("POSTGRES_USER", "postgres"), "port": 5432}
    have = {"user": u.username, "password": u.password, "database": u.path.lstrip("/"), "port": u.port or 5432}
    diff = [k for k in want if want[k] != have[k]]
    report.check(not diff, f"{rel} {name}: database URL", f"{', '.join(diff)} differ from the postgres service's",
                 "user, password, database and port match the postgres service")


def check_prometheus(root: Path, rel: str, project: Path, prometheus: Path, tools: Path, services: dict,
                     daemons: dict, report: Report) -> None:
    prom_rel = os.path.relpath(prometheus, root)
    promtool = shutil.which("promtool")
    if promtool:
        out = run([promtool, "check", "config", "--syntax-only", str(prometheus)])
        if out.returncode != 0 and "unknown long flag" in out.stderr:
            out = run([promtool, "check", "config", str(prometheus)])
        version = run([promtool, "--version"]).stdout.splitlines()[:1]
        report.tools["promtool"] = version[0] if version else promtool
        if report.check(out.returncode == 0, f"{prom_rel}: promtool check config", first_lines(out.stdout + out.stderr),
                        "accepted"):
            report.validated.append(f"{prom_rel}: promtool check config; its scrape targets against the compose file")
    else:
        report.not_validated.append(f"{prom_rel} by promtool: not on PATH (Debian's `prometheus` package has it; "
                                    "scripts/test installs it)")
        report.note(f"{prom_rel}: promtool", "not on PATH: not checked by Prometheus' own parser")
    name = next((n for n, s in services.items() if str(s.get("image", "")).startswith("prom/prometheus")), None)
    if not report.check(name is not None, f"{rel}: prometheus service", "none (image prom/prometheus)", name or ""):
        return
    s = services[name]
    config_path = next((a.split("=", 1)[1] for a in s.get("command") or [] if a.startswith("--config.file=")),
                       "/etc/prometheus/prometheus.yml")
    mount = next((m for m in mounts_of(s, project) if m["target"] == config_path), None)
    report.check(mount is not None and mount.get("path") == prometheus.resolve(), f"{rel}: {name} config",
                 f"{prom_rel} is not mounted at {config_path}", f"{prom_rel} at {config_path}")
    config = yaml.safe_load(prometheus.read_text())
    jobs = config.get("scrape_configs") or []
    scraped = set()
    for job in jobs:
        targets = [t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
        for t in targets:
            host, _, port = t.rpartition(":")
            if not report.check(host in daemons, f"{prom_rel}: target {t}", f"{host} is not the compose file's daemon service "
                                f"({', '.join(daemons)})", f"the {host} service"):
                continue
            argv, env, _ = daemons[host]
            http = daemon_flag(argv, "--http") or env.get("GANTRY_HTTP", "127.0.0.1:8080")
            metrics = daemon_flag(argv, "--metrics") or env.get("GANTRY_METRICS")
            want = listen_port(metrics) if metrics else listen_port(http)
            report.check(port.isdigit() and int(port) == want, f"{prom_rel}: target {t}",
                         f"the daemon serves /metrics on port {want}", f"port {want} serves /metrics (no token needed)")
            report.check(job.get("metrics_path", "/metrics") == "/metrics" and job.get("scheme", "http") == "http",
                         f"{prom_rel}: job {job.get('job_name')}", "must scrape http://…/metrics", "http, /metrics")
            report.check(job.get("honor_labels") is True, f"{prom_rel}: job {job.get('job_name')} honor_labels",
                         "must be true: the per-job series' `job` label (the job id, which dashboards/gantry-job.json "
                         "selects on) would be renamed exported_job", "true (keeps the series' job label)")
            scraped.add(host)
    report.check(set(daemons) <= scraped, f"{prom_rel}: scrape targets", f"no target for {sorted(set(daemons) - scraped)}",
                 ", ".join(sorted(scraped)))



def check_grafana(root: Path, rel: str, project: Path, tools: Path, services: dict, report: Report) -> None:
    name = next((n for n, s in services.items() if str(s.get("image", "")).startswith("grafana/grafana")), None)
    if not report.check(name is not None, f"{rel}: grafana service", "none (image grafana/grafana)", name or ""):
        return
    mounts = mounts_of(services[name], project)
    prov = {"dashboards": None, "datasources": None}
    for m in mounts:
        for kind in prov:
            if m["target"].startswith(f"/etc/grafana/provisioning/{kind}/"):
                prov[kind] = m
    lint(tools, root / "deploy/tools/yamllint.yaml", [m["path"] for m in prov.values() if m and m["path"].is_file()], report)
    for kind, m in prov.items():
        if not report.check(m is not None and m["path"].is_file(), f"{rel}: {name} {kind} provisioning",
                            f"no file of the repository is mounted under /etc/grafana/provisioning/{kind}/",
                            f"{os.path.relpath(m['path'], root)} at {m['target']}" if m else ""):
            return
    providers = yaml.safe_load(prov["dashboards"]["path"].read_text()).get("providers") or []
    for p in providers:
        path = (p.get("options") or {}).get("path")
        dash = next((m for m in mounts if m["target"] == path and m["type"] == "bind"), None)
        files = sorted(dash["path"].glob("*.json")) if dash and dash["path"].is_dir() else []
        good = []
        for f in files:
            try:
                if json.loads(f.read_text()).get("uid"):
                    good.append(f.name)
            except json.JSONDecodeError as e:
                report.fail(f"{rel}: {name} dashboard {f.name}", f"not JSON: {e}")
        report.check(bool(good), f"{rel}: {name} dashboards", f"provider {p.get('name')} reads {path}, where no "
                     "folder of dashboards is mounted", f"{', '.join(good)} at {path}")
    sources = yaml.safe_load(prov["datasources"]["path"].read_text()).get("datasources") or []
    for ds in sources:
        u = urlsplit(ds.get("url", ""))
        target = services.get(u.hostname or "")
        listen = 9090
        for a in (target or {}).get("command") or []:
            if a.startswith("--web.listen-address="):
                listen = listen_port(a.split("=", 1)[1]) or listen
        report.check(target is not None and str(target.get("image", "")).startswith("prom/prometheus") and u.port == listen,
                     f"{rel}: {name} data source {ds.get('name')}", f"{ds.get('url')} is not the prometheus service and port",
                     f"{ds.get('url')} is the prometheus service")
