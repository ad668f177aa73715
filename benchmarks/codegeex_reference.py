"""CodeGeeX's published HumanEval-X evaluator, reimplemented to measure against (our code, the published design).

Published: THUDM/CodeGeeX, ``codegeex/benchmark/execution.py`` (``check_correctness`` and its helpers), driven by
``codegeex/benchmark/humaneval-x/evaluate_humaneval_x.py`` (``evaluate_functional_correctness``: a
``ThreadPoolExecutor(max_workers=n_workers)``, one ``check_correctness`` per sample, ``timeout=5.0`` by default).
What every sample costs there, and here:

- a ``multiprocessing.Manager()`` (a server process of its own, started per sample) and a ``manager.list()`` for the
  result; a forked ``multiprocessing.Process`` running the sample, joined for ``timeout + 1`` seconds and killed if
  still alive (an empty result is "timed out"); the manager is shut down when it is collected, at the return;
- Python: no new interpreter. In the forked child, a fresh temporary directory (``create_tempdir``: a
  ``TemporaryDirectory`` and a ``chdir`` into it), ``reliability_guard()`` (destructive ``os``/``shutil``/
  ``subprocess`` functions, ``exit``, ``quit``, ``help`` set to None, ``faulthandler`` off, a few modules hidden;
  published without a memory limit), then ``exec`` of the program in new globals under ``swallow_io`` (stdout,
  stderr and stdin redirected to a write-only StringIO) and ``time_limit`` (``setitimer`` + SIGALRM); passed when
  it raises nothing;
- C++, JavaScript, Go, Java: in the forked child, a directory ``<tmp_dir>/<lang>/evaluation[/tmp]/<task>-<random>``
  (``/tmp`` added only when the path does not already contain "tmp") made with ``os.makedirs``, the program
  written there, the tool run by ``subprocess.run(..., timeout=timeout, capture_output=True)`` under
  ``time_limit`` (a ``TimeoutExpired`` is not caught: the child dies and the sample is "timed out"), the directory
  removed with ``shutil.rmtree``:
  C++ ``/usr/bin/g++ -std=c++11 test.cpp`` (``-lcrypto -lssl`` added only when "162" is in the task id), then
  ``./a.out``, passed on exit status 0; JavaScript ``node test.js``, passed when it printed nothing on stderr or
  stdout; Go ``go test -timeout=5.0s main_test.go``, passed on exit status 0; Java ``javac <dir>/Main.java``
  (timeout 5 s, tried up to 5 times when it times out), then ``java -cp <dir> Main``, passed on exit status 0.

Where this differs from the published code, and why:
- the program text is the one our harness runs (``Program.files``), so both do the same work, less our attestation
  epilogue where the published runner would trip on it (``benchmarks.eval_execute.reference_text``: Python and
  JavaScript lose it, Go's ``TestMain`` loses its call; C++ keeps its ``main`` wrapper, whose write to descriptor 3
  fails harmlessly in ``./a.out``; Java's runner class is compiled, not run). What stays of ours: JavaScript's
  throwing ``console.assert`` prelude (a failure still reaches stderr, as the published one's message does), C++'s
  renamed test ``main``, Go's computed imports and ``TestMain``. The published Python programs also begin with its
  ``IMPORT_HELPER`` imports (numpy among them, which its evaluator process has imported already, so the forked child
  gets it for free); ours do not;
- Go: published, it runs inside a module (``go.mod`` and a vendored testify beside ``evaluation/``), which is not
  set up here, so testify is not found and nothing passes. Working variant: ``GO111MODULE=off
  GOPATH=/usr/share/gocode`` (Debian's testify), with Go's default build cache (``$HOME/.cache/go-build``);
- Java: published, the ``java`` run is commented out, so ``exec_result`` stays None and every sample fails on
  ``None.returncode`` without running. Working variant: that line restored;
- JavaScript: ``NODE_PATH`` is set to the harness's node modules (JS/162 needs js-md5), as a ``npm install`` next
  to the evaluation directory would provide;
- the processes are started with the "fork" context explicitly (the published code uses the platform default,
  which is fork on Linux up to Python 3.13);
- Rust and the result dictionary's bookkeeping fields are left out.
"""

from __future__ import annotations

import builtins
import contextlib
import faulthandler
import io
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, MutableSequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any

import numpy  # noqa: F401  (the published evaluator's process has it loaded: every fork below carries it)

TIMEOUT = 5.0  # evaluate_functional_correctness's default
_CTX = multiprocessing.get_context("fork")


@dataclass
class Sample:
    """One program for the reference: its task, language key (python, cpp, java, js, go) and text."""

    task_id: str
    language: str
    text: str
    env: dict[str, str] = field(default_factory=dict)  # the working variants' additions (Go, JavaScript)


class TimeoutException(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: object) -> None:
        raise TimeoutException("Timed out!")

    signal.setitimer(signal.ITIMER_REAL, seconds)
    signal.signal(signal.SIGALRM, on_alarm)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


class WriteOnlyStringIO(io.StringIO):
    """Collects what is written; reading raises."""

    def read(self, *args: Any, **kwargs: Any) -> str:
        raise OSError

    def readline(self, *args: Any, **kwargs: Any) -> str:
        raise OSError

    def readlines(self, *args: Any, **kwargs: Any) -> list[str]:
        raise OSError

    def readable(self, *args: Any, **kwargs: Any) -> bool:
        return False


class _redirect_stdin(contextlib._RedirectStream):
    _stream = "stdin"


@contextlib.contextmanager
def swallow_io() -> Iterator[None]:
    stream = WriteOnlyStringIO()
    with contextlib.redirect_stdout(stream), contextlib.redirect_stderr(stream), _redirect_stdin(stream):
        yield


@contextlib.contextmanager
def create_tempdir() -> Iterator[str]:
    with tempfile.TemporaryDirectory() as name:
        cwd = os.getcwd()
        os.chdir(name)
        try:
            yield name
        finally:
            os.chdir(cwd)


# what reliability_guard sets to None (published without a memory limit, so no rlimits)
_GUARDED = {
    os: ("kill", "system", "putenv", "remove", "removedirs", "rmdir", "fchdir", "setuid", "fork", "forkpty",
         "killpg", "rename", "renames", "truncate", "replace", "unlink", "fchmod", "fchown", "chmod", "chown",
         "chroot", "lchflags", "lchmod", "lchown", "getcwd", "chdir"),
    shutil: ("rmtree", "move", "chown"),
    subprocess: ("Popen",),
    builtins: ("exit", "quit", "help"),
}
_HIDDEN_MODULES = ("ipdb", "joblib", "resource", "psutil", "tkinter")


def reliability_guard() -> None:
    """In the forked child only: what the published guard disables, disabled the same way."""
    import sys

    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    for module, names in _GUARDED.items():
        for name in names:
            setattr(module, name, None)
    for name in _HIDDEN_MODULES:
        sys.modules[name] = None  # type: ignore[assignment]


def _run_python(sample: Sample, timeout: float, result: MutableSequence[str]) -> None:
    with create_tempdir():
        rmtree, rmdir, chdir = shutil.rmtree, os.rmdir, os.chdir  # restored for the tempdir's clean-up
        reliability_guard()
        try:
            with swallow_io(), time_limit(timeout):
                exec(sample.text, {})
            result.append("passed")
        except TimeoutException:
            result.append("timed out")
        except AssertionError:
            result.append("failed: AssertionError")
        except BaseException as e:  # noqa: B036 (as published: anything the program raises is a failure)
            result.append(f"failed: {e}")
        shutil.rmtree, os.rmdir, os.chdir = rmtree, rmdir, chdir


def _error(out: subprocess.CompletedProcess[bytes]) -> str:
    return (out.stderr or out.stdout).decode(errors="replace")


def _run_tool(sample: Sample, timeout: float, tmp_root: str, result: MutableSequence[str]) -> None:
    """The published C++ / JavaScript / Go / Java branches (Java and Go as the working variants)."""
    lang = sample.language
    base = os.path.join(tmp_root, lang, "evaluation")  # evaluate_humaneval_x's tmp_dir_
    if "tmp" not in base:  # as published: a path already naming "tmp" gets no "tmp" folder
        base = os.path.join(base, "tmp")
    work = os.path.join(base, f"{sample.task_id.replace('/', '-')}-{random.uniform(1, 1000)}")
    os.makedirs(work, exist_ok=True)
    os.chdir(work)
    os.environ.update(sample.env)  # this forked child's environment, inherited by the tools it runs
    name = {"cpp": "test.cpp", "js": "test.js", "go": "main_test.go", "java": "Main.java"}[lang]
    with open(name, "w") as fh:
        fh.write(sample.text)
    if lang == "cpp":
        libs = ["-lcrypto", "-lssl"] if "162" in sample.task_id else []
        built = subprocess.run(["/usr/bin/g++", "-std=c++11", "test.cpp", *libs], timeout=timeout,
                               capture_output=True)
        if built.returncode != 0:
            result.append(f"failed: compilation error: {_error(built)}")
        else:
            try:
                with time_limit(timeout):
                    out = subprocess.run(["./a.out"], timeout=timeout, capture_output=True)
                result.append("passed" if out.returncode == 0 else f"failed: {_error(out)}")
            except TimeoutException:
                result.append("timed out")
    elif lang == "js":
        try:
            with time_limit(timeout):
                out = subprocess.run(["node", "test.js"], timeout=timeout, capture_output=True)
            stdout, stderr = out.stdout.decode(errors="replace"), out.stderr.decode(errors="replace")
            result.append(f"failed: {stderr}" if stderr else f"failed: {stdout}" if stdout else "passed")
        except TimeoutException:
            result.append("timed out")
    elif lang == "go":
        try:
            with time_limit(timeout):
                out = subprocess.run(["go", "test", f"-timeout={timeout}s", "main_test.go"], timeout=timeout,
                                     capture_output=True)
            result.append("passed" if out.returncode == 0 else f"failed: {_error(out)}")
        except TimeoutException:
            result.append("timed out")
    else:  # java
        status, code = "failed: unknown error", -1
        for _ in range(5):
            try:
                code = subprocess.run(["javac", os.path.join(work, "Main.java")], timeout=5,
                                      capture_output=True).returncode
                break
            except subprocess.TimeoutExpired:
                continue
        if code != 0:
            status = "failed: compilation error"
        else:
            try:
                out = subprocess.run(["java", "-cp", work, "Main"], timeout=timeout, capture_output=True)
                if out.returncode == 0:
                    status = "passed"
                elif out.returncode == 1 and "AssertionError" in out.stderr.decode("unicode-escape"):
                    status = "failed: wrong answer"
                else:
                    status = f"failed: {out.stderr.decode(errors='replace')}"
            except subprocess.TimeoutExpired:
                status = "time out"
            except BaseException as e:  # noqa: B036
                status = f"failed: {e}"
        result.append(status)
    shutil.rmtree(work)


def check_correctness(sample: Sample, timeout: float, tmp_root: str) -> str:
    """One sample as the published ``check_correctness`` runs it: a Manager and a forked Process per sample."""

    def unsafe_execute() -> None:
        if sample.language == "python":
            _run_python(sample, timeout, result)
        else:
            _run_tool(sample, timeout, tmp_root, result)

    manager = _CTX.Manager()
    result = manager.list()
    process = _CTX.Process(target=unsafe_execute)
    process.start()
    process.join(timeout=timeout + 1)
    if process.is_alive():
        process.kill()
    if not result:
        result.append("timed out")
    return str(result[0])  # the manager goes with `manager` and `result` at the return, as published


def evaluate(samples: list[Sample], workers: int, timeout: float = TIMEOUT) -> tuple[float, list[str]]:
    """(seconds, each sample's result string in order): a thread pool of ``workers`` as in
    ``evaluate_functional_correctness``, every sample's directory under one fresh temporary root."""
    tmp_root = tempfile.mkdtemp(prefix="codegeex-reference-")
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = {pool.submit(check_correctness, s, timeout, tmp_root): i for i, s in enumerate(samples)}
            results = [""] * len(samples)
            for future in as_completed(futures):
                results[futures[future]] = future.result()
        return time.perf_counter() - start, results
    finally:
        shutil.rmtree(tmp_root, ignore_errors=True)
