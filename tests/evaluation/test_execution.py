"""The execution sandbox on real benchmark problems: reference solutions pass, wrong ones fail."""

from __future__ import annotations

import shutil
import socket

import pytest

from dylora_moe.data import humaneval
from dylora_moe.evaluation.execution import _network_isolation, check_javascript, check_python, pass_at_1


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


@pytest.mark.skipif(not _network_isolation(), reason="no network namespaces here (needs root or user namespaces)")
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
