"""``codegeex data inspect``: what a store holds, what was skipped and why, and a few decoded samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from common.contracts import manifest_to_json
from data_pipeline.languages import LANGUAGES
from data_pipeline.store import TokenStore

BOUNDARY = "\n\u2503<doc>\u2503"  # marks a document start inside a decoded sample


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def decode_sample(tokenizer: Any, tokens: np.ndarray, doc_starts: np.ndarray, num_tokens: int, chars: int) -> str:
    """The text of a window, with every document start marked and the padding left out."""
    cuts = sorted({0, *[int(s) for s in doc_starts if 0 < s < num_tokens], num_tokens})
    parts = []
    for a, b in zip(cuts, cuts[1:]):
        parts.append((BOUNDARY if a in set(doc_starts.tolist()) else "") + tokenizer.decode(tokens[a:b]))
    text = "".join(parts)
    return text if len(text) <= chars else text[:chars] + f" ... [{len(text) - chars} more characters]"


def inspect_store(path: str | Path, samples: int = 3, chars: int = 600, tokenizer_path: str | None = None) -> dict[str, Any]:
    store = TokenStore(path)
    m = store.manifest
    total_tokens = max(1, m.total_tokens)
    rows = [[name, f"{s.documents:,}", f"{s.pairs:,}", f"{s.tokens:,}", f"{100 * s.tokens / total_tokens:.1f}%",
             f"{s.windows:,}"] for name, s in sorted(m.languages.items(), key=lambda kv: -kv[1].tokens)]
    lines = [f"store {path}: {m.total_windows:,} windows of {m.window} tokens, {m.total_documents:,} documents, "
             f"{m.total_tokens:,} tokens, {len(m.shards)} shard(s), padding {100 * m.padding_fraction:.2f}%",
             f"tokenizer {m.tokenizer.path} (sha256 {m.tokenizer.sha256[:12]}, vocabulary {m.tokenizer.vocab_size})",
             "", _table(rows, ["language", "documents", "pairs", "tokens", "share", "windows"]), ""]
    skips = [[reason, f"{n:,}"] for reason, n in m.skips.items() if n]
    lines += [_table(skips, ["skipped because", "files/documents"]) if skips else "nothing skipped", ""]
    shown = []
    if samples and len(store):
        from data_pipeline.tokenizer import load_tokenizer

        tok = load_tokenizer(tokenizer_path or m.tokenizer.path)
        order = np.random.default_rng(0).permutation(len(store))[:1000].tolist()
        starts_inside = [i for i in order if len(store[i].doc_starts) > 0]  # show boundaries where there are some
        picked = (starts_inside + [i for i in order if i not in set(starts_inside)])[:samples]
        for i in sorted(picked):
            s = store[i]
            text = decode_sample(tok, s.tokens, s.doc_starts, s.num_tokens, chars)
            shown.append({"window": i, "language": LANGUAGES[s.language].name, "doc_starts": s.doc_starts.tolist(),
                          "num_tokens": s.num_tokens, "text": text})
            lines += [f"--- window {i} ({LANGUAGES[s.language].name}, {s.num_tokens} tokens, documents start at "
                      f"{s.doc_starts.tolist()}; {BOUNDARY.strip()} marks a start) ---", text, ""]
    plain = manifest_to_json(m)
    data = {k: plain[k] for k in ("total_windows", "total_documents", "total_tokens", "padding_fraction", "languages",
                                  "skips")}
    data["samples"] = shown
    return {"text": "\n".join(lines), "data": data}
