"""Python samples in the sandbox: canonical solutions pass; wrong, cheating and harmful programs never do."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Iterator
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


def host_addresses() -> list[str]:
    """127.0.0.1 and the host's non-loopback IPv4 address, if it has one (the route a datagram to TEST-NET-1 would
    take; nothing is sent)."""
    found = ["127.0.0.1"]
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.1", 9))
        found.append(probe.getsockname()[0])
    with contextlib.suppress(OSError):
        found.append(socket.gethostbyname(socket.gethostname()))
    return list(dict.fromkeys(a for a in found if a == "127.0.0.1" or not a.startswith("127.")))


@contextlib.contextmanager
def host_listener() -> Iterator[tuple[int, list[str], list[object]]]:
    """A TCP server on every address of the host: yields (port, the addresses to try, the connections it accepted).
    The list is complete once the block has left: the backlog is drained after the accepting thread stops."""
    server = socket.socket()
    server.bind(("0.0.0.0", 0))
    server.listen(16)
    server.settimeout(0.1)
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept())

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1], host_addresses(), accepted
    finally:
        stop.set()
        thread.join()
        server.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                accepted.append(server.accept())
        server.close()


# what a program without a network may see when it connects: no route (no interface in its namespace), a refusal,
# the sandbox's denial, or no answer at all
NET_REFUSED = {"ENETUNREACH", "EHOSTUNREACH", "ECONNREFUSED", "EACCES", "EPERM", "EADDRNOTAVAIL", "timeout"}


def assert_not_connected(output: str, hosts: list[str]) -> None:
    """The program printed ``NET <host> <outcome>`` for every address it tried, and none is a connection."""
    outcomes = dict(line.split()[1:3] for line in output.splitlines() if line.startswith("NET "))
    assert set(outcomes) == set(hosts), ("no connection outcome for every address: did it try?", hosts, output)
    assert set(outcomes.values()) <= NET_REFUSED, outcomes


def test_no_network_no_writes_outside_no_fork_bomb(python_problems, tmp_path):
    require_isolation()
    net = ("    import errno, socket\n    for host in HOSTS:\n        try:\n"
           "            socket.create_connection((host, PORT), timeout=2).close()\n"
           "            print('NET', host, 'connected')\n"
           "        except socket.timeout:\n            print('NET', host, 'timeout')\n"
           "        except OSError as e:\n            print('NET', host, errno.errorcode.get(e.errno, e.errno))\n"
           "    return True\n")
    with host_listener() as (port, hosts, accepted):
        row = execute(python_problems[0], net.replace("HOSTS", repr(hosts)).replace("PORT", str(port)))
    assert row["status"] == "failed", row  # it ran to its wrong answer
    assert_not_connected(row["output"], hosts)
    assert accepted == [], (accepted, row["output"])
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
