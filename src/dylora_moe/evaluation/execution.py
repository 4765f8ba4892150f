"""Execution-based checks: run a candidate program with its tests in a sandboxed subprocess.

The candidate runs in a fresh temporary folder with a time limit, address-space, file-size and process-count
limits, no standard input, a minimal environment and, where the kernel allows them (``unshare``), no network
and its own PID namespace (every process it starts dies with it); when this process is root, the candidate
runs as ``nobody`` (``setpriv``), so it can neither read the scorer's environment through ``/proc`` nor signal
it, nor write outside its folder and the world-writable ones. Its output goes to files under the size limit,
not to pipes this process would have to hold. A run passes only when it exits 0 *and* prints a random marker
the tests end with: a candidate that exits early with status 0 (``sys.exit(0)``, ``process.exit(0)``) has run
no test. Python programs run with ``python -I``; JavaScript with Node, where ``console.assert`` is made to
throw (in Node it only prints), so that a failing assertion fails the program. Generated code is never
imported into this process.
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NOBODY = 65534  # uid and gid the candidate runs as when the scorer is root
OUTPUT_LIMIT = 16 * 1024 * 1024  # bytes a candidate may write to any file, its stdout and stderr included
MAX_PROCESSES = 64  # processes (of the candidate's uid) it may start

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


def _works(argv: list[str]) -> bool:
    """Does ``argv`` run this interpreter (so a wrapper that cannot reach it, e.g. ``nobody`` and a Python under
    a private home folder, is not used: every candidate would fail)?"""
    if shutil.which(argv[0]) is None:
        return False
    return subprocess.run([*argv, sys.executable, "-I", "-c", "pass"], capture_output=True, cwd="/").returncode == 0


@functools.cache
def _isolation() -> list[str]:
    """The widest of ``unshare --net --pid --fork --kill-child`` and ``unshare --net`` that works here (root or
    user namespaces), then ``setpriv`` to ``nobody`` when this process is root; nothing where neither exists."""
    wrap = next((argv for argv in (["unshare", "--net", "--pid", "--fork", "--kill-child", "--"],
                                   ["unshare", "--net", "--"]) if _works(argv)), [])
    if os.geteuid() == 0:
        drop = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
        if _works(drop):
            wrap = [*wrap, *drop]
    return wrap


def _limits(memory_mb: int, cpu_seconds: int):
    def apply() -> None:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_seconds, cpu_seconds))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        resource.setrlimit(resource.RLIMIT_FSIZE, (OUTPUT_LIMIT, OUTPUT_LIMIT))
        if os.geteuid() == 0:  # counted per uid: the candidate's (nobody's), not the scorer's
            resource.setrlimit(resource.RLIMIT_NPROC, (MAX_PROCESSES, MAX_PROCESSES))

    return apply


def run_sandboxed(argv: Sequence[str], source: str, filename: str, *, timeout: float = 10.0,
                  memory_mb: int = 1024, marker: str | None = None, files: dict[str, Path] | None = None) -> ExecResult:
    """Write ``source`` to ``filename`` in a fresh temp folder, copy ``files`` (name there -> source path) beside
    it, and run ``argv + [filename]`` there. It passes when it exits 0 and, given a ``marker``, has printed it.
    Every process it started is killed when it ends."""
    with tempfile.TemporaryDirectory(prefix="dylora-exec-") as tmp:
        folder = Path(tmp)
        (folder / filename).write_text(source, encoding="utf-8")
        for name, path in (files or {}).items():
            shutil.copyfile(path, folder / name)
        if os.geteuid() == 0:  # the candidate (nobody) works in its own folder, on its own copies
            for path in (folder, folder / filename, *(folder / name for name in files or {})):
                os.chown(path, NOBODY, NOBODY)
        out, err = folder / ".stdout", folder / ".stderr"
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [*_isolation(), *argv, filename], cwd=tmp, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
                env={"PATH": "/usr/bin:/bin", "HOME": tmp, "LANG": "C.UTF-8"},
                preexec_fn=_limits(memory_mb, int(timeout) + 1), start_new_session=True)
            timed_out = False
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _kill_group(proc.pid)
                proc.wait()
        stdout_text, stderr_text = _tail(out), _tail(err)
    if timed_out:
        return ExecResult(False, None, True, stdout_text, stderr_text)
    passed = proc.returncode == 0 and (marker is None or marker in stdout_text)
    return ExecResult(passed, proc.returncode, False, stdout_text, stderr_text)


def _kill_group(pid: int) -> None:
    """Kill the candidate's session (its children too, where no PID namespace already did)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail(path: Path, size: int = 4000) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - 4 * size))
        return f.read().decode(errors="replace")[-size:]


def _marker() -> tuple[str, str]:
    """A random marker and a source expression printing it without containing it (a candidate that prints its
    own file does not print the marker)."""
    head, tail = secrets.token_hex(8), secrets.token_hex(8)
    return head + tail, f"'{head}' + '{tail}'"


def check_python(program: str, tests: str, *, timeout: float = 10.0,
                 files: dict[str, Path] | None = None) -> ExecResult:
    """Run a Python candidate followed by its tests (asserts, or a ``check(...)`` call the tests include), with
    copies of ``files`` (name -> path) in its folder."""
    marker, printed = _marker()
    return run_sandboxed([sys.executable, "-I"], f"{program}\n\n{tests}\n\nprint({printed})\n", "candidate.py",
                         timeout=timeout, marker=marker, files=files)


def check_javascript(program: str, tests: str, *, timeout: float = 10.0) -> ExecResult:
    """Run a JavaScript candidate and its tests with Node; ``console.assert`` failures fail the run."""
    node = shutil.which("node")
    if node is None:
        raise FileNotFoundError("JavaScript checks need Node.js on PATH (Debian package `nodejs`)")
    marker, printed = _marker()
    return run_sandboxed([node], f"{JS_ASSERT_PRELUDE}{program}\n\n{tests}\n\nconsole.log({printed});\n",
                         "candidate.js", timeout=timeout, marker=marker)


def pass_at_1(results: Sequence[ExecResult]) -> float:
    """Share of problems whose single (greedy) candidate passed."""
    return sum(r.passed for r in results) / len(results) if results else 0.0
