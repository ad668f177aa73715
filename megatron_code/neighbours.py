"""``codegeex model neighbours``: nearest neighbours of tokens in the docstring and the code embedding spaces of a
modality-separated checkpoint, and a t-SNE plot of them (PanGu-Coder's Figure 3).

The docstring space is the separated table (full separation), or the shared table with the separated rows
replaced (partial); the code space is the shared table, which the output layer uses. Similarity is cosine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from data_pipeline.tokenizer import TextTokenizer, load_tokenizer
from megatron_code.checkpoint import full_state, resolve_model_dir

log = logging.getLogger("codegeex.model")


def spaces(state: dict[str, Any], model: dict[str, Any]) -> dict[str, np.ndarray]:
    """{"docstring": (V, C), "code": (V, C)} float64 tables from a TP=1 state."""
    code = state["word_embeddings.weight"].float().numpy().astype(np.float64)
    sep = model.get("embedding_separation", "none")
    if sep == "full":
        doc = state["docstring_embeddings.table.weight"].float().numpy().astype(np.float64)
    elif sep == "partial":
        doc = code.copy()
        doc[model["separated_token_ids"]] = state["docstring_embeddings.rows"].float().numpy()
    else:
        raise ValueError("the checkpoint has no embedding separation (model.embedding_separation is none): docstring "
                         "and code tokens share one table")
    return {"docstring": doc, "code": code}


def token_id(tok: TextTokenizer, word: str) -> int:
    """The id of ``word`` as one token of ``tok`` (as it is, or after a space: the word-boundary form)."""
    for text in (word, " " + word):
        ids = tok.encode(text)
        if len(ids) == 1:
            return int(ids[0])
    raise ValueError(f"--tokens: {word!r} is not a single token of {tok.path}")


def nearest(unit: np.ndarray, i: int, k: int) -> list[tuple[int, float]]:
    """The ``k`` rows most similar to row ``i`` of a row-normalised table (cosine)."""
    sims = unit @ unit[i]
    sims[i] = -np.inf
    order = np.argsort(-sims)[:k]
    return [(int(j), float(sims[j])) for j in order]


def tsne(x: np.ndarray, perplexity: float = 10.0, steps: int = 600, seed: int = 0) -> np.ndarray:
    """Exact t-SNE (van der Maaten & Hinton) of a few hundred points: (N, C) -> (N, 2)."""
    n = len(x)
    d = np.square(x[:, None, :] - x[None, :, :]).sum(-1)  # (N, N)
    p = np.zeros((n, n))
    target = np.log(min(perplexity, n - 1))
    for i in range(n):  # binary search of each point's precision for the perplexity
        lo, hi, beta = 0.0, np.inf, 1.0
        for _ in range(60):
            row = np.exp(-(d[i] - d[i][np.arange(n) != i].min()) * beta)
            row[i] = 0.0
            row /= row.sum()
            entropy = -np.sum(row[row > 0] * np.log(row[row > 0]))
            if entropy > target:
                lo, beta = beta, beta * 2 if hi == np.inf else (beta + hi) / 2
            else:
                hi, beta = beta, (beta + lo) / 2
        p[i] = row
    p = np.maximum((p + p.T) / (2 * n), 1e-12)
    y = np.random.default_rng(seed).normal(scale=1e-4, size=(n, 2))
    velocity = np.zeros_like(y)
    for step in range(steps):
        exaggeration = 4.0 if step < 100 else 1.0
        diff = y[:, None, :] - y[None, :, :]  # (N, N, 2)
        q_num = 1.0 / (1.0 + np.square(diff).sum(-1))
        np.fill_diagonal(q_num, 0.0)
        q = np.maximum(q_num / q_num.sum(), 1e-12)
        grad = 4.0 * (((exaggeration * p - q) * q_num)[:, :, None] * diff).sum(1)  # (N, 2)
        velocity = (0.5 if step < 250 else 0.8) * velocity - 100.0 * grad
        y += velocity
    return y - y.mean(0)


def plot(points: dict[str, tuple[np.ndarray, list[str], list[int]]], queries: list[str], path: Path) -> None:
    """One panel per space: every neighbour labelled, coloured by the query it is a neighbour of."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(points), figsize=(8 * len(points), 7))
    colours = plt.get_cmap("tab10")
    for ax, (space, (xy, labels, groups)) in zip(np.atleast_1d(axes), points.items(), strict=True):
        for (x, y), label, g in zip(xy, labels, groups, strict=True):
            ax.scatter(x, y, color=colours(g % 10), s=12)
            ax.annotate(label, (x, y), fontsize=7, color=colours(g % 10))
        ax.set_title(f"{space} space: 20 nearest neighbours of {', '.join(queries)}")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label(piece: str) -> str:
    """A piece as printable text: the word-boundary mark (SentencePiece's U+2581, byte-level BPE's U+0120) as ``_``,
    tabs and newlines escaped."""
    return piece.replace("\u2581", "_").replace("\u0120", "_").replace("\t", "\\t").replace("\n", "\\n")


Neighbours = dict[str, dict[str, list[tuple[str, float]]]]  # space -> query word -> (piece, cosine), nearest first


def token_neighbours(checkpoint: str | Path, tokens: Sequence[str], k: int = 20, output: str | Path = "neighbours.png",
                     tokenizer: str | Path | None = None) -> Neighbours:
    """The ``k`` nearest neighbours of each word of ``tokens`` (each one token) in both spaces of a separated
    checkpoint (a model, step-N, checkpoints or run directory), logged and returned; the t-SNE plot goes to
    ``output``. ``tokenizer``: default, the one the checkpoint names."""
    ckpt = resolve_model_dir(checkpoint)
    manifest, state = full_state(ckpt)
    tok = load_tokenizer(manifest.tokenizer_path(tokenizer, ckpt))
    tables = {name: t[:tok.vocab_size] for name, t in spaces(state, manifest.model).items()}  # (V, C) each
    queries = list(tokens)
    ids = [token_id(tok, w) for w in queries]
    found: Neighbours = {}
    points = {}
    for space, table in tables.items():
        unit = table / np.maximum(np.linalg.norm(table, axis=1, keepdims=True), 1e-12)  # (V, C), once per space
        members, groups = [], []
        found[space] = {}
        for g, i in enumerate(ids):
            near = [(label(next(tok.pieces([j]))), s, j) for j, s in nearest(unit, i, k)]
            found[space][queries[g]] = [(piece, s) for piece, s, _ in near]
            log.info("%-9s %-10s %s", space, queries[g], "  ".join(f"{piece} {s:.2f}" for piece, s, _ in near[:10]))
            for j in [i] + [j for _, _, j in near]:
                members.append(j)
                groups.append(g)
        xy = tsne(table[members])  # (N, 2)
        points[space] = (xy, [label(next(tok.pieces([j]))) for j in members], groups)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(points, queries, out)
    log.info("t-SNE plot: %s", out)
    return found
