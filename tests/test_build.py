"""``codegeex data build`` end to end on the test corpus: counts, determinism, resumption, integrity."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from common.config import ConfigError, load_config
from common.contracts import manifest_to_json
from data_pipeline.build import run_build
from data_pipeline.config import BuildConfig
from data_pipeline.languages import LANGUAGES
from data_pipeline.store import StoreError, TokenStore
from data_pipeline.tokenizer import CodeTokenizer
from data_pipeline.whitespace import restore
from launch.cli import main
from tests.conftest import shared_path
from tests.test_contracts import write_raw


def build(inputs, tokenizer, out, *overrides, force=False, **values):
    cfg = load_config(BuildConfig, overrides=overrides,
                      values={"inputs": inputs, "tokenizer": tokenizer, "output": str(out), "pack.seq_len": 64, **values})
    return run_build(cfg, ["test"], force=force)


def shard_bytes(out: Path) -> list[bytes]:
    return [f.read_bytes() for f in sorted((out / "shards").glob("*.arrow"))]


@pytest.fixture(scope="module")
def store(corpus, tokenizer_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("store") / "s"
    manifest = build(corpus[0], tokenizer_model, out, "pack.shard_mb=0.005")
    return out, manifest


def test_manifest_counts_every_skip_and_language(store, corpus):
    out, m = store
    for reason, n in corpus[1].items():
        assert m.skips[reason] == n, reason
    langs = m.languages
    assert langs["Python"].documents == 6 + 5 + 1 + 1 - 2  # minus the exact and the near duplicate
    assert {"Java", "JavaScript", "CSS", "Go", "C++", "Shell"} <= set(langs)
    assert m.total_documents == sum(v.documents for v in langs.values())
    assert m.total_tokens == sum(v.tokens for v in langs.values())
    assert len(m.shards) > 1 and all(len(s.sha256) == 64 for s in m.shards)
    assert m.window == 65 and m.tokenizer.sha256 and m.command == ["test"]


def test_windows_hold_tagged_documents_ending_in_eod(store, tokenizer_model):
    out, m = store
    tok = CodeTokenizer(tokenizer_model)
    s = TokenStore(out)
    assert len(s) == m.total_windows
    eods: dict[int, int] = {}
    tags = {tok.piece_id(lang.tag): lang.id for lang in LANGUAGES}
    for i in range(len(s)):
        w = s[i]
        real = w.tokens[:w.num_tokens]
        assert np.all(w.tokens[w.num_tokens:] == tok.pad_id)
        eods[w.language] = eods.get(w.language, 0) + int(np.sum(real == tok.eod_id))
        for start in w.doc_starts:
            assert tags[int(w.tokens[start])] == w.language  # every document opens with its language's tag
    for name, stats in m.languages.items():
        assert eods[LANGUAGES[[lang.name for lang in LANGUAGES].index(name)].id] == stats.documents


def test_shards_are_byte_identical_whatever_the_parallelism(store, corpus, tokenizer_model, tmp_path):
    reference = shard_bytes(store[0])
    build(corpus[0], tokenizer_model, tmp_path / "w2", "pack.shard_mb=0.005", workers=2, unit_mb=0.002)
    assert shard_bytes(tmp_path / "w2") == reference
    for part in (1, 0):  # two "machines" of a SLURM array, then the merge
        assert build(corpus[0], tokenizer_model, tmp_path / "parts", "pack.shard_mb=0.005", num_shards=2,
                     shard_index=part) is None
    assert main(["data", "merge", str(tmp_path / "parts")]) == 0
    assert shard_bytes(tmp_path / "parts") == reference


def test_store_of_a_version_this_code_does_not_read_is_refused_then_built_again(store, corpus, tokenizer_model,
                                                                               tmp_path, caplog):
    out = tmp_path / "s"
    shutil.copytree(store[0], out)
    write_raw(out, {**manifest_to_json(store[1]), "schema_version": 99})  # as a newer release would write it
    with pytest.raises(ValueError, match="holds a manifest.json that is not a store's .*schema_version 99.*--force"):
        build(corpus[0], tokenizer_model, out, "pack.shard_mb=0.005")
    with caplog.at_level("WARNING"):
        again = build(corpus[0], tokenizer_model, out, "pack.shard_mb=0.005", force=True)
    assert "schema_version 99 is not one this code reads" in caplog.text and "building the store again" in caplog.text
    assert again.schema_version == 2 and shard_bytes(out) == shard_bytes(store[0])


def test_finished_store_is_reused_and_spools_removed(store, corpus, tokenizer_model, caplog):
    out, m = store
    assert not (out / ".work").exists()
    before = [f.stat().st_mtime_ns for f in sorted((out / "shards").glob("*.arrow"))]
    with caplog.at_level("INFO"):
        again = build(corpus[0], tokenizer_model, out, "pack.shard_mb=0.005")
    assert "is up to date" in caplog.text and again.total_windows == m.total_windows
    assert [f.stat().st_mtime_ns for f in sorted((out / "shards").glob("*.arrow"))] == before


def test_an_output_holding_something_else_is_refused_and_builds_do_not_race(store, corpus, tokenizer_model, tmp_path):
    """Another finished store, a user's files or manifest.json: refused, naming them, and left as they are;
    --force replaces them. A second build of the same output stops at once, naming the first; nothing accepted is an
    error, not an empty store."""
    from data_pipeline.build_guard import build_lock

    other = tmp_path / "other"
    shutil.copytree(store[0], other)
    with pytest.raises(ValueError, match="a finished store of other inputs or settings"):
        build(corpus[0], tokenizer_model, other, "pack.shard_mb=0.005", "dedup.threshold=0.8")
    assert (other / "manifest.json").read_bytes() == (store[0] / "manifest.json").read_bytes()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "manifest.json").write_text('{"my": "notes"}')
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(ValueError, match=r"files that are not a store's \(thesis.tex\) and a manifest.json"):
        build(corpus[0], tokenizer_model, mine)
    assert (mine / "thesis.tex").read_text() == "x" and (mine / "manifest.json").read_text() == '{"my": "notes"}'
    with build_lock(tmp_path / "busy"), pytest.raises(ValueError, match=r"being built by another .*\"pid\": "):
        build(corpus[0], tokenizer_model, tmp_path / "busy")
    empty = tmp_path / "empty-input"
    empty.mkdir()
    (empty / "notes.txt").write_text("not code\n")
    with pytest.raises(ValueError, match="nothing was accepted, so no store was written"):
        build([str(empty)], tokenizer_model, tmp_path / "nothing")
    assert not (tmp_path / "nothing" / "manifest.json").exists()
    again = build(corpus[0], tokenizer_model, mine, "pack.shard_mb=0.005", force=True)
    assert again.total_windows == store[1].total_windows and not (mine / "thesis.tex").exists()


def test_resuming_with_other_settings_is_refused(store, corpus, tokenizer_model, tmp_path):
    build(corpus[0], tokenizer_model, tmp_path / "a", num_shards=2, shard_index=0)
    with pytest.raises(ValueError, match="holds unfinished work from another configuration"):
        build(corpus[0], tokenizer_model, tmp_path / "a", "dedup.threshold=0.8")
    with pytest.raises(FileNotFoundError, match="tokenizer model .*nope.model does not exist"):
        build(corpus[0], str(tmp_path / "nope.model"), tmp_path / "b")


def corrupt_copy(store: str | Path, copy: Path, index: int = 0) -> tuple[Path, bytes]:
    """A copy of ``store`` with one byte of its ``index``-th shard flipped: (that shard, its corrupted bytes)."""
    shutil.copytree(store, copy)
    shard = sorted((copy / "shards").glob("*.arrow"))[index]
    data = bytearray(shard.read_bytes())
    data[200] ^= 0xFF
    shard.write_bytes(bytes(data))
    return shard, bytes(data)


def test_corrupt_or_truncated_shard_is_named(store, tmp_path):
    copy = tmp_path / "c"
    shard, data = corrupt_copy(store[0], copy, 1)
    with pytest.raises(StoreError, match=rf"{shard.name}: checksum mismatch"):
        TokenStore(copy)
    shard.write_bytes(data[:-100])
    with pytest.raises(StoreError, match=rf"{shard.name}: shard is truncated"):
        TokenStore(copy)
    (copy / "manifest.json").unlink()
    with pytest.raises(StoreError, match="manifest.json does not exist"):
        TokenStore(copy)


def _pair_runs(store_dir, tok):
    """Every pair document of a store as its runs of (modality, decoded text)."""
    s = TokenStore(store_dir)
    docs = []
    for i in range(len(s)):
        w = s[i]
        cuts = sorted({0, *w.doc_starts.tolist(), w.num_tokens})
        for a, b in zip(cuts, cuts[1:]):
            mod, ids = w.modality[a:b], w.tokens[a:b]
            edges = [0, *(np.flatnonzero(np.diff(mod)) + 1).tolist(), len(mod)]
            docs.append([(int(mod[x]), tok.decode(ids[x:y])) for x, y in zip(edges, edges[1:])])
    return docs


def test_text_to_code_pairs_carry_modality(corpus, tokenizer_model, tmp_path):
    m = build(corpus[0], tokenizer_model, tmp_path / "pairs", "extract.functions=true", "extract.keep_files=false",
              "pack.mode=best_fit")
    assert m.columns[-1] == "modality" and m.languages["Python"].pairs == 2
    assert {"Java", "JavaScript", "Go", "C++"} <= set(m.languages)
    tok = CodeTokenizer(tokenizer_model)
    docs = _pair_runs(tmp_path / "pairs", tok)
    patterns = [[r[0] for r in d] for d in docs]  # markup, docstring, code marker, code; [0]: a long pair's rest
    assert {tuple(p) for p in patterns} == {(3, 7, 3, 0), (0,)} and patterns.count([3, 7, 3, 0]) >= 8
    area = next(d for d in docs if len(d) == 4 and "area of a circle" in d[1][1])
    assert area == [(3, "# language: Python\n[descr]"), (7, "Return the area of a circle of the given radius.\n"),
                    (3, "[python]"), (0, "def area(radius):\n    return math.pi * radius ** 2\n[eoc]<|endoftext|>")]


def test_pairs_in_the_pycodegpt_order_with_whitespace_markers(corpus, tokenizer_model, tmp_path):
    build(corpus[0], tokenizer_model, tmp_path / "pairs", "extract.functions=true", "extract.keep_files=false",
          "pack.mode=best_fit", "extract.pair_order=signature_first", "extract.normalize_whitespace=true")
    tok = CodeTokenizer(tokenizer_model)
    docs = _pair_runs(tmp_path / "pairs", tok)
    full = (3, 2, 3, 7, 3, 0)  # the signature is in the prefix
    patterns = [tuple(r[0] for r in d) for d in docs]  # a pair longer than a window continues in the next one
    assert all(any(full[i:i + len(p)] == p for i in range(len(full))) for p in patterns), patterns
    assert patterns.count(full) >= 8
    area = next(d for d in docs if len(d) == 6 and "area of a circle" in d[3][1])
    assert area == [(3, "# language: Python\n[sos]"), (2, "def area(radius):[new_line]"), (3, "[descr]"),
                    (7, "Return the area of a circle of the given radius.\n"), (3, "[python]"),
                    (0, "[indent]return math.pi * radius ** 2[new_line][eoc]<|endoftext|>")]
    assert restore(area[1][1] + area[5][1].removesuffix("[eoc]<|endoftext|>")) == (
        "def area(radius):\n    return math.pi * radius ** 2\n")


def _store_documents(store_dir, tok) -> list[str]:
    """Every document of a store, decoded: each language's windows joined in store order, cut after each EOD."""
    s = TokenStore(store_dir)
    streams: dict[int, list[np.ndarray]] = {}
    for i in range(len(s)):
        w = s[i]
        streams.setdefault(w.language, []).append(w.tokens[:w.num_tokens])
    docs = []
    for parts in streams.values():
        ids = np.concatenate(parts)
        ends = (np.flatnonzero(ids == tok.eod_id) + 1).tolist()
        assert ends and ends[-1] == len(ids)  # no document is cut off at the end of a language
        docs += [tok.decode(ids[a:b]) for a, b in zip([0, *ends[:-1]], ends)]
    return docs


def test_decontamination_drops_benchmark_leaks(store, corpus, tokenizer_model, tmp_path):
    """Planted HumanEval-X (Python, Java) and MBPP texts are not in the store, the planted clean files are, and
    every document is accounted for: the store holds exactly the plain build's documents plus the clean files."""
    he, mbpp = shared_path("humaneval-x"), shared_path("mbpp", "mbpp.jsonl")
    from common.io import read_jsonl
    from tests.corpus import long_python

    py = next(iter(read_jsonl(he / "python" / "humaneval_python.jsonl.gz")))
    java = list(read_jsonl(he / "java" / "humaneval_java.jsonl.gz"))[10]
    mb = next(iter(read_jsonl(mbpp)))
    leaks = {"solutions.py": py["prompt"] + py["canonical_solution"],
             "Leak.java": "// copied\n" + java["declaration"] + java["canonical_solution"],
             "mbpp_copy.py": "import sys\n\n" + mb["code"].replace("\r\n", "\n") + "\n"}
    clean = {"clean.py": long_python(5, 200),
             "Clean.java": "class Clean {\n    int twice(int x) {\n        return 2 * x;\n    }\n}\n"}
    leak = tmp_path / "leak"
    leak.mkdir()
    for name, text in {**leaks, **clean}.items():
        (leak / name).write_text(text)
    m = build([*corpus[0], str(leak)], tokenizer_model, tmp_path / "d", f"decontam.humaneval_x={he}",
              f"decontam.mbpp={mbpp}")
    assert sorted((e["source"].rsplit("/", 1)[-1], e["item"]) for e in m.contaminated_examples) == [
        ("Leak.java", "Java/10:prompt"), ("mbpp_copy.py", "MBPP/1:solution"), ("solutions.py", "Python/0:prompt")]
    # the counts add up: documents in (the plain build's kept and skipped, plus the 5 planted files) = kept + skipped
    plain = store[1]
    nonzero = lambda skips: {k: v for k, v in skips.items() if v}  # noqa: E731
    assert nonzero(m.skips) == {**nonzero(plain.skips), "contaminated": len(leaks)}
    assert m.total_documents == plain.total_documents + len(clean)
    assert m.total_documents + sum(m.skips.values()) == (
        plain.total_documents + sum(plain.skips.values()) + len(leaks) + len(clean))
    # what the store holds, decoded: no planted benchmark line anywhere, the clean files whole
    tok = CodeTokenizer(tokenizer_model)
    docs = _store_documents(tmp_path / "d", tok)
    assert len(docs) == m.total_documents
    for name, text in leaks.items():
        lines = [ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 20]
        assert len(lines) >= 3, name
        kept = [ln for ln in lines if any(ln in d for d in docs)]
        assert kept == [], f"{name}: benchmark lines in the store: {kept}"
    tags = {"py": "# language: Python\n", "java": "// language: Java\n"}
    for name, text in clean.items():
        assert docs.count(tags[name.rsplit(".", 1)[1]] + text + "<|endoftext|>") == 1, name
    assert sorted(docs) == sorted(_store_documents(store[0], tok) + [
        tags[n.rsplit(".", 1)[1]] + t + "<|endoftext|>" for n, t in clean.items()])


def test_inspect_shows_languages_skips_and_marked_samples(store, capsys):
    assert main(["data", "inspect", str(store[0]), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert "language" in out and "Python" in out and "skipped because" in out and "near_duplicate" in out
    assert out.count("--- window") == 2


@pytest.mark.slow
def test_killed_build_resumes_with_nothing_lost_or_duplicated(tokenizer_model, tmp_path):
    inputs = ["default"]
    args = ["--tokenizer", tokenizer_model, "--seq-len", "128", "--workers", "1", "max_input_mb_per_language=0.5",
            "unit_mb=0.05", "dedup.near=false", "keep_work=true"]
    cmd = [sys.executable, "-m", "launch.cli", "data", "build", "--input", *inputs, "--output"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(killed), *args], stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / ".work").glob("unit-*.json"))) < 3:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    spooled = {f: f.stat().st_mtime_ns for f in (killed / ".work").glob("unit-*.arrow") if f.with_suffix(".json").exists()}
    assert len(spooled) >= 3 and not (killed / "manifest.json").exists()
    subprocess.run([*cmd, str(killed), *args], check=True, stderr=subprocess.DEVNULL)
    subprocess.run([*cmd, str(tmp_path / "clean"), *args], check=True, stderr=subprocess.DEVNULL)
    assert shard_bytes(killed) == shard_bytes(tmp_path / "clean") and shard_bytes(killed)
    assert all(f.stat().st_mtime_ns == t for f, t in spooled.items())  # finished units were not redone
    assert len(list((killed / ".work").glob("unit-*.json"))) > len(spooled)


def _plant_corrupt_inputs(root: Path) -> tuple[list[str], list[str], dict[str, tuple[dict[str, int], str]]]:
    """Good files beside one corrupt file of every kind: (inputs, good texts, {corrupt file: (reasons, named)})."""
    import gzip
    import json
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tests.corpus import long_python

    good = [long_python(100 + i, 12) for i in range(8)]
    tree = root / "tree"
    tree.mkdir(parents=True)
    (tree / "good.py").write_text(good[0])
    (tree / "latin1.py").write_bytes(b"s = 'caf\xe9'\n")  # undecodable bytes
    (tree / "dangling.py").symlink_to(tree / "missing.py")  # stat fails: unreadable at listing
    os.mkfifo(tree / "pipe.py")  # reading would block: not a regular file
    (tree / "eio.py").symlink_to("/proc/self/mem")  # a regular file of size 0 whose read fails with EIO
    lines = [json.dumps({"content": good[1], "language": "python"}), "{not json", "[1, 2]", json.dumps({"path": "x.py"}),
             json.dumps({"content": good[2], "path": "b.py"})]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    stream = gzip.compress("".join(json.dumps({"content": t, "path": "g.py"}) + "\n" for t in good[3:5]).encode()
                           + b"".join(json.dumps({"content": f"x = {i}\n" * 40}).encode() + b"\n" for i in range(300)))
    (root / "cut.jsonl.gz").write_bytes(stream[:len(stream) * 3 // 4])  # truncated: the lines before it are kept
    pq.write_table(pa.table({"content": [long_python(200, 12), long_python(201, 12), good[5], good[6]],
                             "path": ["a.py", "b.py", "c.py", "d.py"]}), root / "groups.parquet", row_group_size=2)
    data = bytearray((root / "groups.parquet").read_bytes())
    col = pq.ParquetFile(root / "groups.parquet").metadata.row_group(0).column(0)
    first = col.dictionary_page_offset or col.data_page_offset
    data[first:first + col.total_compressed_size] = b"\xab" * col.total_compressed_size  # row group 0's pages
    (root / "groups.parquet").write_bytes(bytes(data))
    (root / "garbage.parquet").write_bytes(b"PAR1 not really " * 8)
    pq.write_table(pa.table({"content": [long_python(202, 12)] * 3}), root / "whole.parquet")
    (root / "truncated.parquet").write_bytes((root / "whole.parquet").read_bytes()[:-40])
    (root / "whole.parquet").unlink()
    pq.write_table(pa.table({"body": ["x = 1\n", "y = 2\n"]}), root / "notext.parquet")
    with zipfile.ZipFile(root / "members.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok/good.py", good[7])
        zf.writestr("bad/broken.py", long_python(300, 40))
    data = bytearray((root / "members.zip").read_bytes())
    with zipfile.ZipFile(root / "members.zip") as zf:
        info = zf.getinfo("bad/broken.py")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    data[start:start + info.compress_size] = bytes(b ^ 0x55 for b in data[start:start + info.compress_size])
    (root / "members.zip").write_bytes(bytes(data))
    (root / "truncated.zip").write_bytes(bytes(data[:len(data) // 2]))
    inputs = [str(tree)] + [str(root / n) for n in ("records.jsonl", "cut.jsonl.gz", "groups.parquet", "garbage.parquet",
                                                    "truncated.parquet", "notext.parquet", "members.zip", "truncated.zip")]
    u, m = "unreadable", "malformed_record"
    expected = {
        f"{tree}/dangling.py": ({u: 1}, "symbolic link to"),
        f"{tree}/pipe.py": ({u: 1}, "not a regular file (a FIFO)"),
        f"{tree}/eio.py": ({u: 1}, "symbolic link to /proc/self/mem: Input/output error"),
        f"{tree}/latin1.py": ({"invalid_utf8": 1}, "byte 8: not UTF-8"),
        f"{root}/records.jsonl": ({m: 3}, "line 2: invalid JSON"),
        f"{root}/cut.jsonl.gz": ({u: 1}, "EOFError: Compressed file ended"),
        f"{root}/groups.parquet": ({u: 2}, "row group 0: OSError"),
        f"{root}/garbage.parquet": ({u: 1}, "magic bytes not found"),
        f"{root}/truncated.parquet": ({u: 1}, "magic bytes not found"),
        f"{root}/notext.parquet": ({m: 2}, "row group 0: no column 'content' (columns: body)"),
        f"{root}/members.zip": ({u: 1}, "member bad/broken.py: error: Error -3 while decompressing"),
        f"{root}/truncated.zip": ({u: 1}, "BadZipFile: File is not a zip file"),
    }
    return inputs, good, expected


def test_corrupt_inputs_of_every_format_are_skipped_named_and_counted(tokenizer_model, tmp_path, caplog):
    """One corrupt file of every kind beside good ones: each named (where and why) in a warning, the manifest and the
    summary line, counted under its reason; every good document, and the good parts of the damaged files, built.
    Unreadable as root (chmod does not stop it): a dangling link, a FIFO, and a link to /proc/self/mem (EIO)."""
    inputs, good, expected = _plant_corrupt_inputs(tmp_path / "in")
    with caplog.at_level("INFO"):
        m = build(inputs, tokenizer_model, tmp_path / "out")
    assert [c.file for c in m.corrupt_inputs] == sorted(expected)
    for c in m.corrupt_inputs:
        reasons, named = expected[c.file]
        assert c.reasons == reasons and c.items == sum(reasons.values()) and named in c.first, c
        assert f"corrupt input {c.file}: {c.items} item(s) skipped" in caplog.text and named in caplog.text
    assert m.skips["unreadable"] == 10 and m.skips["malformed_record"] == 5 and m.skips["invalid_utf8"] == 1
    assert f"corrupt inputs: {len(expected)} file(s): {tmp_path}/in/cut.jsonl.gz 1, {tmp_path}/in/garbage" in caplog.text
    assert m.total_documents == m.languages["Python"].documents == len(good)
    tok = CodeTokenizer(tokenizer_model)
    s = TokenStore(tmp_path / "out")
    text = tok.decode(np.concatenate([s[i].tokens[:s[i].num_tokens] for i in range(len(s))]).tolist())
    assert all(t in text for t in good)
    small = build(inputs, tokenizer_model, tmp_path / "small-units", unit_mb=0.0002)  # files split over many units
    assert small.corrupt_inputs == m.corrupt_inputs and small.total_documents == m.total_documents
    with pytest.raises(ValueError, match=r"nothing was accepted.*corrupt inputs: .*garbage.parquet: 1 item\(s\) "
                                         r"skipped \(unreadable 1\); first: ArrowInvalid: Parquet magic bytes"):
        build(inputs[4:7] + inputs[8:], tokenizer_model, tmp_path / "none")


def test_codegeex_tokenizer_build_skips_special_token_text_and_round_trips(tmp_path):
    """With CodeGeeX's BPE: documents holding a special token's text are skipped and counted; every other document
    comes back from its ids exactly (tag line first, 50256 last); whitespace markers are refused by name."""
    from data_pipeline.tokenizer import load_tokenizer

    tok_dir = str(shared_path("codegeex-tokenizer"))
    src = tmp_path / "src"
    src.mkdir()
    texts = {"a.py": "def f(x):\n        return x  # eight spaces\n", "b.py": "s = '<|endoftext|>'\n",
             "c.go": "package main\n\nfunc main() {\n\tprintln(\"hi\")   \n}\n", "d.py": "x = '<|extratoken_5|>'\n"}
    for name, text in texts.items():
        (src / name).write_text(text)
    m = build([str(src)], tok_dir, tmp_path / "out", "filters.parse=false", "dedup.near=false")
    assert m.skips["special_token_text"] == 2 and m.total_documents == 2
    tok = load_tokenizer(tok_dir)
    store = TokenStore(tmp_path / "out")
    decoded = []
    for i in range(len(store)):
        s = store[i]
        ids = s.tokens[:s.num_tokens].tolist()
        for a, b in zip(s.doc_starts.tolist(), [*s.doc_starts.tolist()[1:], len(ids)]):
            assert ids[b - 1] == 50256
            decoded.append(tok.decode(ids[a:b - 1]))
    assert sorted(decoded) == sorted(f"{tag}\n{texts[n]}" for n, tag in (("a.py", "# language: Python"),
                                                                        ("c.go", "// language: Go")))
    from types import SimpleNamespace

    from launch.job_checks import store_problems  # the launcher's pre-flight check opens the directory's files
    assert store_problems("store", str(tmp_path / "out"), SimpleNamespace(model=SimpleNamespace(vocab_size=52224)),
                          [])[0] == []
    problems = store_problems("store", str(tmp_path / "out"), SimpleNamespace(model=SimpleNamespace(vocab_size=50304)),
                              [])[0]
    assert problems == [f"store {tmp_path / 'out'}: tokenizer vocabulary (50400) exceeds model.vocab_size (50304)"]
    with pytest.raises(ConfigError, match="normalize_whitespace needs a tokenizer with"):
        build([str(src)], tok_dir, tmp_path / "ws", "extract.functions=true", "extract.normalize_whitespace=true")
