"""Containment by construction, checked on the host afterwards: nothing of a run outlives it (setsid, double fork,
the harness killed with SIGKILL or stopped by SIGINT), nothing it writes outside its work directory persists, no host
socket or file of the checkout or the data sets is reachable, and no string it can read forges a pass.

As root with namespaces available (CI), a missing isolation fails here, it does not skip: the check that decides it
(:func:`tests.isolation.namespaces_possible`) does not ask the code under test."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from eval_harness import sandbox
from eval_harness.datasets import load_humaneval_x
from eval_harness.execution import execute
from eval_harness.sandbox import Limits
from eval_harness.workdirs import base_dir
from tests.conftest import SHARED, shared_path
from tests.isolation import live_processes, require_isolation

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def problem():
    require_isolation()
    return load_humaneval_x(shared_path("humaneval-x"), ["python"])["python"][0]


@pytest.fixture(autouse=True, params=["helper", "bwrap"])
def backend(request, monkeypatch):
    """Every guarantee under both isolating backends: the default helper and bubblewrap (its measured alternative),
    in this process and in the harnesses the tests start."""
    if request.param == "bwrap" and shutil.which("bwrap") is None:
        pytest.fail("bubblewrap is missing (`make system` installs it)")
    monkeypatch.setenv("CODEGEEX_SANDBOX", request.param)
    monkeypatch.setattr(sandbox, "_BACKEND", request.param)
    return request.param


def run_processes(marker: str = "", harness: int = 0) -> list[tuple[int, str]]:
    """Live host processes of the runs of ``harness`` (default: this process): its sandbox helpers and everything
    under them but its warm interpreters themselves, and processes with ``marker`` in their command line (other
    harnesses may run beside the test: sandbox uids alone do not say whose)."""
    helper = f"codegeex-sandbox -p {harness or os.getpid()} "
    procs = live_processes()

    def under_helper(pid: int) -> bool:
        seen = set()
        while pid in procs and pid not in seen:
            seen.add(pid)
            if helper in procs[pid][1]:
                return True
            pid = procs[pid][0]
        return False

    def idle_zygote(pid: int) -> bool:  # a warm interpreter waiting (its parent: the PID 1 of a -R helper)
        parent = procs.get(procs[pid][0], (0, ""))[1]
        return "def _first_child" in procs[pid][1] and helper in parent and " -R " in parent

    def zygote_helper(pid: int) -> bool:
        return helper in procs[pid][1] and " -R " in procs[pid][1]

    return [(pid, cmd) for pid, (_, cmd) in procs.items()
            if (under_helper(pid) and not idle_zygote(pid) and not zygote_helper(pid)) or (marker and marker in cmd)]


def wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def escaping_daemon(marker: str, then: str) -> str:
    """A completion that leaves a double-forked, setsid, re-grouped ``sleep`` behind, then ``then``."""
    return (f"    import os, time\n    if os.fork() == 0:\n        os.setsid()\n        if os.fork() == 0:\n"
            f"            os.setpgid(0, 0)\n            os.execv('/bin/sleep', ['sleep', '{marker}'])\n"
            f"        os._exit(0)\n    time.sleep(0.3)\n{then}")


def test_nothing_outlives_a_run_whatever_it_does(problem):
    marker = str(900000 + secrets.randbelow(99999))
    limits = Limits(timeout_s=2, cpu_s=5)
    row = execute(problem, escaping_daemon(marker, "    time.sleep(100)\n"), limits)
    assert row["status"] == "timeout" and row["isolated"] is True, row
    assert run_processes(marker) == []  # at once: the sandbox returns only when its namespace is empty
    row = execute(problem, escaping_daemon(marker, "    return False\n"), limits)
    assert row["status"] == "failed", row
    assert run_processes(marker) == []  # the program's own exit ends the run's every process
    bomb = "    import os\n    while True:\n        try: os.fork()\n        except OSError: pass\n"
    assert execute(problem, bomb, limits)["status"] in ("timeout", "runtime_error")
    assert run_processes() == []


HOST_PLACES = ["/tmp", "/var/tmp", "/dev/shm", "/run", "/run/lock", "/var/lock", "/var/lib/codegeex",
               "/var/lib/codegeex/exec", "/root", "/home", "/work", "/usr", "/usr/local", "/etc", "/", "/opt", "/srv",
               "/mnt", "/var", "/var/log", "/dev", "/proc/sys/kernel"]


def _listeners(paths: list[str], abstract: str) -> tuple[list[socket.socket], list[object], threading.Event]:
    servers, accepted, stop = [], [], threading.Event()
    for path in paths:
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        os.chmod(path, 0o777)
        servers.append(s)
    s = socket.socket(socket.AF_UNIX)
    s.bind("\0" + abstract)
    servers.append(s)
    for s in servers:
        s.listen(4)
        s.settimeout(0.1)

    def accept(server: socket.socket) -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                accepted.append(server.accept())

    for s in servers:
        threading.Thread(target=accept, args=(s,), daemon=True).start()
    return servers, accepted, stop


def prober(token: str, sockets: list[str], abstract: str, reads: list[str], places: list[str]) -> str:
    """A completion that tries every way out it is given and prints what worked."""
    return f"""    import json, os, socket
    got = {{"wrote": [], "connected": [], "read": []}}
    for place in {places!r}:
        try:
            with open(os.path.join(place, "escape-{token}"), "w") as fh:
                fh.write("x")
            got["wrote"].append(place)
        except OSError:
            pass
    for path in {sockets!r} + ["\\0{abstract}"]:
        try:
            s = socket.socket(socket.AF_UNIX); s.settimeout(1); s.connect(path); got["connected"].append(path)
        except OSError:
            pass
    for path in {reads!r}:
        try:
            with open(path, "rb") as fh:
                fh.read(1)
            got["read"].append(path)
        except OSError:
            pass
    print("PROBE" + json.dumps(got))
    return False
"""


def test_no_host_file_socket_or_benchmark_answer_is_reachable(problem, tmp_path):
    token = secrets.token_hex(6)
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o777)
    os.chmod(open_dir, 0o777)
    os.chmod(tmp_path, 0o755)
    sockets = [str(open_dir / f"s-{token}"), f"/run/codegeex-test-{token}.sock", f"/tmp/codegeex-test-{token}.sock"]
    abstract = f"codegeex-test-{token}"
    data_file = next(SHARED.glob("humaneval-x/python/*.jsonl*"))
    reads = [str(data_file), str(REPO / "README.md"), str(REPO / "eval_harness" / "sandbox.py"), "/root/.bashrc",
             "/etc/hostname", "/etc/passwd", "/var/lib/codegeex/exec", str(REPO / ".venv" / "pyvenv.cfg")]
    places = [*HOST_PLACES, str(open_dir), str(base_dir(True))]
    servers, accepted, stop = _listeners(sockets[:], abstract)
    try:
        row = execute(problem, prober(token, sockets, abstract, reads, places), Limits(timeout_s=10))
    finally:
        stop.set()
        for s in servers:
            s.close()
        for path in sockets:
            Path(path).unlink(missing_ok=True)
    probe = json.loads(row["output"].split("PROBE", 1)[1].splitlines()[0])
    assert accepted == [] and probe["connected"] == [], probe
    assert probe["read"] == [], probe  # nothing of the host outside the toolchains, not even the venv's python
    leaked = [p for p in places if Path(p, f"escape-{token}").exists()]
    assert leaked == [], leaked
    assert set(probe["wrote"]) <= {"/tmp", "/var/tmp", "/dev/shm", "/run"}, probe  # the private tmpfs, gone now
    assert row["status"] == "failed" and row["isolated"] is True


def test_a_program_cannot_block_the_harness_through_its_attestation_pipes(problem):
    """It reopens the reply pipe for writing, fills it, then asks: the harness's answer would block a blocking
    write forever; its pipes are non-blocking, so the run ends at its timeout like any other."""
    jam = ("    import os, time\n    w = os.open('/proc/self/fd/4', os.O_WRONLY)\n    os.set_blocking(w, False)\n"
           "    try:\n        while True: os.write(w, b'x' * 4096)\n    except BlockingIOError:\n        pass\n"
           "    os.write(3, b'?')\n    time.sleep(100)\n")
    start = time.monotonic()
    row = execute(problem, jam, Limits(timeout_s=2))
    assert row["status"] == "timeout" and time.monotonic() - start < 8, row


def test_the_answers_on_disk_do_not_pass_a_sample(problem):
    """The cheat the issue found: find HumanEval-X on disk and run the task's canonical solution."""
    data = str(next(SHARED.glob("humaneval-x/python/*.jsonl*")))
    cheat = (f"    import gzip, json\n    opener = gzip.open if {data!r}.endswith('.gz') else open\n"
             f"    for line in opener({data!r}, 'rt'):\n        rec = json.loads(line)\n"
             "        if rec['task_id'] == 'Python/0':\n"
             "            scope = {}\n            exec(rec['prompt'] + rec['canonical_solution'], scope)\n"
             "            return scope['has_close_elements'](numbers, threshold)\n")
    assert execute(problem, cheat)["status"] != "passed"


FORGERS = {
    "print every string of its own source": (
        "    import re, sys\n    src = open(__file__).read()\n"
        "    for s in set(re.findall(r'[\\w-]{16,}', src)): print(s)\n    print('<sentinel>')\n    sys.exit(0)\n"),
    "print its environment, arguments and /proc": (
        "    import os, sys\n    print(open('/proc/self/environ').read(), sys.argv, open('/proc/self/cmdline').read())\n"
        "    for n in os.listdir('/proc/self/fd'):\n        try: print(n, os.readlink('/proc/self/fd/' + n))\n"
        "        except OSError: pass\n"
        "    os._exit(0)\n"),
    "print files of the work directory": (
        "    import os\n    for n in os.listdir('.'):\n        print(open(n, errors='replace').read())\n    os._exit(0)\n"),
}


@pytest.mark.parametrize("name", list(FORGERS))
def test_no_string_a_program_can_read_forges_a_pass(problem, name):
    row = execute(problem, FORGERS[name], Limits(timeout_s=5))
    assert row["status"] == "failed", row
    assert execute(problem, problem.canonical_solution)["status"] == "passed"


def _samples(path: Path, problem, completions: list[str]) -> None:
    path.write_text("".join(json.dumps({"task_id": problem.task_id, "completion": f"    # sample {i}\n{c}"}) + "\n"
                            for i, c in enumerate(completions)))


def _execute_cmd(samples: Path, results: Path, timeout: float) -> list[str]:
    return [sys.executable, "-m", "launch.cli", "eval", "execute", str(samples), "--data", str(shared_path("humaneval-x")),
            "--output", str(results), "--workers", "2", "--timeout", str(timeout)]


def _run_roots(pid: int) -> list[Path]:
    return list(base_dir(True).glob(f"run-{pid}-*"))


def test_the_harness_killed_with_sigkill_leaves_no_process_and_no_directory(problem, tmp_path):
    marker = str(900000 + secrets.randbelow(99999))
    samples, results = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    _samples(samples, problem, [escaping_daemon(marker, "    time.sleep(100)\n")] * 4)
    proc = subprocess.Popen(_execute_cmd(samples, results, 60), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: len([p for p in run_processes(marker, proc.pid) if "sleep" in p[1]]) >= 2, 60)
        assert _run_roots(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert wait_until(lambda: run_processes(marker, proc.pid) == [] and _run_roots(proc.pid) == [], 10), \
        (run_processes(marker, proc.pid), _run_roots(proc.pid))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_execute_at_once_keeping_what_finished(problem, tmp_path, sig):
    marker = str(900000 + secrets.randbelow(99999))
    samples, results = tmp_path / "samples.jsonl", tmp_path / "results.jsonl"
    quick = [problem.canonical_solution] * 3
    _samples(samples, problem, quick + [escaping_daemon(marker, "    time.sleep(100)\n")] * 3)
    proc = subprocess.Popen(_execute_cmd(samples, results, 60), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert wait_until(lambda: len([p for p in run_processes(marker, proc.pid) if "sleep" in p[1]]) >= 2, 60)
        assert wait_until(lambda: results.exists() and len(results.read_text().splitlines()) >= 1, 30)
    finally:
        start = time.monotonic()
        os.killpg(proc.pid, sig)  # the whole process group, as a terminal's Ctrl-C or a supervisor sends it
        _, err = proc.communicate(timeout=20)
    took = time.monotonic() - start
    assert proc.returncode == 128 + sig, err
    assert took < 2.5, took
    assert "run the same command again" in err and "Traceback" not in err, err
    kept = [json.loads(line) for line in results.read_text().splitlines()]
    assert kept and {r["status"] for r in kept} == {"passed"}, kept  # only what finished, nothing in flight
    assert wait_until(lambda: run_processes(marker, proc.pid) == [] and _run_roots(proc.pid) == [], 5)
    again = subprocess.run(_execute_cmd(samples, results, 1), cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    final = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["sample_index"] for r in final) == list(range(6))
    assert [r["status"] for r in sorted(final, key=lambda r: r["sample_index"])] == ["passed"] * 3 + ["timeout"] * 3

