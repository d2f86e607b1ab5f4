"""What was checked, with which tool, and what failed; the linters run on several files."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


class Report:
    """What was checked, with which tool, and what failed."""

    def __init__(self) -> None:
        self.passed = 0
        self.failures: list[str] = []
        self.tools: dict[str, str] = {}
        self.validated: list[str] = []
        self.not_validated: list[str] = []

    def ok(self, what: str, detail: str = "") -> None:
        self.passed += 1
        print(f"ok    {what}" + (f": {detail}" if detail else ""), flush=True)

    def fail(self, what: str, detail: str) -> None:
        self.failures.append(f"{what}: {detail}")
        print(f"FAIL  {what}: {detail}", flush=True)

    def note(self, what: str, detail: str) -> None:
        print(f"note  {what}: {detail}", flush=True)

    def check(self, cond: bool, what: str, bad: str, good: str = "") -> bool:
        if cond:
            self.ok(what, good)
        else:
            self.fail(what, bad)
        return cond


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def first_lines(text: str, n: int = 12) -> str:
    lines = [l for l in text.strip().splitlines() if l.strip()]
    more = f" (… {len(lines) - n} more lines)" if len(lines) > n else ""
    return " | ".join(lines[:n]) + more


def lint(tools: Path, config: Path, files: list[Path], report: Report, label: str | None = None) -> None:
    if not files:
        return
    out = run([str(tools / "yamllint"), "-f", "parsable", "-c", str(config), *map(str, files)])
    what = label or ", ".join(os.path.relpath(f, config.parents[2]) for f in files)
    report.check(out.returncode == 0, f"yamllint {what}", first_lines(out.stdout + out.stderr), "clean")


def shellcheck(tools: Path, what: str, script: str, report: Report, shell: str = "sh") -> None:
    out = run([str(tools / "shellcheck"), "-f", "gcc", "-s", shell, "-"], input=script)
    report.check(out.returncode == 0, f"{what}: shellcheck", first_lines(out.stdout + out.stderr), "clean")
