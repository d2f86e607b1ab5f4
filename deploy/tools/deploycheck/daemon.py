"""`gantry daemon`'s command line, checked against `gantry daemon --help` of a built binary."""

from __future__ import annotations

import ipaddress
import os
import re
import shlex
from pathlib import Path

from .report import Report, first_lines, run


class Daemon:
    """`gantry daemon --help` of a built binary: its flags and their GANTRY_* variables."""

    def __init__(self, binary: Path, root: Path, report: Report) -> None:
        self.binary = binary
        self.report = report
        self.flags: set[str] = set()
        self.value_flags: set[str] = set()
        self.env: set[str] = set()
        self.used_flags: set[str] = set()
        self.used_env: set[str] = set()
        self.ready = False
        if not binary.is_file() or not os.access(binary, os.X_OK):
            report.fail("gantry binary", f"{binary} is not an executable (build it with `cargo build --release`, "
                        "or give its path: deploy/check --gantry-bin PATH, or GANTRY_BIN)")
            return
        out = run([str(binary), "daemon", "--help"], env=self.clean_env())
        if out.returncode != 0:
            report.fail("gantry daemon --help", first_lines(out.stderr))
            return
        for line in out.stdout.splitlines():
            m = re.match(r"^\s+(?:-\w, )?(--[a-z0-9-]+)( <[^>]+>)?", line)
            if m:
                self.flags.add(m.group(1))
                if m.group(2):
                    self.value_flags.add(m.group(1))
            self.env.update(re.findall(r"\[env: (GANTRY_[A-Z0-9_]+)=", line))
        version = run([str(binary), "--version"], env=self.clean_env()).stdout.strip()
        report.tools["gantry"] = f"{version} ({binary})"
        # Variables read elsewhere than the daemon's flags (GANTRY_LOG, GANTRY_KERNEL_CACHE, ...):
        # the ones the sources name.
        self.source_env: set[str] = set()
        for crate in ("daemon", "kernels", "engine", "api"):
            for f in (root / crate / "src").rglob("*.rs"):
                self.source_env.update(re.findall(r'"(GANTRY_[A-Z0-9_]+)"', f.read_text(errors="replace")))
        self.ready = report.check(
            {"--http", "--grpc", "--tokens", "--data-dir"} <= self.flags and "GANTRY_TOKENS" in self.env,
            "gantry daemon --help",
            f"could not read its flags from the help text (found {sorted(self.flags)})",
            f"{len(self.flags)} flags, {len(self.env)} GANTRY_* variables",
        )

    @staticmethod
    def clean_env() -> dict[str, str]:
        # The caller's GANTRY_* variables must not change what the binary says or accepts.
        return {k: v for k, v in os.environ.items() if not k.startswith("GANTRY_")}

    def check_argv(self, where: str, argv: list[str], env: dict[str, str]) -> None:
        """`gantry daemon ARGV` with environment ENV (the image's and the deployment's), as run by
        WHERE."""
        if not self.ready:
            self.report.fail(f"{where}: daemon flags", "not checked: no usable gantry binary")
            return
        unknown = []
        given: dict[str, str | None] = {}
        i = 0
        while i < len(argv):
            a = argv[i]
            if a.startswith("--"):
                name, eq, value = a.partition("=")
                if name not in self.flags:
                    unknown.append(name)
                elif name in self.value_flags and not eq:
                    i += 1
                    value = argv[i] if i < len(argv) else ""
                given[name] = value if (eq or name in self.value_flags) else None
                self.used_flags.add(name)
            i += 1
        if unknown:
            self.report.fail(f"{where}: daemon flags", f"`gantry daemon` has no flag {', '.join(unknown)} "
                             f"(its flags: {' '.join(sorted(self.flags))})")
            return
        parsed = run([str(self.binary), "daemon", *argv, "--help"], env=self.clean_env())
        if parsed.returncode != 0:
            self.report.fail(f"{where}: daemon flags", f"`gantry daemon {shlex.join(argv)}` does not parse: "
                             + first_lines(parsed.stderr, 3))
            return
        self.report.ok(f"{where}: daemon flags", f"`gantry daemon {shlex.join(argv)}` parses")
        bad_env = sorted(k for k in env if k.startswith("GANTRY_") and k not in self.env | self.source_env)
        self.used_env.update(k for k in env if k.startswith("GANTRY_"))
        self.report.check(not bad_env, f"{where}: GANTRY_* variables",
                          f"{', '.join(bad_env)}: neither a `gantry daemon` flag's variable nor read by the sources",
                          ", ".join(sorted(k for k in env if k.startswith("GANTRY_"))) or "none")
        # The daemon refuses a non-loopback listener without tokens (daemon/src/config.rs).
        if "--insecure" in given:
            self.report.fail(f"{where}: tokens", "--insecure: a deployment must use --tokens")
            return
        exposed = []
        for flag, var, default in (("--http", "GANTRY_HTTP", "127.0.0.1:8080"), ("--grpc", "GANTRY_GRPC", "127.0.0.1:8081")):
            addr = given.get(flag) or env.get(var) or default
            if not is_loopback(addr):
                exposed.append(f"{flag} {addr}")
        has_tokens = bool(given.get("--tokens") or env.get("GANTRY_TOKENS"))
        if exposed:
            self.report.check(has_tokens, f"{where}: tokens",
                              f"{', '.join(exposed)} is not loopback and no --tokens/GANTRY_TOKENS is given: "
                              "the daemon would refuse to start", f"{', '.join(exposed)} with a tokens file")


def listen_port(addr: str) -> int | None:
    m = re.match(r"^(?:\[[^\]]*\]|[^:]*):(\d+)$", addr or "")
    return int(m.group(1)) if m else None


def is_loopback(addr: str) -> bool:
    host = addr.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def daemon_flag(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None
