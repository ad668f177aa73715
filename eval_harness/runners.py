"""Programs for the languages of HumanEval-X (and MBPP), assembled as the benchmark intends, and run in the
sandbox with a compile step and a run step under separate timeouts.

A program passes only if it exits 0 *and* a random sentinel appears after the tests have run, so exiting early with
status 0 (``sys.exit(0)``, ``exit(0)``, ``System.exit(0)``, ``process.exit(0)``, ``os.Exit(0)``) never passes:
- Python: the sentinel is printed after the tests.
- C++: the test's ``main`` is renamed; a new ``main`` calls it and prints the sentinel after it.
- Java: a runner class calls ``Main.main`` and prints the sentinel after it.
- JavaScript: ``console.assert`` only prints on failure, so it is replaced by one that throws (ordinary printing is
  untouched); the sentinel is the program's last statement.
- Go: a ``TestMain`` prints the sentinel (``println``, no import needed) when every test passed.

What every program of a language shares is built once per machine (:func:`build_once`): the C++ precompiled header,
the copy of JavaScript's node modules, the warm Go build cache.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.io import make_read_only

REPO = Path(__file__).resolve().parents[1]
GO_PACKAGES = ["math", "strings", "fmt", "strconv", "sort", "bytes", "regexp", "time", "math/rand", "crypto/md5", "os",
               "os/exec", "net",
               "unicode", "math/big", "container/heap", "reflect"]


@dataclass
class Program:
    """Files to write, how to compile (optional) and run, and where the sentinel appears."""

    files: dict[str, str]
    run: list[str]
    compile: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    sentinel_on_stderr: bool = False
    linked: dict[str, str] = field(default_factory=dict)  # work-dir name -> read-only tree to hard-link there
    unit: str = ""  # the program without its runner, for languages built in batches (Go: see eval_harness.gobatch)


def build_once(target: Path, build: Callable[[Path], object]) -> Path:
    """``target``, built the first time it is asked for: ``build(staging)`` fills a fresh directory beside it, which
    is marked READY, made read-only and renamed into place, so a reader sees a whole tree or none. Builders in other
    threads or processes wait on a lock beside it, then find it READY; a tree left without READY (an interrupted
    older build) is replaced."""
    if (target / "READY").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_name(f".{target.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "READY").exists():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(staging)
            (staging / "READY").touch()
            make_read_only(staging)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # only there when the build failed
    return target


def link_tree(source: Path, target: Path) -> None:
    """``target`` gets fresh directories (the sandbox may add files) holding hard links to ``source``'s files, which
    stay root's and read-only: a program can read them, not change them for the next one."""
    for dirpath, _, files in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (target / rel).mkdir(parents=True, exist_ok=True)
        for name in files:
            os.link(Path(dirpath) / name, target / rel / name)


def python_program(code: str, test: str, extra: dict[str, str], sentinel: str) -> Program:
    """HumanEval-X: code (prompt + completion) + tests, which end by calling check; MBPP: + setup before the asserts.
    The system interpreter runs it: a virtual environment under /tmp is hidden by the sandbox's private /tmp, and
    the tests need only the standard library."""
    python = next((c for c in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(c, os.X_OK)), sys.executable)
    setup = extra.get("test_setup_code", "")
    source = f"{code}\n\n{setup}\n\n{test}\n\nprint({sentinel!r})\n"
    return Program({"main.py": source}, [python, "-I", "main.py"])


def cpp_program(code: str, test: str, extra: dict[str, str], sentinel: str) -> Program:
    test = re.sub(r"\bint\s+main\s*\(", "int codegeex_tests_main(", test, count=1)
    # the tests' main usually ends without `return`: its value is ignored (defined enough at -O0); a failed assert
    # aborts before the sentinel, an early exit() never reaches it
    source = (f"{code}\n{test}\n#include <cstdio>\nint main() {{\n"
              f"    codegeex_tests_main();\n    std::printf(\"\\n%s\\n\", \"{sentinel}\");\n"
              "    std::fflush(stdout);\n    return 0;\n}\n")
    libs = ["-lcrypto", "-lssl"] if "openssl" in code else []
    return Program({"main.cpp": source}, ["./main"],
                   ["g++", *CXXFLAGS, "-include", cpp_pch(), "-pipe", "main.cpp", "-o", "main", *libs])


CXXFLAGS = ["-std=c++17", "-O0"]
PCH_HEADER = "codegeex_common.h"
PCH_HEADERS = ["stdio.h", "math.h", "stdlib.h", "assert.h", "algorithm", "vector", "string", "cstdio"]


def cpp_pch() -> str:
    """A precompiled header of what nearly every HumanEval-X C++ program includes, built once with the same flags,
    root-owned and read-only; ``-include`` makes g++ load it (or, if the flags ever differ, read the plain header)."""
    root = build_once(Path(os.environ.get("CODEGEEX_PCH_DIR", "/var/lib/codegeex/pch")), _build_pch)
    return str(root / PCH_HEADER)


def _build_pch(root: Path) -> None:
    header = root / PCH_HEADER
    header.write_text("".join(f"#include <{h}>\n" for h in PCH_HEADERS))
    subprocess.run(["g++", *CXXFLAGS, "-x", "c++-header", str(header), "-o", f"{header}.gch"], check=True,
                   capture_output=True)


JVM = ["-Xmx1g", "-Xss16m", "-XX:ReservedCodeCacheSize=64m", "-XX:CompressedClassSpaceSize=64m",
       "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]


def java_program(code: str, test: str, extra: dict[str, str], sentinel: str) -> Program:
    runner = ("\nclass CodegeexRunner {\n    public static void main(String[] args) throws Exception {\n"
              f"        Main.main(args);\n        System.out.println(\"\\n{sentinel}\");\n    }}\n}}\n")
    source = f"{code}\n{test}\n{runner}"
    return Program({"Main.java": source}, ["java", *JVM, "-cp", ".", "CodegeexRunner"],
                   ["javac", *(f"-J{o}" for o in JVM[:1] + JVM[2:]), "-nowarn", "-encoding", "UTF-8", "-d", ".",
                    "Main.java"])


JS_PRELUDE = """console.assert = (condition, ...message) => {
  if (!condition) { throw new Error('Assertion failed' + (message.length ? ': ' + message.join(' ') : '')); }
};
"""


def node_path() -> str:
    """Where the sandboxed node finds js-md5 (needed by JS/162). `make` installs it into the environment's own
    node_modules; that may live under /tmp, which the sandbox hides, so it is copied once (root-owned, read-only)
    beside the work directories."""
    source = REPO / ".venv" / "node" / "node_modules"
    target = Path(os.environ.get("CODEGEEX_NODE_MODULES", "/var/lib/codegeex/node_modules"))
    if (source / "js-md5").is_dir() and os.geteuid() == 0:
        return str(build_once(target, lambda staging: shutil.copytree(source, staging, dirs_exist_ok=True)))
    return str(target) if (target / "js-md5").is_dir() else str(source)


def js_program(code: str, test: str, extra: dict[str, str], sentinel: str) -> Program:
    source = f"{JS_PRELUDE}{code}\n{test}\nprocess.stdout.write('\\n{sentinel}\\n');\n"
    return Program({"main.js": source}, ["node", "--max-old-space-size=1024", "main.js"],
                   env={"NODE_PATH": node_path()})


GO_ENV = {"GO111MODULE": "off", "GOPATH": "/usr/share/gocode", "GOFLAGS": "-buildvcs=false", "CGO_ENABLED": "0"}


def go_cache() -> str:
    """A warm, read-only Go build cache (the standard library, testify), built once. Each program compiles with its
    own cache made of hard links to it: nothing is rebuilt, and no program can alter what the next one links."""
    return str(build_once(Path(os.environ.get("CODEGEEX_GOCACHE", "/var/lib/codegeex/gocache")), _warm_go_cache))


def _warm_go_cache(cache: Path) -> None:
    imports = "".join(f'    _ "{p}"\n' for p in GO_PACKAGES)
    with tempfile.TemporaryDirectory(prefix=".gowarm-", dir=cache.parent) as src:
        (Path(src) / "main_test.go").write_text(
            f'package main\n\nimport (\n    "testing"\n    "github.com/stretchr/testify/assert"\n{imports})\n\n'
            "func TestWarm(t *testing.T) { assert.Equal(t, 1, 1) }\n")
        subprocess.run(["go", "test", "-c", "-o", "warm.bin", "main_test.go"], cwd=src, check=True,
                       env={**os.environ, **GO_ENV, "GOCACHE": str(cache)}, capture_output=True)


def go_program(code: str, test: str, extra: dict[str, str], sentinel: str) -> Program:
    """HumanEval-X Go: the test setup (package, testing, testify) + the prompt without its imports + the completion +
    the tests. Imports are those the code uses, from the problem's own block and the common packages."""
    declared = re.findall(r'"([^"]+)"', extra.get("import", ""))
    body = code.replace(extra.get("import", ""), "") if extra.get("import") else code
    setup = extra.get("test_setup", "package main\n\nimport (\n    \"testing\"\n)\n")
    code_only = re.sub(r"//[^\n]*|/\*.*?\*/", "", body, flags=re.S)  # "strings." in a comment is no use
    used = [p for p in dict.fromkeys(declared + GO_PACKAGES)
            if p not in setup and re.search(rf"\b{re.escape(p.rsplit('/', 1)[-1])}\.", code_only)]
    imports = "".join(f'import "{p}"\n' for p in used)
    main = f'\nfunc TestMain(m *testing.M) {{\n    if m.Run() == 0 {{\n        println("{sentinel}")\n    }}\n}}\n'
    unit = f"{setup}\n{imports}\n{body}\n{test}\n"
    source = unit + main
    build = 'GOCACHE="$PWD/gocache" exec go test -c -vet=off -ldflags="-s -w" -o tests.bin main_test.go'
    return Program({"main_test.go": source}, ["./tests.bin"], ["sh", "-c", build], env=GO_ENV,
                   sentinel_on_stderr=True, linked={"gocache": go_cache()}, unit=unit)


BUILDERS = {"python": python_program, "cpp": cpp_program, "java": java_program, "js": js_program, "go": go_program}
