"""Exact and near deduplication; decontamination."""

from __future__ import annotations

import numpy as np

from data_pipeline.decontam import ContaminationIndex, DecontamConfig
from data_pipeline.dedup import DedupConfig, MinHasher, exact_duplicates, first_occurrence, near_duplicates
from tests.conftest import shared_path
from tests.corpus import long_python


def _jaccard(a, b, n=5):
    import re

    def sh(t):
        w = re.findall(r"\w+", t)
        return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}

    sa, sb = sh(a), sh(b)
    return len(sa & sb) / len(sa | sb)


def test_minhash_estimates_jaccard():
    mh = MinHasher(DedupConfig())
    base = long_python(3, 200)
    for other in [base.replace("total", "result", 5), long_python(4, 200), base[: len(base) // 2]]:
        est = float(np.mean(mh.signature(base) == mh.signature(other)))
        assert abs(est - _jaccard(base, other)) < 0.1, (est, _jaccard(base, other))


def test_first_occurrence_and_exact():
    keys = np.array([5, 3, 5, 7, 3, 5], dtype=np.uint64)
    assert first_occurrence(keys).tolist() == [0, 1, 0, 3, 1, 0]
    assert exact_duplicates(keys).tolist() == [False, False, True, False, True, True]


def test_near_duplicates_keep_the_first_and_spare_distinct_documents():
    cfg = DedupConfig()
    mh = MinHasher(cfg)
    a = long_python(1, 200)
    docs = [a, long_python(2, 200), a.replace("func_1_7(", "renamed("), long_python(3, 200), a.replace("other", "x")]
    sigs = np.stack([mh.signature(d) for d in docs])
    bands = np.stack([mh.band_keys(s) for s in sigs])
    dup = near_duplicates(lambda b: bands[:, b], cfg.bands, lambda i: sigs[i], cfg.threshold, np.zeros(5, bool))
    # doc 4 renames a word on every other line: Jaccard well under 0.7, so it stays
    assert _jaccard(a, docs[4]) < 0.7
    assert dup.tolist() == [False, False, True, False, False]


def test_decontamination_on_humaneval_x_and_mbpp():
    he = shared_path("humaneval-x")
    mbpp = shared_path("mbpp", "mbpp.jsonl")
    index = ContaminationIndex(DecontamConfig(humaneval_x=str(he), mbpp=str(mbpp)))
    assert index.num_items > 1500
    from common.io import read_jsonl

    problem = next(iter(read_jsonl(he / "python" / "humaneval_python.jsonl.gz")))
    leaked = "import os\n\n" + problem["prompt"] + problem["canonical_solution"] + "\n\nprint('hi')\n"
    assert index.match(leaked) == "Python/0:prompt"
    java = list(read_jsonl(he / "java" / "humaneval_java.jsonl.gz"))[10]
    assert index.match("// copied\n" + java["declaration"] + java["canonical_solution"]).startswith("Java/10")
    assert index.match(long_python(5, 200)) is None
    assert index.match("import java.util.*;\nimport java.lang.*;\n\nclass Solution {\n}\n") is None
