"""Docs that are generated from code stay in step with it, and the commands of the operators' docs, the README and
the planner's page run as written (launches with --dry-run)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import re
import shlex
import shutil
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.cli import build_parser, main, parse_anywhere
from launch.docgen import render

DOCS = Path(__file__).resolve().parents[1] / "docs"


def test_config_tables_are_current():
    stale = [p.name for p in DOCS.glob("*.md") if render(p.read_text()) != p.read_text()]
    assert stale == [], f"regenerate with: python -m launch.docgen docs/*.md  (stale: {stale})"


def _config_keys(cls: type, prefix: str = "") -> tuple[list[str], set[type], set[type]]:
    """(every leaf key, the nested dataclasses, the dataclasses of list items) of a config class, from its fields."""
    keys, nested, items = [], set(), set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            sub = _config_keys(tp, f"{prefix}{f.name}.")
            keys, nested, items = keys + sub[0], nested | {tp} | sub[1], items | sub[2]
            continue
        keys.append(prefix + f.name)
        items |= {a for a in typing.get_args(tp) if isinstance(a, type) and dataclasses.is_dataclass(a)}
    return keys, nested, items


def test_every_config_table_names_real_keys():
    """Each `<!-- config: module:Class -->` table of docs/*.md has a row for every field of its class (nested
    sections dotted) and no other row; the trainer's, builder's, tokenizer's, model's and sampling's configurations
    and every list item's class have a table; every config dataclass of their modules is documented or nested."""
    tables: dict[type, list[str]] = {}
    for path in sorted(DOCS.glob("*.md")):
        for target, body in re.findall(r"<!-- config: ([\w.]+:\w+) -->\n(.*?)<!-- end config -->", path.read_text(),
                                       re.S):
            module, name = target.split(":")
            cls = getattr(importlib.import_module(module), name)
            assert cls not in tables, f"{path.name}: a second table of {target}"
            lines = body.strip().splitlines()
            assert lines[:2] == ["| key | type | default | meaning |", "|---|---|---|---|"], (path.name, target)
            rows = [re.match(r"\| `([^`]+)` \|", line) for line in lines[2:]]
            assert all(rows), f"{path.name}: {target}: a line that is not a key's row"
            tables[cls] = [r[1] for r in rows if r]
    covered, modules = set(tables), set()
    for cls, rows in tables.items():
        keys, nested, items = _config_keys(cls)
        where = f"{cls.__module__}:{cls.__name__}"
        assert sorted(set(rows) - set(keys)) == [], f"{where}: rows for keys that do not exist"
        assert sorted(set(keys) - set(rows)) == [], f"{where}: keys without a row"
        assert len(rows) == len(set(rows)), f"{where}: a key with two rows"
        assert items <= set(tables), f"{where}: list items without their own table: {items - set(tables)}"
        covered |= nested
        modules |= {c.__module__ for c in {cls, *nested}}
    names = {f"{c.__module__}:{c.__name__}" for c in tables}
    assert {"data_pipeline.config:BuildConfig", "data_pipeline.config:TokenizerConfig", "data_pipeline.sampler:"
            "SamplerConfig", "megatron_code.train_config:TrainConfig", "megatron_code.config:ModelConfig",
            "megatron_code.generation:SamplingConfig"} <= names, names
    configs = {obj for m in modules for obj in vars(importlib.import_module(m)).values()
               if isinstance(obj, type) and dataclasses.is_dataclass(obj) and obj.__module__ == m
               and dataclasses.fields(obj) and all("help" in f.metadata for f in dataclasses.fields(obj))}
    assert configs <= covered, f"config classes in no table: {sorted(c.__name__ for c in configs - covered)}"


# ---- the docs' commands run as written ------------------------------------------------------------------------------

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
COMMAND = re.compile(r"^(?:[\w.-]*\$ )?(codegeex (?:launch|plan)\b.*)$")  # `$ `, `node0$ ` prompts
RUN_DOCS = {"operators.md": DOCS / "operators.md", "README.md": DOCS.parent / "README.md",
            "parallelism.md": DOCS / "parallelism.md", "continue-codegeex.md": DOCS / "continue-codegeex.md"}
# commands of those files that this test does not run, and why (an entry that no longer matches a command fails)
NOT_RUN = {
    "codegeex plan --model PRESET --gpus N --gpu KIND": "a synopsis: PRESET, N and KIND are placeholders",
    "codegeex plan --validate codegeex13b.yaml --world-size 1536 --gpu h100-80gb": "the 13B's shapes on 1,536 fake "
    "ranks take 20-60 s on 2 cores; benchmarks/validate_time.py runs exactly this",
    "codegeex plan --validate codegeex13b.yaml --world-size 1536": "the same, without --gpu",
    "codegeex launch slurm configs/train/codegeex-continue.yaml --nodes 16 --gpus-per-node 8 --time 2-00:00:00":
        "needs the converted 13B release and a store built from a real corpus (the job is validated against them)",
    "codegeex launch slurm configs/train/codegeex-mrpt.yaml --nodes 16 --gpus-per-node 8 --time 1-00:00:00":
        "needs the continued 13B run's checkpoint and its store",
    "codegeex launch slurm --nodes 1 --gpus-per-node 8 -- eval generate --checkpoint runs/codegeex/converted --tp 2 "
    "--data ../shared/humaneval-x --languages all --n 20 --temperature 0.2 --top-p 0.95 --max-new-tokens 512 "
    "--output runs/codegeex/eval/released.samples.jsonl": "needs the converted 13B release",
    "codegeex launch slurm --nodes 1 --gpus-per-node 8 -- eval generate --checkpoint runs/codegeex/mrpt --tp 2 "
    "--data ../shared/humaneval-x --languages all --n 20 --temperature 0.2 --top-p 0.95 --max-new-tokens 512 "
    "--output runs/codegeex/eval/mrpt.samples.jsonl": "needs the stage-2 13B checkpoint",
}
REROOT = "/data/"  # the docs' cluster paths: the test's folder stands in for /data


@dataclass
class DocCommand:
    doc: str
    line: str  # continuations joined, `[optional ...]` and `# comments` dropped
    output: list[str]  # what the doc shows after a `$ ` prompt


def doc_commands(doc: str, text: str) -> list[DocCommand]:
    """Every `codegeex launch|plan` command of every fenced block (bash, sh, console or plain), new ones included."""
    found = []
    for block in FENCE.findall(text):
        lines, i = block.splitlines(), 0
        while i < len(lines):
            line, i = lines[i], i + 1
            while line.rstrip().endswith("\\") and i < len(lines):
                line, i = line.rstrip()[:-1].rstrip() + " " + lines[i].strip(), i + 1
            match = COMMAND.match(line.strip())
            if not match:
                continue
            output = []
            while line.lstrip().startswith("$ ") and i < len(lines) and not COMMAND.match(lines[i].strip()):
                output, i = [*output, lines[i]], i + 1
            words = shlex.split(re.sub(r"\s\[[^\]]*\]", "", match[1]), comments=True)
            found.append(DocCommand(doc, " ".join(words), output))
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The files the docs' commands name, in a folder that is their working directory."""
    from tests.job_files import codegeex_13b_job
    from tests.model_utils import synthetic_store
    from tests.train_utils import values, write_config

    root = tmp_path_factory.mktemp("docs")
    store = synthetic_store(root / "store", windows=8, seq_len=32)
    job = values(store, "runs/doc", tp=2, micro_batch_size=2, data__global_batch_size=3072)  # 16 to 1,536 ranks
    for name in ("CONFIG", "run.yaml"):
        write_config(job, root / name)
    (root / "configs" / "train").mkdir(parents=True)
    shutil.copy(DOCS.parent / "configs" / "train" / "tiny.yaml", root / "configs" / "train" / "tiny.yaml")
    synthetic_store(root / "runs" / "quickstart" / "store", windows=8, seq_len=32)  # what tiny.yaml trains on
    (root / "hosts.txt").write_text("node0 slots=8\nnode1 slots=8\n")
    codegeex_13b_job(root)
    return root


def run_as_written(command: DocCommand, root: Path, caplog, capsys) -> tuple[int, str, str]:
    """(exit code, stdout, the error logged): launch commands with --dry-run after the launcher (before any `--`)."""
    argv = [root / a[1:] if a.startswith(REROOT) else a for a in shlex.split(command.line)[1:]]
    if argv[0] == "launch" and "--dry-run" not in argv:
        argv.insert(2, "--dry-run")
    caplog.clear()
    capsys.readouterr()
    with caplog.at_level(logging.ERROR):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as exc:
            rc = int(exc.code or 0)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return rc, capsys.readouterr().out, "\n".join(errors)


def test_the_docs_commands_run_as_written(workdir, monkeypatch, caplog, capsys):
    commands = [c for doc, path in RUN_DOCS.items() for c in doc_commands(doc, path.read_text())]
    assert len([c for c in commands if c.doc == "operators.md"]) >= 10, commands
    tables = [c for c in commands if c.doc == "continue-codegeex.md" and c.output]
    assert len(tables) == 2, tables  # the 13B planner tables of steps 4 and 5, compared below
    monkeypatch.chdir(workdir)
    listed = {c.line for c in commands} & set(NOT_RUN)
    assert listed == set(NOT_RUN), f"NOT_RUN names commands the docs no longer have: {set(NOT_RUN) - listed}"
    for command in commands:
        if command.line in NOT_RUN:
            continue
        rc, out, error = run_as_written(command, workdir, caplog, capsys)
        where = f"{command.doc}: {command.line}"
        shown = "\n".join(command.output)
        if "configuration error" in shown:  # a documented refusal: its exit code and every problem line
            assert rc == 2, (where, out[-2000:], error)
            assert shown.split("configuration error: ", 1)[1].splitlines() == error.split("configuration error: ", 1)[
                -1].splitlines(), where
            continue
        assert rc == 0, (where, error)
        if command.output and command.line.startswith("codegeex plan --model"):  # the planner's tables, verbatim
            assert out.splitlines() == command.output, f"{where}: the doc shows another table; its output:\n{out}"


def test_every_group_takes_flags_after_its_positional_arguments():
    """Flags after positionals, and key=value overrides on both sides of a flag, for a couple of commands per group
    (parsed only, nothing runs)."""
    parser = build_parser()
    for argv, expected in (
            (["data", "inspect", "st", "--samples", "5", "--json"], {"store": "st", "samples": 5, "json": True}),
            (["data", "build", "pack.seq_len=8", "--input", "a", "b", "--output", "o", "dedup.threshold=0.5"],
             {"inputs": ["a", "b"], "output": "o", "overrides": ["pack.seq_len=8", "dedup.threshold=0.5"]}),
            (["data", "tokenizer", "vocab_size=99", "--input", "a", "--output", "o", "--skip-existing"],
             {"inputs": ["a"], "output": "o", "skip_existing": True, "overrides": ["vocab_size=99"]}),
            (["model", "info", "num_layers=3", "--preset", "tiny", "hidden_size=64", "--tp", "2"],
             {"preset": "tiny", "tp": 2, "overrides": ["num_layers=3", "hidden_size=64"]}),
            (["model", "convert", "ck", "--to", "native", "--output", "o", "--tp", "2"],
             {"input": "ck", "to": "native", "tp": 2}),
            (["train", "tp=2", "--config", "c.yaml", "optim.lr=1e-3"],
             {"config": "c.yaml", "overrides": ["tp=2", "optim.lr=1e-3"]}),
            (["eval", "execute", "s.jsonl", "--data", "d", "--output", "r"], {"samples": "s.jsonl", "output": "r"}),
            (["eval", "report", "r1.jsonl", "r2.jsonl", "--output", "rep"], {"results": ["r1.jsonl", "r2.jsonl"]}),
            (["eval", "watch", "run", "--once"], {"run_dir": "run", "once": True}),
            (["plan", "--validate", "c.yaml", "tp=2", "--world-size", "8", "optim.lr=1", "--gpu", "h200"],
             {"validate": "c.yaml", "world_size": 8, "gpu": "h200", "overrides": ["tp=2", "optim.lr=1"]}),
            (["launch", "local", "c.yaml", "--nproc", "2", "tp=2", "--dry-run", "optim.lr=1", "--gpu", "h100-80gb"],
             {"config": "c.yaml", "nproc": 2, "dry_run": True, "gpu": "h100-80gb", "overrides": ["tp=2", "optim.lr=1"]}),
            (["launch", "deepspeed", "c.yaml", "--hostfile", "h", "--force", "tp=2"],
             {"config": "c.yaml", "hostfile": "h", "force": True, "overrides": ["tp=2"]})):
        args = parse_anywhere(parser, argv)
        assert {k: getattr(args, k) for k in expected} == expected, argv
