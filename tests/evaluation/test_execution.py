"""The execution sandbox on real benchmark problems: reference solutions pass, wrong ones fail."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

from dylora_moe.data import humaneval
from dylora_moe.evaluation.execution import _isolation, check_javascript, check_python, pass_at_1


def test_humaneval_reference_passes_and_a_wrong_body_fails():
    problem = humaneval()[0]
    tests = f"{problem.meta['test']}\ncheck({problem.meta['entry_point']})"
    assert check_python(problem.prompt + problem.response, tests).passed
    wrong = check_python(problem.prompt + "    return False\n", tests)
    assert not wrong.passed and "AssertionError" in wrong.stderr


def test_timeouts_and_memory_are_contained():
    slow = check_python("while True:\n    pass", "", timeout=1.0)
    assert not slow.passed and slow.timed_out
    hungry = check_python("x = bytearray(4 * 1024 ** 3)", "")
    assert not hungry.passed and "MemoryError" in hungry.stderr


@pytest.mark.skipif("unshare" not in _isolation(), reason="no network namespaces here (needs root or user namespaces)")
def test_candidates_cannot_reach_the_network():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        probe = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        assert not check_python(probe, "").passed  # a listening port of this process is out of reach


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_javascript_console_assert_failures_count():
    program = "const add = (a, b) => a + b;"
    assert check_javascript(program, "console.assert(add(2, 2) === 4);").passed
    failed = check_javascript(program, "console.assert(add(2, 2) === 5);")
    assert not failed.passed and "assertion failed" in failed.stderr


def test_pass_at_1():
    results = [check_python("x = 1", "assert x == 1"), check_python("x = 1", "assert x == 2")]
    assert pass_at_1(results) == 0.5 and pass_at_1([]) == 0.0


@pytest.mark.parametrize("body", ["    import sys\n    sys.exit(0)\n", "    import os\n    os._exit(0)\n",
                                  "    print(a - b)\n    exit()\n"])
def test_a_candidate_that_exits_with_status_0_before_the_tests_fails(body):
    """Passing needs the random marker the tests end with, not only exit status 0."""
    tests = "assert add(2, 2) == 4"
    assert check_python("def add(a, b):\n    return a + b\n", tests).passed
    early = check_python(f"def add(a, b):\n{body}", f"{tests}\n")
    assert early.returncode == 0 and not early.passed
    dumps_itself = check_python("print(open(__file__).read())\nimport sys\nsys.exit(0)", "")
    assert not dumps_itself.passed  # its own source holds the marker's halves, never the marker


@pytest.mark.skipif(shutil.which("node") is None, reason="Node.js is not installed")
def test_a_javascript_candidate_that_exits_early_fails():
    early = check_javascript("const add = (a, b) => { process.exit(0); };", "console.assert(add(2, 2) === 4);")
    assert early.returncode == 0 and not early.passed


def test_processes_a_candidate_starts_die_with_it_and_output_is_capped():
    """A detached grandchild is killed when the check returns (before, it kept running and writing), and a
    flood of output is cut at the file-size limit instead of filling the scorer's memory."""
    import time

    folder = Path(tempfile.mkdtemp(dir="/tmp"))  # writable by the sandbox's user: only the kill stops the write
    folder.chmod(0o777)

    def spawn(flag: Path, delay: float) -> str:
        return (f"import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep({delay})\n"
                f"    open({str(flag)!r}, 'w').write('x')\n    os._exit(0)\ntime.sleep(0.5)\n")

    assert check_python(spawn(folder / "written", 0), "").passed
    assert (folder / "written").exists()  # a grandchild can write there while the candidate runs
    assert check_python(spawn(folder / "late", 2), "").passed
    time.sleep(3)
    assert not (folder / "late").exists()  # but not after the check returned
    shutil.rmtree(folder)
    flood = check_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", "", timeout=5.0)
    assert not flood.passed and len(flood.stdout) <= 4000


@pytest.mark.skipif(os.geteuid() != 0 or "setpriv" not in _isolation(), reason="the scorer is not root here")
def test_a_candidate_of_a_root_scorer_runs_as_nobody_and_cannot_touch_the_scorer():
    probe = ("import os\nassert os.getuid() == 65534\n"
             "try:\n    open(f'/proc/{os.getppid() or 1}/environ').read()\n    raise SystemExit(3)\n"
             "except PermissionError:\n    pass\n")
    result = check_python(probe, "")
    assert result.passed, result.stderr
