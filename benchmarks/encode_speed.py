"""`codegeex data encode` with CodeGeeX's tokenizer against transformers' GPT2TokenizerFast with CodeGeeX's rule.

The texts: every HumanEval-X prompt and canonical solution of python, cpp, java, js and go, repeated to about
``--mb`` MB. Side by side, one run each, in this process:
- ``data encode``: :func:`data_pipeline.tokenizer.encode_jsonl` file to file (tokenizer load, JSON read and write
  included);
- ours in memory: :meth:`CodeGeeXTokenizer.encode_batch` on the list of texts;
- the reference in memory: CodeGeeX's whitespace rule (``str.replace``, n = 10 down to 2) then
  ``GPT2TokenizerFast.from_pretrained(shared files)(texts)["input_ids"]`` (batched, no I/O).
The ids of all three are checked equal.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import tempfile
import time
from pathlib import Path

SHARED = Path(os.environ.get("CODEGEEX_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
LANGS = ("python", "cpp", "java", "js", "go")


def corpus(mb: float) -> list[str]:
    base: list[str] = []
    for lang in LANGS:
        with gzip.open(SHARED / "humaneval-x" / lang / f"humaneval_{lang}.jsonl.gz", "rt", encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                base += [rec["prompt"], rec["canonical_solution"]]
    size = sum(len(t.encode("utf-8")) for t in base)
    return base * max(1, round(mb * 1e6 / size))


def reference(tok_dir: Path, texts: list[str]) -> tuple[list[list[int]], float]:
    from transformers import GPT2TokenizerFast

    start = time.perf_counter()
    hf = GPT2TokenizerFast.from_pretrained(str(tok_dir))

    def rule(text: str) -> str:
        for n in range(10, 1, -1):
            text = text.replace(" " * n, f"<|extratoken_{n + 8}|>")
        return text

    ids = hf([rule(t) for t in texts])["input_ids"]
    return [list(i) for i in ids], time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=float, default=5.0, help="corpus size in MB (HumanEval-X repeated)")
    args = parser.parse_args()
    from data_pipeline.bpe_tokenizer import CodeGeeXTokenizer
    from data_pipeline.tokenizer import encode_jsonl

    tok_dir = SHARED / "codegeex-tokenizer"
    texts = corpus(args.mb)
    mb = sum(len(t.encode("utf-8")) for t in texts) / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "texts.jsonl", Path(tmp) / "ids.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        start = time.perf_counter()
        counts = encode_jsonl(tok_dir, src, out)
        cli_s = time.perf_counter() - start
        cli_ids = [json.loads(line)["ids"] for line in out.read_text(encoding="utf-8").splitlines()]
    start = time.perf_counter()
    tok = CodeGeeXTokenizer(tok_dir)
    ours = tok.encode_batch(texts)
    mem_s = time.perf_counter() - start
    ref, ref_s = reference(tok_dir, texts)
    assert cli_ids == ours == ref, "the ids differ"
    tokens = counts["tokens"]
    print(f"{len(texts)} texts, {mb:.2f} MB, {tokens} tokens, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.2f}")
    print("| path | seconds | tokens/s | vs reference |")
    print("|---|---|---|---|")
    for name, secs in (("`data encode` (file to file, load included)", cli_s),
                       ("CodeGeeXTokenizer.encode_batch (in memory, load included)", mem_s),
                       ("GPT2TokenizerFast + whitespace rule (in memory, load included)", ref_s)):
        print(f"| {name} | {secs:.2f} | {tokens / secs:,.0f} | {ref_s / secs:.2f}x |")


if __name__ == "__main__":
    main()
