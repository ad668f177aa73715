"""Go programs built in batches (the loop: :mod:`eval_harness.batch`): one ``go build`` links many samples into one
binary, and each sample then runs alone, in its own sandbox and fresh directory, by its index.

Per sample, ``go test -c`` costs ~0.5 s here, nearly all of it the go command and the linker; a batch of 40 builds in
~1.1 s. Each sample becomes package ``cgbatch/pN`` (its tests turned into an ``[]testing.InternalTest`` table); a
``main`` package selects one table by index and runs it with ``testing.Main``, a last test attesting the run (so a
pass needs every test run and exit status 0; the protocol: :mod:`eval_harness.sandbox`).

Why this is safe: in a Go binary the only code that runs before ``main`` is package-level variable initialisers and
``init`` functions, of every package linked in. So only samples whose top level declares nothing that can run (no
``var``, no ``init``, no ``//go:`` directives, no ``unsafe``, no ``TestMain``; checked on the tree-sitter parse) join
a batch; the rest, and any sample the batch build names as failing, are compiled and run alone exactly as
:func:`eval_harness.execution.run_program` does, so their status and messages are the single-program ones.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from eval_harness.batch import BatchPart, Members
from eval_harness.execution import Job
from eval_harness.runners import GO_ATTEST, GO_ENV, go_cache, link_tree
from eval_harness.sandbox import RunResult

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


def _main(members: Members) -> str:
    """``batch.bin N`` runs sample N's tests through ``testing.Main`` (kept for programs that simulate ``go test``),
    then a last test that attests: that runs only if every test ran, and exit status 0 only if every test passed."""
    imports = "".join(f'    p{i} "cgbatch/p{i}"\n' for i, _ in members)
    rows = "".join(f"    {i}: p{i}.CodegeexTests,\n" for i, _ in members)
    return ('package main\n\nimport (\n    codegeexos "os"\n    "strconv"\n    "testing"\n' + imports + ")\n\n"
            "var batch = map[int][]testing.InternalTest{\n" + rows + "}\n" + GO_ATTEST
            + "\nfunc main() {\n    i, _ := strconv.Atoi(codegeexos.Args[1])\n    codegeexos.Args = codegeexos.Args[:1]\n"
            "    tests, ok := batch[i]\n    if !ok {\n        codegeexos.Exit(3)\n    }\n"
            '    done := testing.InternalTest{Name: "CodegeexAttest", F: func(*testing.T) { codegeexAttest() }}\n'
            "    all := func(pattern, name string) (bool, error) { return true, nil }\n"
            "    testing.Main(all, append(tests, done), nil, nil)\n}\n")


class GoBatch(BatchPart):
    """One ``go build`` of many packages; a member the build names, or any when it names none, runs alone."""

    prefix = "codegeex-gobuild-"
    max_rounds = 3
    shared = ("gocache",)  # hard links into the warm build cache (runners.go_cache)

    def claims(self, job: Job) -> bool:
        return bool(job.program.unit)

    def joins(self, job: Job) -> bool:
        return batchable(job.program.unit)

    def prepare(self, root: Path, members: Members) -> None:
        link_tree(Path(go_cache()), root / "gocache")
        for i, job in members:
            package = root / "gopath" / "src" / "cgbatch" / f"p{i}"
            package.mkdir(parents=True, exist_ok=True)
            (package / "code.go").write_text(_package(i, job.program.unit))

    def compile_command(self, root: Path, pending: Members) -> tuple[list[str], dict[str, str]]:
        (root / "gopath" / "src" / "cgbatch" / "main").mkdir(parents=True, exist_ok=True)
        (root / "gopath" / "src" / "cgbatch" / "main" / "main.go").write_text(_main(pending))
        env = {**GO_ENV, "GOPATH": f"{root}/gopath:{GO_ENV['GOPATH']}"}
        return ["sh", "-c", 'GOCACHE="$PWD/gocache" exec go build -ldflags="-s -w" -o batch.bin cgbatch/main'], env

    def blame(self, root: Path, out: RunResult) -> tuple[RunResult, set[int]]:
        return out, {int(n) for n in re.findall(r"cgbatch/p(\d+)\b", out.stdout + out.stderr)}

    def run_command(self, root: Path, index: int) -> list[str]:
        return [str(root / "batch.bin"), str(index)]

    def run_reads(self, root: Path, index: int) -> list[str]:
        return [str(root / "batch.bin")]  # the binary alone: no member's sources (every member's code is linked in)
