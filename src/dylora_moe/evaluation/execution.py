"""Execution-based checks: run a candidate program with its tests in a sandboxed subprocess.

The candidate runs in a fresh temporary folder with a time limit, an address-space limit, no standard
input, a minimal environment and, where the kernel allows it (``unshare --net``), no network. Python
programs run with ``python -I``; JavaScript with Node, where ``console.assert`` is made to throw (in Node it
only prints), so that a failing assertion fails the program. Generated code is never imported into this
process.
"""

from __future__ import annotations

import functools
import resource
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

JS_ASSERT_PRELUDE = (
    "console.assert = (cond, ...msg) => { if (!cond) { throw new Error('assertion failed: ' + msg.join(' ')); } };\n"
)


@dataclass
class ExecResult:
    passed: bool
    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str


@functools.cache
def _network_isolation() -> list[str]:
    """``unshare --net --`` when it works here (root or user namespaces), else nothing."""
    if shutil.which("unshare") is None:
        return []
    probe = subprocess.run(["unshare", "--net", "--", "true"], capture_output=True)
    return ["unshare", "--net", "--"] if probe.returncode == 0 else []


def _limits(memory_mb: int, cpu_seconds: int):
    def apply() -> None:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def run_sandboxed(argv: Sequence[str], source: str, filename: str, *, timeout: float = 10.0,
                  memory_mb: int = 1024) -> ExecResult:
    """Write ``source`` to ``filename`` in a fresh temp folder and run ``argv + [filename]`` there."""
    with tempfile.TemporaryDirectory(prefix="dylora-exec-") as tmp:
        (Path(tmp) / filename).write_text(source, encoding="utf-8")
        try:
            proc = subprocess.run(
                [*_network_isolation(), *argv, filename], cwd=tmp, stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"},
                preexec_fn=_limits(memory_mb, int(timeout) + 1),
            )
        except subprocess.TimeoutExpired as err:
            return ExecResult(False, None, True, _text(err.stdout), _text(err.stderr))
    return ExecResult(proc.returncode == 0, proc.returncode, False, proc.stdout[-4000:], proc.stderr[-4000:])


def _text(data) -> str:
    return data.decode(errors="replace")[-4000:] if isinstance(data, bytes) else (data or "")[-4000:]


def check_python(program: str, tests: str, *, timeout: float = 10.0) -> ExecResult:
    """Run a Python candidate followed by its tests (asserts, or a ``check(...)`` call the tests include)."""
    return run_sandboxed([sys.executable, "-I"], f"{program}\n\n{tests}\n", "candidate.py", timeout=timeout)


def check_javascript(program: str, tests: str, *, timeout: float = 10.0) -> ExecResult:
    """Run a JavaScript candidate and its tests with Node; ``console.assert`` failures fail the run."""
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("JavaScript checks need Node.js on PATH (Debian package `nodejs`)")
    return run_sandboxed([node], f"{JS_ASSERT_PRELUDE}{program}\n\n{tests}\n", "candidate.js", timeout=timeout)


def pass_at_1(results: Sequence[ExecResult]) -> float:
    """Share of problems whose single (greedy) candidate passed."""
    return sum(r.passed for r in results) / len(results) if results else 0.0
