"""A small source tree with one file for every skip reason, duplicates, and documented functions in five languages."""

from __future__ import annotations

import gzip
import json
import os
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

PY_MODULE = '''"""Geometry helpers."""
import math


def area(radius):
    """Return the area of a circle of the given radius."""
    return math.pi * radius ** 2


class Vector:
    def norm(self, x, y):
        """Euclidean norm of the vector (x, y).

        Uses math.hypot for accuracy.
        """
        # hypot avoids overflow
        return math.hypot(x, y)


def undocumented(a):
    return a + 1
'''

JAVA = '''package demo;

public class Calc {
    /**
     * Adds two integers and returns the sum.
     * @param a the first
     */
    public int add(int a, int b) {
        return a + b;
    }

    // Multiplies two integers together.
    public int mul(int a, int b) {
        return a * b;
    }
}
'''

JS = '''// Utilities.

/**
 * Reverse a string character by character.
 */
function reverse(s) {
  return s.split("").reverse().join("");
}
'''

GO = '''package util

// Max returns the larger of two integers.
func Max(a int, b int) int {
	if a > b {
		return a
	}
	return b
}
'''

CPP = '''#include <vector>

/// Sum all the elements of a vector of ints.
int sum(const std::vector<int>& v) {
    int s = 0;
    for (int x : v) s += x;
    return s;
}
'''


def long_python(seed: int, lines: int = 120) -> str:
    """A plausible Python file, different for each seed."""
    out = [f'"""Module {seed}."""', ""]
    for i in range(lines // 4):
        out += [f"def func_{seed}_{i}(value_{i}, other):",
                f"    total = value_{i} * {i + seed} + other - {seed * 7 + i}",
                f"    return [total for _ in range({i % 5 + 1})]", ""]
    return "\n".join(out) + "\n"


def write_corpus(root: Path) -> dict[str, int]:
    """Write the tree; returns how many files each skip reason should count."""
    src = root / "tree"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "geometry.py").write_text(PY_MODULE)
    (src / "pkg" / "geometry_copy.py").write_text(PY_MODULE)  # exact duplicate
    base = long_python(1)
    (src / "pkg" / "big.py").write_text(base)
    near = base.replace("func_1_3(value_3, other)", "func_1_3(value_3, another)")
    (src / "pkg" / "big_near.py").write_text(near)  # near duplicate (one line changed)
    (src / "pkg" / "distinct.py").write_text(long_python(2))
    (src / "pkg" / "crlf_tabs.py").write_bytes(b"def f(x):\r\n\tif x:  \r\n\t\treturn 'caf\xc3\xa9 \xe2\x96\x81 \xe6\x97\xa5'\r\n")
    (src / "pkg" / "broken.py").write_text("def broken(:\n    return\n")  # parse_error
    (src / "pkg" / "blob.py").write_bytes(b"\x00\x01\x02binary")  # binary
    (src / "pkg" / "latin1.py").write_bytes(b"s = 'caf\xe9'\n")  # invalid_utf8
    (src / "pkg" / "empty.py").write_text("  \n\n")  # empty
    (src / "pkg" / "huge.py").write_text("x = 1\n" * 200_000)  # too_large (1.2 MB)
    (src / "pkg" / "wide.py").write_text(("y = '" + "a" * 150 + "'\n") * 20)  # avg_line_too_long
    (src / "pkg" / "longline.py").write_text("z = 1\n" * 50 + "w = '" + "b" * 1200 + "'\n")  # line_too_long
    (src / "pkg" / "notes.txt").write_text("not code\n")  # not_a_training_language
    (src / "pkg" / "loop").symlink_to("..")  # symlink_loop
    (src / "pkg" / "dangling.py").symlink_to(src / "missing.py")  # unreadable
    (src / "java").mkdir()
    (src / "java" / "Calc.java").write_text(JAVA)
    (src / "web").mkdir()
    (src / "web" / "util.js").write_text(JS)
    (src / "web" / "style.css").write_text("body { color: red; }\n.a > .b { margin: 0 auto; }\n")
    (src / "go").mkdir()
    (src / "go" / "util.go").write_text(GO)
    (src / "cpp").mkdir()
    (src / "cpp" / "sum.cpp").write_text(CPP)
    (src / "scripts").mkdir()
    (src / "scripts" / "run").write_text("#!/usr/bin/env bash\nset -e\necho \"$@\"\n")  # Shell by shebang

    records = [{"content": long_python(10 + i, 40), "path": f"rec{i}.py"} for i in range(5)]
    with open(root / "records.jsonl", "w") as fh:
        for rec in records:
            fh.write(json.dumps(rec) + "\n")
        fh.write("{not json\n")  # malformed_record
    with gzip.open(root / "records.jsonl.gz", "wt") as gz:
        gz.write(json.dumps({"content": long_python(30, 40), "language": "Python"}) + "\n")
    pq.write_table(pa.table({"content": [long_python(40, 40), GO.replace("Max", "Min")],
                             "language": ["python", "go"]}), root / "records.parquet")
    with zipfile.ZipFile(root / "src.zip", "w") as zf:
        zf.writestr("demo/Other.java", JAVA.replace("Calc", "Other").replace("a + b", "b + a"))
    os.utime(src, None)
    return {"exact_duplicate": 1, "near_duplicate": 1, "parse_error": 1, "binary": 1, "invalid_utf8": 1, "empty": 1,
            "too_large": 1, "avg_line_too_long": 1, "line_too_long": 1, "symlink_loop": 1, "unreadable": 1,
            "malformed_record": 1, "not_a_training_language": 1}


def corpus_inputs(root: Path) -> list[str]:
    return [str(root / "tree"), str(root / "records.jsonl"), str(root / "records.jsonl.gz"),
            str(root / "records.parquet"), str(root / "src.zip")]
