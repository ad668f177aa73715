"""Programs for the languages of HumanEval-X (and MBPP), assembled as the benchmark intends, and run in the
sandbox with a compile step and a run step under separate timeouts.

A program passes only if it exits 0 *and* its epilogue, which runs after the tests, attests it: the epilogue writes a
request on descriptor 3 and prints what the harness answers on descriptor 4, a random sentinel made for that run
(:mod:`eval_harness.sandbox`). The sentinel is in no file the program can read, so exiting early with status 0
(``sys.exit(0)``, ``exit(0)``, ``System.exit(0)``, ``process.exit(0)``, ``os.Exit(0)``) never passes, nor does copying
a string from the program's own source:
- Python: the epilogue follows the tests.
- C++: the test's ``main`` is renamed; a new ``main`` calls it, then attests.
- Java: a runner class calls ``Main.main``, then attests (through ``/proc/self/fd``).
- JavaScript: ``console.assert`` only prints on failure, so it is replaced by one that throws (ordinary printing is
  untouched); the epilogue is the program's last statement.
- Go: a ``TestMain`` attests (on stderr) when every test passed.

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
    """Files to write, how to compile (optional) and run, where the epilogue prints the sentinel, and what of the
    host besides the toolchains the sandbox shows (read-only)."""

    files: dict[str, str]
    run: list[str]
    compile: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    attest: str = "stdout"
    readonly: list[str] = field(default_factory=list)
    warm: bool = False  # run is [python, -I, script]: may be forked from the warm interpreter (eval_harness.warm)
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


PYTHON_EPILOGUE = ("import os as _codegeex_os\n_codegeex_os.write(3, b'?')\n"
                   "print(_codegeex_os.read(4, 256).decode().strip(), flush=True)\n")


WHOLE_PROGRAM = "whole_program"  # set in a builder's extra: the code is a whole program, not the prompt + completion


def python_program(code: str, test: str, extra: dict[str, str]) -> Program:
    """HumanEval-X: code (prompt + completion) + tests, which end by calling check; MBPP: + setup before the asserts.
    The system interpreter runs it: a virtual environment under /tmp is hidden by the sandbox's private /tmp, and
    the tests need only the standard library."""
    python = next((c for c in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(c, os.X_OK)), sys.executable)
    setup = extra.get("test_setup_code", "")
    source = f"{code}\n\n{setup}\n\n{test}\n\n{PYTHON_EPILOGUE}"
    prefix = Path(os.path.realpath(python)).parents[1]  # an interpreter outside /usr is shown to the sandbox
    return Program({"main.py": source}, [python, "-I", "main.py"], warm=python == "/usr/bin/python3",
                   readonly=[] if prefix == Path("/usr") else [str(prefix)])


CPP_MAIN = """#include <cstdio>
#include <unistd.h>
int main() {
    codegeex_tests_main();
    char codegeex_reply[256];
    if (write(3, "?", 1) == 1) {
        ssize_t n = read(4, codegeex_reply, sizeof codegeex_reply);
        if (n > 0) std::printf("\\n%.*s", (int)n, codegeex_reply);
    }
    std::fflush(stdout);
    return 0;
}
"""


def cpp_program(code: str, test: str, extra: dict[str, str]) -> Program:
    test = re.sub(r"\bint\s+main\s*\(", "int codegeex_tests_main(", test, count=1)
    # the tests' main usually ends without `return`: its value is ignored (defined enough at -O0); a failed assert
    # aborts before the epilogue, an early exit() never reaches it
    source = f"{code}\n{test}\n{CPP_MAIN}"
    libs = ["-lcrypto", "-lssl"] if "openssl" in code else []
    pch = cpp_pch()
    return Program({"main.cpp": source}, ["./main"],
                   ["g++", *CXXFLAGS, "-include", pch, "-pipe", *LINKER, "main.cpp", "-o", "main", *libs],
                   readonly=[str(Path(pch).parent)])


CXXFLAGS = ["-std=c++17", "-O0"]
LINKER = ["-fuse-ld=gold"] if shutil.which("ld.gold") else []  # links in 45 ms where ld.bfd takes 150 (0.39 s -> 0.29 s)
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


JAVA_RUNNER = """
class CodegeexRunner {
    public static void main(String[] args) throws Exception {
        Main.main(args);
        try (var request = new java.io.FileOutputStream("/proc/self/fd/3");
             var reply = new java.io.FileInputStream("/proc/self/fd/4")) {
            request.write('?');
            request.flush();
            byte[] buffer = new byte[256];
            int n = reply.read(buffer);
            if (n > 0) System.out.println("\\n" + new String(buffer, 0, n).trim());
        }
    }
}
"""


def java_program(code: str, test: str, extra: dict[str, str]) -> Program:
    source = f"{code}\n{test}\n{JAVA_RUNNER}"
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


JS_EPILOGUE = """{
  const codegeexFs = require('fs');
  codegeexFs.writeSync(3, '?');
  const codegeexReply = Buffer.alloc(256);
  const n = codegeexFs.readSync(4, codegeexReply, 0, 256, null);
  process.stdout.write('\\n' + codegeexReply.toString('utf8', 0, n).trim() + '\\n');
}
"""


def js_program(code: str, test: str, extra: dict[str, str]) -> Program:
    source = f"{JS_PRELUDE}{code}\n{test}\n{JS_EPILOGUE}"
    modules = node_path()
    return Program({"main.js": source}, ["node", "--max-old-space-size=1024", "main.js"],
                   env={"NODE_PATH": modules}, readonly=[modules])


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


GO_ATTEST = """
func codegeexAttest() {
    request, reply := codegeexos.NewFile(3, "request"), codegeexos.NewFile(4, "reply")
    if _, err := request.Write([]byte("?")); err != nil {
        return
    }
    buffer := make([]byte, 256)
    n, _ := reply.Read(buffer)
    println(string(buffer[:n]))
}
"""


GO_PACKAGE_CLAUSE = re.compile(r"^[ \t]*package[ \t]+\w+[ \t]*\n?", re.M)
GO_IMPORTS = re.compile(r'^[ \t]*import[ \t]*(?:\([^)]*\)|"[^"]+")[ \t]*\n?', re.M)


def go_header(code: str) -> tuple[str, list[str]]:
    """A whole program's code without its package clause and import declarations, and the paths it imported (the
    test setup brings the file's own package clause and imports)."""
    paths = [p for m in GO_IMPORTS.finditer(code) for p in re.findall(r'"([^"]+)"', m.group(0))]
    return GO_IMPORTS.sub("", GO_PACKAGE_CLAUSE.sub("", code, count=1)), paths


def go_program(code: str, test: str, extra: dict[str, str]) -> Program:
    """HumanEval-X Go: the test setup (package, testing, testify) + the prompt without its imports + the completion +
    the tests. Imports are those the code uses, from the problem's own block and the common packages. A whole
    program (``extra[WHOLE_PROGRAM]``) also loses its own package clause and imports, which join the file's."""
    declared = re.findall(r'"([^"]+)"', extra.get("import", ""))
    body = code.replace(extra.get("import", ""), "") if extra.get("import") else code
    if extra.get(WHOLE_PROGRAM):
        body, own = go_header(body)
        declared += own
    setup = extra.get("test_setup", "package main\n\nimport (\n    \"testing\"\n)\n")
    code_only = re.sub(r"//[^\n]*|/\*.*?\*/", "", body, flags=re.S)  # "strings." in a comment is no use
    used = [p for p in dict.fromkeys(declared + GO_PACKAGES)
            if p not in setup and re.search(rf"\b{re.escape(p.rsplit('/', 1)[-1])}\.", code_only)]
    imports = "".join(f'import "{p}"\n' for p in used)
    main = "\nfunc TestMain(m *testing.M) {\n    if m.Run() == 0 {\n        codegeexAttest()\n    }\n}\n" + GO_ATTEST
    unit = f"{setup}\n{imports}\n{body}\n{test}\n"
    source = f'{setup}\n{imports}import codegeexos "os"\n\n{body}\n{test}\n{main}'
    build = 'GOCACHE="$PWD/gocache" exec go test -c -vet=off -ldflags="-s -w" -o tests.bin main_test.go'
    return Program({"main_test.go": source}, ["./tests.bin"], ["sh", "-c", build], env=GO_ENV,
                   attest="stderr", linked={"gocache": go_cache()}, unit=unit)


BUILDERS = {"python": python_program, "cpp": cpp_program, "java": java_program, "js": js_program, "go": go_program}
