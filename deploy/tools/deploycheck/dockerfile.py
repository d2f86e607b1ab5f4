"""deploy/Dockerfile and .dockerignore."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tomllib
from pathlib import Path

from .daemon import Daemon, daemon_flag, listen_port
from .report import Report, first_lines, run


# glibc of the bases a runtime stage may use, against the builder's Debian release: a binary linked
# against a newer glibc than the runtime's does not start.
GLIBC = {"bullseye": (2, 31), "bookworm": (2, 36), "trixie": (2, 41),
         "ubuntu20.04": (2, 31), "ubuntu22.04": (2, 35), "ubuntu24.04": (2, 39)}


def glibc_of(image: str) -> tuple[int, int] | None:
    for name, v in GLIBC.items():
        if name in image:
            return v
    return None


class Stage:
    def __init__(self, base: str, name: str) -> None:
        self.base, self.name = base, name
        self.instructions: list[tuple[str, str]] = []

    def all(self, op: str) -> list[str]:
        return [a for o, a in self.instructions if o == op]

    def last(self, op: str) -> str | None:
        found = self.all(op)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        out = {}
        for a in self.all("ENV"):
            for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', a):
                out[k] = v.strip('"')
        return out


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    lines, cur = [], ""
    for raw in text.splitlines():
        # Comments, also between continued lines (Docker drops them there too).
        if raw.lstrip().startswith("#"):
            continue
        if raw.rstrip().endswith("\\"):
            cur += raw.rstrip()[:-1] + " "
            continue
        cur += raw
        if cur.strip():
            lines.append(cur.strip())
        cur = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        op, _, rest = line.partition(" ")
        op = op.upper()
        if op == "ARG" and not stages:
            k, _, v = rest.partition("=")
            args[k.strip()] = v.strip()
        elif op == "FROM":
            m = re.match(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.I)
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda x: args.get(x.group(1) or x.group(2), x.group(0)), m.group(1))
            stages.append(Stage(base, (m.group(2) or "").lower()))
        elif stages:
            stages[-1].instructions.append((op, rest.strip()))
    return args, stages


def check_dockerfile(root: Path, dockerfile: Path, tools: Path, daemon: Daemon, report: Report) -> dict[str, Stage]:
    rel = os.path.relpath(dockerfile, root)
    out = run([str(tools / "hadolint"), "--config", str(root / "deploy/tools/hadolint.yaml"), "--no-color", str(dockerfile)])
    report.check(out.returncode == 0, f"{rel}: hadolint", first_lines(out.stdout + out.stderr), "no findings")
    _, stages = parse_dockerfile(dockerfile.read_text())
    by_name = {s.name: s for s in stages if s.name}
    report.check({"cpu", "cuda"} <= set(by_name), f"{rel}: targets", f"needs stages `cpu` and `cuda`, has {sorted(by_name)}",
                 "cpu, cuda")
    manifest = tomllib.loads((root / "daemon/Cargo.toml").read_text())
    package, features = manifest["package"]["name"], manifest.get("features", {})
    builds: dict[str, str] = {}
    for s in stages:
        for cmd in s.all("RUN"):
            m = re.search(r"cargo build ([^&;]*)", cmd)
            if m:
                builds[s.name] = m.group(1)
    for target, want_features in (("cpu", False), ("cuda", True)):
        stage = by_name.get(target)
        if not stage:
            continue
        sources = [re.search(r"--from=(\S+)", c).group(1) for c in stage.all("COPY") if "--from=" in c]
        build = next((builds[s] for s in sources if s in builds), None)
        if not report.check(build is not None, f"{rel}: {target} build", "copies no stage that runs `cargo build`",
                            f"from stage {sources}"):
            continue
        flags = build.split()
        report.check("--release" in flags and "--locked" in flags and daemon_flag(flags, "-p") == package,
                     f"{rel}: {target} build", f"`cargo build {build}` must be --release --locked -p {package}",
                     f"cargo build {build.strip()}")
        feats = daemon_flag(flags, "--features")
        if want_features:
            report.check(feats == "cuda" and "cuda" in features, f"{rel}: {target} features",
                         f"needs --features cuda (package {package} has features {sorted(features)})", "--features cuda")
        else:
            report.check(feats is None, f"{rel}: {target} features", f"the CPU image builds with --features {feats}", "none")
        for s in sources:
            report.check(s in by_name and stages.index(by_name[s]) < stages.index(stage), f"{rel}: {target} COPY --from",
                         f"stage {s} is not an earlier stage")
        builder = next((st for st in stages if st.name in sources), None)
        root_base = builder
        while root_base and root_base.base.lower() in by_name:
            root_base = by_name[root_base.base.lower()]
        built_on, runs_on = glibc_of(root_base.base if root_base else ""), glibc_of(stage.base)
        report.check(built_on is not None and runs_on is not None and runs_on >= built_on, f"{rel}: {target} glibc",
                     f"the binary is built on {root_base.base if root_base else '?'} and runs on {stage.base}: "
                     "the runtime's glibc must be at least the builder's",
                     f"built on {root_base.base} (glibc {'.'.join(map(str, built_on))}), runs on {stage.base} "
                     f"(glibc {'.'.join(map(str, runs_on))})" if built_on and runs_on else "")
        base_ok = stage.base.startswith("debian:") and stage.base.endswith("-slim") if target == "cpu" \
            else stage.base.startswith("nvidia/cuda:") and "-runtime-" in stage.base
        report.check(base_ok, f"{rel}: {target} base", f"unexpected base image {stage.base}", stage.base)
        # The runtime stage: non-root, the daemon as entry point, ports, health, data volume.
        user = (stage.last("USER") or "root").split(":")[0]
        report.check(user.isdigit() and int(user) != 0, f"{rel}: {target} user",
                     f"USER {user}: must be a numeric non-root uid (Kubernetes' runAsNonRoot checks it)", f"uid {user}")
        entry, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
        try:
            entry_l, cmd_l = json.loads(entry or "null"), json.loads(cmd or "null")
        except json.JSONDecodeError:
            entry_l = cmd_l = None
        if not report.check(entry_l == ["gantry"] and isinstance(cmd_l, list) and cmd_l[:1] == ["daemon"],
                            f"{rel}: {target} entry point", f'needs ENTRYPOINT ["gantry"] and CMD ["daemon", ...] '
                            f"(has {entry} / {cmd})", 'ENTRYPOINT ["gantry"], CMD ["daemon", ...]'):
            continue
        env = stage.env()
        daemon.check_argv(f"{rel} {target} CMD", cmd_l[1:], env)
        http = daemon_flag(cmd_l, "--http") or env.get("GANTRY_HTTP") or ""
        grpc = daemon_flag(cmd_l, "--grpc") or env.get("GANTRY_GRPC") or ""
        exposed = set(" ".join(stage.all("EXPOSE")).split())
        ports = {str(listen_port(http)), str(listen_port(grpc))}
        report.check(ports <= exposed, f"{rel}: {target} EXPOSE", f"exposes {sorted(exposed)}, listens on {sorted(ports)}",
                     " ".join(sorted(exposed)))
        health = stage.last("HEALTHCHECK") or ""
        report.check(f":{listen_port(http)}/healthz" in health, f"{rel}: {target} HEALTHCHECK",
                     f"must ask /healthz on the REST port {listen_port(http)} (has: {health or 'none'})",
                     re.sub(r"\s+", " ", health.split("CMD", 1)[-1]).strip())
        try:
            tool = json.loads(health.split("CMD", 1)[1])[0]
        except (IndexError, ValueError):
            tool = health.split("CMD", 1)[-1].split()[0] if "CMD" in health else ""
        installs = " ".join(stage.all("RUN"))
        report.check(tool in ("curl", "wget") and re.search(rf"install[^&]*\b{tool}\b", installs) is not None,
                     f"{rel}: {target} HEALTHCHECK tool", f"`{tool}` is not installed in the stage", f"{tool} installed")
        data_dir = env.get("GANTRY_DATA_DIR")
        volumes = " ".join(stage.all("VOLUME"))
        report.check(bool(data_dir) and data_dir in volumes, f"{rel}: {target} data volume",
                     f"GANTRY_DATA_DIR={data_dir} must be a VOLUME (has {volumes or 'none'})", f"VOLUME {data_dir}")
    check_dockerignore(root, report)
    return by_name


def check_dockerignore(root: Path, report: Report) -> None:
    path = root / ".dockerignore"
    if not report.check(path.is_file(), ".dockerignore", "missing at the repository root"):
        return
    patterns = [l.strip() for l in path.read_text().splitlines() if l.strip() and not l.startswith("#")]

    def ignored(p: str) -> bool:
        hit = False
        for pat in patterns:
            neg = pat.startswith("!")
            pat = pat.lstrip("!").strip("/")
            pats = [pat, pat[3:]] if pat.startswith("**/") else [pat]
            parts = p.split("/")
            if any(fnmatch.fnmatch("/".join(parts[:i]), q) for q in pats for i in range(1, len(parts) + 1)):
                hit = not neg
        return hit

    must_ignore = ["target", ".git", "runs", "gantry-data", "deploy/tokens.toml"]
    missing = [p for p in must_ignore if not ignored(p)]
    report.check(not missing, ".dockerignore: excluded", f"does not exclude {missing}", ", ".join(must_ignore))
    manifest = tomllib.loads((root / "Cargo.toml").read_text())
    needed = ["Cargo.toml", "Cargo.lock", "migrations/postgres", "migrations/sqlite", *manifest["workspace"]["members"]]
    needed += [f"{m}/src" for m in manifest["workspace"]["members"]]
    # What the sources read at compile time: include_str!/include_bytes! (from the file's folder),
    # sqlx::migrate! (from the crate's), and the build scripts' inputs.
    for member in manifest["workspace"]["members"]:
        crate = root / member
        for f in (crate / "src").rglob("*.rs"):
            text = f.read_text(errors="replace")
            for path in re.findall(r'include_(?:str|bytes)!\(\s*"([^"]+)"', text):
                needed.append(os.path.relpath((f.parent / path).resolve(), root))
            for path in re.findall(r'migrate!\(\s*"([^"]+)"', text):
                needed.append(os.path.relpath((crate / path).resolve(), root))
        if (crate / "build.rs").is_file():
            needed.append(f"{member}/build.rs")
            for path in re.findall(r'"([\w./-]+\.proto)"', (crate / "build.rs").read_text()):
                needed.append(f"{member}/{path}")
    needed = sorted(set(needed))
    lost = [p for p in needed if ignored(p)]
    report.check(not lost, ".dockerignore: kept", f"excludes what the build needs: {lost}",
                 f"the manifests, the crates' sources and {len(needed)} files and folders they read at compile time")
