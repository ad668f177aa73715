"""Go programs built in batches: one ``go build`` links many samples into one binary, and each sample then runs alone,
in its own sandbox and fresh directory, by its index.

Per sample, ``go test -c`` costs ~0.5 s here, nearly all of it the go command and the linker; a batch of 40 builds in
~1.1 s. Each sample becomes package ``cgbatch/pN`` (its tests turned into an ``[]testing.InternalTest`` table); a
``main`` package selects one table by index and runs it with ``testing.Main``, the sample's sentinel printed by a last
test (so a pass needs every test run and exit status 0).

Why this is safe: in a Go binary the only code that runs before ``main`` is package-level variable initialisers and
``init`` functions, of every package linked in. So only samples whose top level declares nothing that can run (no
``var``, no ``init``, no ``//go:`` directives, no ``unsafe``, no ``TestMain``; checked on the tree-sitter parse) join
a batch; the rest, and any sample the batch build names as failing, are compiled and run alone exactly as
:func:`eval_harness.execution.run_program` does, so their status and messages are the single-program ones.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval_harness.execution import result_row, run_program
from eval_harness.runners import GO_ENV, link_tree
from eval_harness.sandbox import Limits, RunResult, compile_limits, run_sandboxed, work_root

if TYPE_CHECKING:
    from eval_harness.executor import Job

SAFE_TOP_LEVEL = {"package_clause", "import_declaration", "function_declaration", "method_declaration",
                  "type_declaration", "const_declaration", "comment"}
TEST_FUNC = re.compile(r"^func (Test\w+)\(t \*testing\.T\)", re.M)


@lru_cache(maxsize=1)
def _go_parser() -> Any:
    import tree_sitter
    import tree_sitter_go

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_go.language()))


def batchable(unit: str) -> bool:
    """True when nothing in ``unit`` can run before ``main`` and it has tests to run (see the module's docstring)."""
    if not unit or "//go:" in unit or '"unsafe"' in unit or "TestMain" in unit or not TEST_FUNC.search(unit):
        return False
    tree = _go_parser().parse(unit.encode())
    for node in tree.root_node.children:
        if node.type not in SAFE_TOP_LEVEL or node.has_error:
            return False
        if node.type == "function_declaration":
            name = node.child_by_field_name("name")
            if name is None or name.text == b"init":
                return False
    return True


def _package(index: int, unit: str) -> str:
    source = re.sub(r"^package main\b", f"package p{index}", unit.lstrip(), count=1)
    table = ", ".join(f'{{"{name}", {name}}}' for name in TEST_FUNC.findall(unit))
    return f"{source}\nvar CodegeexTests = []testing.InternalTest{{{table}}}\n"


def _main(members: list[tuple[int, Job]]) -> str:
    """``batch.bin N`` runs sample N's tests through ``testing.Main`` (kept for programs that simulate ``go test``),
    then a last test that prints N's sentinel: the sentinel shows only if every test ran, and exit status 0 only if
    every test passed."""
    imports = "".join(f'    p{i} "cgbatch/p{i}"\n' for i, _ in members)
    rows = "".join(f'    {i}: {{p{i}.CodegeexTests, "{job.sentinel}"}},\n' for i, job in members)
    return ('package main\n\nimport (\n    "os"\n    "strconv"\n    "testing"\n' + imports + ")\n\n"
            "var batch = map[int]struct {\n    tests    []testing.InternalTest\n    sentinel string\n}{\n" + rows
            + "}\n\nfunc main() {\n    i, _ := strconv.Atoi(os.Args[1])\n    os.Args = os.Args[:1]\n"
            "    entry, ok := batch[i]\n    if !ok {\n        os.Exit(3)\n    }\n"
            '    done := testing.InternalTest{Name: "CodegeexSentinel", F: func(*testing.T) { println(entry.sentinel) }}\n'
            "    all := func(pattern, name string) (bool, error) { return true, nil }\n"
            "    testing.Main(all, append(entry.tests, done), nil, nil)\n}\n")


def _build(members: list[tuple[int, Job]], root: Path, limits: Limits) -> tuple[set[int], RunResult | None]:
    """Build ``root/batch.bin`` from the members, dropping those the compiler names (up to 3 rounds). Returns the
    dropped indices and the last build result (None when every member was dropped)."""
    for i, job in members:
        package = root / "gopath" / "src" / "cgbatch" / f"p{i}"
        package.mkdir(parents=True, exist_ok=True)
        (package / "code.go").write_text(_package(i, job.program.unit))
    env = {**GO_ENV, "GOPATH": f"{root}/gopath:{GO_ENV['GOPATH']}"}
    cmd = ["sh", "-c", 'GOCACHE="$PWD/gocache" exec go build -ldflags="-s -w" -o batch.bin cgbatch/main']
    dropped: set[int] = set()
    base = compile_limits(limits)
    out = None
    for _ in range(3):
        pending = [(i, job) for i, job in members if i not in dropped]
        if not pending:
            return dropped, None
        (root / "gopath" / "src" / "cgbatch" / "main").mkdir(parents=True, exist_ok=True)
        (root / "gopath" / "src" / "cgbatch" / "main" / "main.go").write_text(_main(pending))
        scaled = dataclasses.replace(base, timeout_s=base.timeout_s * max(1.0, len(pending) / 20))
        out = run_sandboxed(cmd, root, scaled, env)
        if out.returncode == 0 and not out.timed_out:
            return dropped, out
        named = {int(n) for n in re.findall(r"cgbatch/p(\d+)\b", out.stdout + out.stderr)} & {i for i, _ in pending}
        if not named or out.timed_out:  # nothing to blame: every member alone
            return {i for i, _ in members}, None
        dropped |= named
    return {i for i, _ in members}, None


def run_go_batch(jobs: list[Job], limits: Limits, workers: int, done: Callable[[Job, dict[str, Any]], None]) -> None:
    """Build the batchable jobs together, run each alone; every other job runs as a single program."""
    from eval_harness.runners import go_cache

    joins = [batchable(job.program.unit) for job in jobs]
    members = [(i, job) for i, job in enumerate(jobs) if joins[i]]
    alone = [job for i, job in enumerate(jobs) if not joins[i]]
    with tempfile.TemporaryDirectory(prefix="codegeex-gobuild-", dir=work_root()) as tmp, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        root = Path(tmp)
        def run_alone(job: Job) -> None:
            done(job, run_program(job.program, job.sentinel, limits))

        futures = [pool.submit(run_alone, job) for job in alone]
        dropped: set[int] = set()
        build = None
        if members:
            link_tree(Path(go_cache()), root / "gocache")
            dropped, build = _build(members, root, limits)
        alone_too = [job for i, job in members if i in dropped]
        futures += [pool.submit(run_alone, job) for job in alone_too]
        if build is not None:
            binary = root / "batch.bin"
            for path in (root, binary):  # root's and read-only for the programs that run next
                if os.geteuid() == 0:
                    os.chown(path, 0, 0)
                path.chmod(0o755)
            share = build.duration_s / max(1, len(members) - len(dropped))

            def run_one(index: int, job: Job) -> None:
                with tempfile.TemporaryDirectory(prefix="codegeex-exec-", dir=work_root()) as wd:
                    result = run_sandboxed([str(binary), str(index)], Path(wd), limits, job.program.env)
                row = result_row(job.program, job.sentinel, None, result, limits)
                row["compile_s"] = round(share, 4)  # the batch build, shared out
                done(job, row)

            futures += [pool.submit(run_one, i, job) for i, job in members if i not in dropped]
        for future in as_completed(futures):
            future.result()
