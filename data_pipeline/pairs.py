"""Text-to-code pairs as token sequences, with the modality of every token (PanGu-Coder's layouts).

    docstring_first (PanGu-Coder):  TAG [descr] docstring [python] signature body [eoc] EOD
    signature_first (PyCodeGPT):    TAG [sos] signature [descr] docstring [python] body [eoc] EOD

Modality flags per token (:mod:`data_pipeline.packing`): the tag and the markers before the code are TEXT|PREFIX,
the docstring TEXT|PREFIX|CORRUPTIBLE, a signature placed before the docstring PREFIX (code, but inside the
prefix), and the code, ``[eoc]`` and EOD 0. Every pair is its own document, so packing resets attention and
positions after its ``[eoc]`` EOD. The same layout makes prompts at evaluation time (:func:`pair_prompt`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from data_pipeline.languages import Language
from data_pipeline.packing import MODALITY_CODE, MODALITY_DOCSTRING, MODALITY_MARKUP, MODALITY_SIGNATURE
from data_pipeline.whitespace import normalize_split

if TYPE_CHECKING:
    from data_pipeline.documents import Document
    from data_pipeline.extract import ExtractConfig
    from data_pipeline.tokenizer import TextTokenizer


def split_code(signature: str, body: str, normalize_whitespace: bool) -> tuple[str, str]:
    """Signature and body as they are encoded: normalised together (the body's indentation continues the
    signature's), then cut where the normalised signature ends."""
    if not normalize_whitespace:
        return signature, body
    return normalize_split(signature + body, len(signature))


def _layout(tok: TextTokenizer, language: Language, docstring: str, signature: str, body: str,
            order: str) -> list[tuple[list[int], int]]:
    """(token ids, modality) runs in order; ``body`` is empty for a prompt."""
    tag = list(tok.tag_ids(language))
    doc = [tok.piece_id("[descr]")], tok.encode(docstring.rstrip("\n") + "\n")
    marker = [tok.piece_id(language.code_marker)]
    if order == "signature_first":
        return [(tag + [tok.piece_id("[sos]")], MODALITY_MARKUP), (tok.encode(signature), MODALITY_SIGNATURE),
                (doc[0], MODALITY_MARKUP), (doc[1], MODALITY_DOCSTRING), (marker, MODALITY_MARKUP),
                (tok.encode(body), MODALITY_CODE)]
    if order != "docstring_first":
        raise ValueError(f"pair_order {order!r} is not docstring_first or signature_first")
    return [(tag + doc[0], MODALITY_MARKUP), (doc[1], MODALITY_DOCSTRING), (marker, MODALITY_MARKUP),
            (tok.encode(signature), MODALITY_CODE), (tok.encode(body), MODALITY_CODE)]


def _join(runs: list[tuple[list[int], int]], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([i for run, _ in runs for i in run], dtype=dtype)
    modality = np.array([m for run, m in runs for _ in run], dtype=np.uint8)
    return ids, modality


def pair_tokens(tok: TextTokenizer, d: Document, cfg: ExtractConfig) -> tuple[np.ndarray, np.ndarray]:
    """A pair document's token ids (ending ``[eoc]`` EOD) and their modality."""
    assert d.pair is not None
    signature, body = split_code(d.pair.signature, d.pair.body, cfg.normalize_whitespace)
    runs = _layout(tok, d.language, d.pair.docstring, signature, body, cfg.pair_order)
    runs.append(([tok.piece_id("[eoc]"), tok.eod_id], MODALITY_CODE))
    return _join(runs, tok.token_dtype)


def pair_prompt(tok: TextTokenizer, language: Language, docstring: str, signature: str, code_prefix: str = "",
                order: str = "docstring_first", normalize_whitespace: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The prompt a modality-relative model continues: the layout up to the signature (docstring_first) or the code
    marker (signature_first), plus ``code_prefix`` (the first lines of a solution, for incremental pass@k)."""
    signature, body = split_code(signature, code_prefix, normalize_whitespace)
    return _join(_layout(tok, language, docstring, signature, body, order), tok.token_dtype)
