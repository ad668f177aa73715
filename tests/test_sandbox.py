"""Python samples in the sandbox: canonical solutions pass; wrong, cheating and harmful programs never do."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from eval_harness.datasets import load_humaneval_x, load_mbpp
from eval_harness.execution import execute
from eval_harness.sandbox import Limits
from tests.conftest import shared_path
from tests.isolation import live_processes, require_isolation


@pytest.fixture(scope="module")
def python_problems():
    return load_humaneval_x(shared_path("humaneval-x"), ["python"])["python"]


def test_all_164_canonical_python_solutions_pass(python_problems):
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda p: execute(p, p.canonical_solution), python_problems))
    failures = [(p.task_id, r["status"], r["output"][-200:]) for p, r in zip(python_problems, rows) if r["status"] != "passed"]
    assert failures == []


def test_mbpp_reference_solutions_pass():
    problems = load_mbpp(shared_path("mbpp", "mbpp.jsonl"))[:20]
    with ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda p: execute(p, p.canonical_solution), problems))
    assert [r["status"] for r in rows] == ["passed"] * 20


CHEATS = {
    "wrong answer": ("    return True\n", "failed"),
    "sys.exit(0) before the tests": ("    import sys; sys.exit(0)\n", "failed"),
    "os._exit(0)": ("    import os; os._exit(0)\n", "failed"),
    "exit at import": ("    pass\nimport sys\nsys.exit(0)\n", "failed"),
    "infinite loop": ("    while True: pass\n", "timeout"),
    "syntax error": ("    return (\n", "compile_error"),
    "memory bomb": ("    x = bytearray(8 << 30)\n", "runtime_error"),
    "output flood": ("    import sys\n    while True: sys.stdout.write('x' * 65536)\n", "sandbox_violation"),
}


@pytest.mark.parametrize("name", list(CHEATS))
def test_cheating_and_harmful_programs_never_pass(python_problems, name):
    completion, status = CHEATS[name]
    row = execute(python_problems[0], completion, Limits(timeout_s=3, cpu_s=5))
    assert row["status"] == status, row
    assert len(row["output"]) <= 4096 + 100


def test_no_network_no_writes_outside_no_fork_bomb(python_problems, tmp_path):
    require_isolation()
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    accepted = []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    net = f"    import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return True\n"
    assert execute(python_problems[0], net)["status"] == "runtime_error"
    assert accepted == []
    target = tmp_path / "escaped"
    os.chmod(tmp_path, 0o777)
    write = f"    open({str(target)!r}, 'w').write('x'); open('/tmp/escaped-codegeex', 'w').write('x')\n    return True\n"
    row = execute(python_problems[0], write)
    assert row["status"] == "failed" or row["status"] == "runtime_error"
    assert not Path("/tmp/escaped-codegeex").exists()
    bomb = "    import os\n    while True:\n        try: os.fork()\n        except OSError: pass\n"
    row = execute(python_problems[0], bomb, Limits(timeout_s=3))
    assert row["status"] in ("timeout", "runtime_error")
    assert execute(python_problems[0], python_problems[0].canonical_solution)["status"] == "passed"


def _zygotes() -> list[int]:
    procs = live_processes()
    return [pid for pid, (parent, cmd) in procs.items() if "def _first_child" in cmd and "codegeex-sandbox" not in cmd
            and f"codegeex-sandbox -p {os.getpid()} " in procs.get(parent, (0, ""))[1]]


def test_python_runs_warm_and_a_dead_warm_interpreter_costs_only_a_cold_rerun(python_problems, caplog):
    """The warm interpreter is used (a module it preloads is there without an import), and when it dies under a run
    the run is repeated cold, with the same verdict."""
    require_isolation()
    probe = "    import sys\n    print('WARM', 'statistics' in sys.modules)\n"
    row = execute(python_problems[0], probe + python_problems[0].canonical_solution)
    assert row["status"] == "passed" and "WARM True" in row["output"], row
    zygotes = _zygotes()
    assert zygotes, "no warm interpreter of this process"
    slow = (probe + "    import time\n    if not getattr(time, 'slept', False):\n        time.slept = True\n"
            "        time.sleep(1.5)\n" + python_problems[0].canonical_solution)  # once: the tests call it seven times
    killer = threading.Timer(0.7, lambda: [os.kill(pid, signal.SIGKILL) for pid in zygotes])
    killer.start()
    with caplog.at_level("WARNING"):
        row = execute(python_problems[0], slow)
    killer.join()
    assert row["status"] == "passed" and "WARM False" in row["output"], row  # the cold rerun
    assert "running this program cold" in caplog.text
    assert "WARM True" in execute(python_problems[0], probe + python_problems[0].canonical_solution)["output"]  # a new one starts
