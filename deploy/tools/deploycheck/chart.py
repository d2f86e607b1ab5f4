"""The Helm chart: linted and rendered by Helm's Go SDK, its manifests validated against Kubernetes' schemas
and against each other."""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import yaml

from .daemon import Daemon, daemon_flag, listen_port
from .report import Report, lint, shellcheck


VALUE_SETS = [
    ("default values", {}),
    ("postgresql + serviceMonitor", {"postgresql": {"enabled": True}, "serviceMonitor": {"enabled": True}}),
    ("4 GPUs, TLS, own secrets and claims", {
        "gpu": {"count": 4},
        "daemon": {"metricsPort": 9100, "hostPorts": True, "readRoots": ["/data/inputs", "/data/runs"],
                   "extraArgs": ["--heartbeat-timeout", "60"]},
        "tls": {"existingSecret": "gantry-tls"},
        "tokens": {"entries": [{"user": "alice", "role": "admin", "token_sha256": "ab" * 32}]},
        "database": {"existingSecret": "gantry-db", "existingSecretKey": "url", "perNode": False},
        "inputs": {"existingClaim": "gantry-inputs"},
        "storage": {"existingClaim": "shared-runs"},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    }),
]

KUBE_VERSIONS = ["1.25.0", "1.37.0"]


def check_values_refs(chart: Path, report: Report) -> None:
    """Every `.Values.a.b` (or `$alias.b` of `$alias := .Values.a`) the templates read exists in
    values.yaml: Helm renders a missing key as nothing, silently."""
    values = yaml.safe_load((chart / "values.yaml").read_text()) or {}
    missing, count = [], 0
    for t in sorted((chart / "templates").glob("*")):
        text = t.read_text()
        aliases = dict(re.findall(r"\$(\w+)\s*:=\s*\.Values\.([\w.]+)", text))
        refs = [r for r in re.findall(r"\.Values\.([A-Za-z_][\w.]*)", text)]
        for alias, base in aliases.items():
            refs += [f"{base}.{r}" for r in re.findall(rf"\${alias}\.([A-Za-z_][\w.]*)", text)]
        for ref in refs:
            count += 1
            node = values
            for key in ref.split("."):
                if isinstance(node, dict) and key in node:
                    node = node[key]
                elif isinstance(node, dict):
                    missing.append(f"{t.name}: .Values.{ref}")
                    break
                else:
                    break  # below a leaf (e.g. a free-form map): not the chart's to know
    report.check(not missing, "chart: values read by the templates", "not in values.yaml: " + ", ".join(sorted(set(missing))),
                 f"{count} references, all in values.yaml")


def check_chart(root: Path, chart: Path, tools: Path, daemon: Daemon, report: Report) -> None:
    import helm_python as helm
    from kubernetes_validate import utils as kv
    from kubernetes_validate.version import __version__ as kv_version

    report.tools["helm"] = f"Helm SDK {helm.helm_sdk_version()} via helm-python-sdk (libhelm_c {helm.helm_c_version()})"
    report.tools["kubernetes-validate"] = f"{kv_version} (schemas {', '.join(KUBE_VERSIONS)}, strict)"
    # Each schema file is read and parsed per validation otherwise.
    kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)
    rel = os.path.relpath(chart, root) if chart.is_relative_to(root) else str(chart)
    lint(tools, root / "deploy/tools/yamllint.yaml", [chart / "Chart.yaml", chart / "values.yaml"], report,
         label=f"{rel}/Chart.yaml, values.yaml")
    check_values_refs(chart, report)
    sm_schema = json.loads((root / "deploy/tools/schemas/servicemonitor.json").read_text())
    for label, values in VALUE_SETS:
        where = f"chart [{label}]"
        result = helm.lint(str(chart), values, strict=True, namespace="gantry")
        findings = [m for m in result.get("messages", []) if m.get("severity", 0) >= 2] + \
            [{"path": "", "error": e} for e in result.get("errors", [])]
        report.check(not findings, f"{where}: helm lint --strict",
                     "; ".join(f"{m.get('path')}: {m.get('error')}" for m in findings), "no warnings or errors")
        try:
            with helm.Chart.load(str(chart)) as c:
                rendered = c.render(values, name="gantry", namespace="gantry", is_install=True)
        except Exception as e:  # noqa: BLE001 - any render error is the finding
            report.fail(f"{where}: helm template", str(e))
            continue
        docs = []
        for path, text in sorted(rendered.items()):
            if path.endswith("NOTES.txt") or not text.strip():
                continue
            for d in yaml.safe_load_all(text):
                if d:
                    docs.append((path.split("/", 1)[-1], d))
        kinds = sorted(d["kind"] for _, d in docs)
        report.ok(f"{where}: helm template", f"{len(docs)} manifests ({', '.join(kinds)})")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "manifests.yaml"
            out.write_text("".join(f"---\n# {p}\n{yaml.safe_dump(d, sort_keys=False)}" for p, d in docs))
            lint(tools, root / "deploy/tools/yamllint-rendered.yaml", [out], report, label=f"{where} manifests")
        for path, d in docs:
            what = f"{where}: {d['kind']}/{d['metadata']['name']}"
            if d["kind"] == "ServiceMonitor":
                errs = sorted(jsonschema.Draft202012Validator(sm_schema).iter_errors(d), key=lambda e: list(e.path))
                report.check(not errs, f"{what} schema", "; ".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errs),
                             "ServiceMonitor subset schema (deploy/tools/schemas/servicemonitor.json)")
                continue
            problems = []
            for version in KUBE_VERSIONS:
                try:
                    kv.validate(d, version, strict=True)
                except kv.ValidationError as e:
                    problems.append(f"Kubernetes {version}: {'.'.join(map(str, e.path))}: {e.message}")
                except kv.SchemaNotFoundError as e:
                    problems.append(e.message)
            report.check(not problems, f"{what} schema", "; ".join(problems), f"Kubernetes {' and '.join(KUBE_VERSIONS)}")
        try:
            check_rendered(where, docs, values, tools, daemon, report)
        except (KeyError, IndexError, TypeError, AttributeError) as e:
            report.fail(f"{where}: cross-references", f"a manifest lacks what they read ({e!r}): see its schema findings")
        report.validated.append(f"{where}: {len(docs)} manifests ({', '.join(kinds)}): helm lint --strict and rendered by "
                                f"the Helm SDK; Kubernetes {' and '.join(KUBE_VERSIONS)} schemas (kubernetes-validate, "
                                "strict); yamllint; cross-references (own checks)")


def check_rendered(where: str, docs: list, values: dict, tools: Path, daemon: Daemon, report: Report) -> None:
    objs: dict[tuple[str, str], dict] = {(d["kind"], d["metadata"]["name"]): d for _, d in docs}
    daemonsets = [d for k, d in objs.items() if k[0] == "DaemonSet"]
    if not report.check(len(daemonsets) == 1, f"{where}: DaemonSet", f"{len(daemonsets)} rendered", "one"):
        return
    ds = daemonsets[0]
    pod = ds["spec"]["template"]
    spec = pod["spec"]
    c = spec["containers"][0]
    labels = pod["metadata"].get("labels", {})
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = c.get("volumeMounts", [])
    ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
    secrets = {n: d for (k, n), d in objs.items() if k == "Secret"}
    external: list[str] = []

    # The daemon's command line and environment.
    env = {e["name"]: e.get("value", "<from a Secret>") for e in c.get("env", [])}
    args = c.get("args", [])
    if report.check(args[:1] == ["daemon"], f"{where}: container args", f"must start with `daemon` (has {args[:1]})", ""):
        daemon.check_argv(f"{where} DaemonSet", args[1:], env)
    http = daemon_flag(args, "--http") or ""
    report.check(ports.get("http") == listen_port(http), f"{where}: http port",
                 f"container port http {ports.get('http')} but --http {http}", f"{http}")
    report.check(ports.get("grpc") == listen_port(daemon_flag(args, "--grpc") or ""), f"{where}: grpc port",
                 f"container port grpc {ports.get('grpc')} but --grpc {daemon_flag(args, '--grpc')}")
    metrics = daemon_flag(args, "--metrics")
    if metrics:
        report.check(ports.get("metrics") == listen_port(metrics), f"{where}: metrics port", f"--metrics {metrics} has no port")

    # Files the daemon is told to read or write lie on the pod's volumes.
    def mounted(path: str) -> dict | None:
        best = None
        for m in mounts:
            if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/"):
                if best is None or len(m["mountPath"]) > len(best["mountPath"]):
                    best = m
        return best

    for flag in ("--tokens", "--config", "--tls-cert", "--tls-key", "--data-dir"):
        path = daemon_flag(args, flag)
        if path:
            m = mounted(path)
            report.check(m is not None and m["name"] in volumes, f"{where}: {flag} {path}", "is on no volume of the pod",
                         f"volume {m['name'] if m else ''}")
    tokens_mount = mounted(daemon_flag(args, "--tokens") or "/nonexistent")
    if tokens_mount:
        v = volumes.get(tokens_mount["name"], {})
        report.check("secret" in v and "subPath" not in tokens_mount, f"{where}: tokens volume",
                     "must be a Secret mounted as a directory (a subPath mount never sees the Secret's updates)",
                     f"Secret {v.get('secret', {}).get('secretName')}, mounted as a directory")
    report.check(mounted("/data/runs") is not None and "persistentVolumeClaim" in volumes.get(mounted("/data/runs")["name"], {}),
                 f"{where}: runs volume", "DATA_DIR/runs is not on a PersistentVolumeClaim", "a PersistentVolumeClaim at /data/runs")

    # Probes on the REST port.
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (c.get(probe) or {}).get("httpGet") or {}
        report.check(get.get("path") == path and get.get("port") in ports, f"{where}: {probe}",
                     f"must GET {path} on a named container port (has {get})", f"GET {path} on port {get.get('port')}")

    # GPUs: the limit and --devices agree.
    limits = (c.get("resources") or {}).get("limits") or {}
    gpus = int(limits.get("nvidia.com/gpu", 0))
    devices = daemon_flag(args, "--devices") or ""
    want = int((values.get("gpu") or {}).get("count", 1))
    ids = devices.split(":", 1)[1].split(",") if devices.startswith("cuda:") else []
    report.check(gpus == want and (not ids or ids == [str(i) for i in range(gpus)]), f"{where}: GPUs",
                 f"limit nvidia.com/gpu={gpus}, --devices {devices}, gpu.count {want}",
                 f"nvidia.com/gpu: {gpus}, --devices {devices}")

    report.check(spec.get("enableServiceLinks") is False, f"{where}: enableServiceLinks",
                 "must be false: a Service named gantry would put GANTRY_* variables into the daemon's environment", "false")

    # Non-root.
    psc = spec.get("securityContext") or {}
    report.check(psc.get("runAsNonRoot") is True and int(psc.get("runAsUser", 0)) > 0, f"{where}: securityContext",
                 "the pod must run as a non-root uid", f"runAsNonRoot, uid {psc.get('runAsUser')}")

    # Secrets and claims: rendered here, or named as the operator's.
    def secret_ref(name: str, key: str | None, what: str) -> None:
        if name in secrets:
            data = {**(secrets[name].get("stringData") or {}), **(secrets[name].get("data") or {})}
            report.check(key is None or key in data, f"{where}: {what}", f"Secret {name} has no key {key}",
                         f"Secret {name} (rendered)")
        else:
            external.append(f"Secret {name}" + (f" (key {key})" if key else ""))
    for cont in spec.get("initContainers", []) + spec["containers"]:
        for e in cont.get("env", []):
            ref = (e.get("valueFrom") or {}).get("secretKeyRef")
            if ref:
                secret_ref(ref["name"], ref["key"], f"{cont['name']} env {e['name']}")
        for m in cont.get("volumeMounts", []):
            report.check(m["name"] in volumes, f"{where}: {cont['name']} mount {m['mountPath']}", f"no volume {m['name']}")
    for name, v in volumes.items():
        if "secret" in v:
            keys = [i["key"] for i in v["secret"].get("items", [])]
            for key in keys or [None]:
                secret_ref(v["secret"]["secretName"], key, f"volume {name}")
        if "persistentVolumeClaim" in v:
            claim = v["persistentVolumeClaim"]["claimName"]
            pvc = objs.get(("PersistentVolumeClaim", claim))
            if pvc is None:
                external.append(f"PersistentVolumeClaim {claim}")
            elif name == "runs":
                report.check("ReadWriteMany" in pvc["spec"]["accessModes"], f"{where}: claim {claim}",
                             "the shared runs volume must be ReadWriteMany", "ReadWriteMany")
    if external:
        report.note(f"{where}: expected in the cluster", ", ".join(sorted(set(external))))

    # The init container's script.
    for init in spec.get("initContainers", []):
        cmd = init.get("command", []) + init.get("args", [])
        if len(cmd) >= 3 and cmd[1] == "-c":
            shellcheck(tools, f"{where}: init container {init['name']}", cmd[2], report,
                       shell="bash" if cmd[0].endswith("bash") else "sh")
            config = daemon_flag(args, "--config")
            if config:
                report.check(config in cmd[2] and mounted(config)["name"] in [m["name"] for m in init.get("volumeMounts", [])],
                             f"{where}: --config {config}", "is not written by the init container on a shared volume",
                             f"written by init container {init['name']}")

    # The Service selects the daemon's pods and names its ports; the ServiceMonitor selects the
    # Service and scrapes a port that serves /metrics.
    svc = objs.get(("Service", ds["metadata"]["name"]))
    if report.check(svc is not None, f"{where}: Service", "no Service named like the DaemonSet"):
        sel = svc["spec"]["selector"]
        report.check(all(labels.get(k) == v for k, v in sel.items()), f"{where}: Service selector",
                     f"{sel} does not select the daemon's pods ({labels})", "selects the daemon's pods")
        names = {p["name"]: p for p in svc["spec"]["ports"]}
        report.check({"http", "grpc"} <= set(names) and all(p["targetPort"] in ports for p in names.values()),
                     f"{where}: Service ports", f"{sorted(names)} must include http and grpc, each a container port",
                     ", ".join(f"{n} {p['port']}" for n, p in names.items()))
        for (kind, name), sm in objs.items():
            if kind != "ServiceMonitor":
                continue
            sel = sm["spec"]["selector"].get("matchLabels", {})
            svc_labels = svc["metadata"].get("labels", {})
            report.check(all(svc_labels.get(k) == v for k, v in sel.items()), f"{where}: ServiceMonitor selector",
                         f"{sel} does not select Service {svc['metadata']['name']}", f"selects Service {svc['metadata']['name']}")
            for ep in sm["spec"]["endpoints"]:
                port = names.get(ep.get("port"), {})
                serves = port.get("targetPort") == ("metrics" if metrics else "http")
                report.check(serves and ep.get("path") == "/metrics" and ep.get("honorLabels") is True,
                             f"{where}: ServiceMonitor endpoint {ep.get('port')}",
                             "must scrape /metrics on the port that serves it, with honorLabels (the series' job label)",
                             f"/metrics on {ep.get('port')}, honorLabels")
    sts = [d for (k, _), d in objs.items() if k == "StatefulSet"]
    for s in sts:
        svc_name = s["spec"]["serviceName"]
        report.check(("Service", svc_name) in objs, f"{where}: StatefulSet {s['metadata']['name']}",
                     f"serviceName {svc_name} is not rendered", f"Service {svc_name}")
        url_secret = next((d for (k, n), d in objs.items() if k == "Secret" and "database-url" in (d.get("stringData") or {})), None)
        if url_secret:
            u = urlsplit(url_secret["stringData"]["database-url"])
            report.check(u.hostname == svc_name and (u.port or 5432) == 5432, f"{where}: database URL",
                         f"points at {u.hostname}:{u.port}, not the bundled {svc_name}:5432", f"{svc_name}:5432")
