"""The training project's SentencePiece tokenizer for Hugging Face ``transformers`` (``trust_remote_code``).

Written by ``codegeex model convert --to hf`` beside ``tokenizer.model``; plain ``sentencepiece`` and
``transformers``, no import of the training project. Encoding gives the project's ids: SentencePiece as trained
(identity normalisation, no dummy prefix, byte fallback), with a literal U+2581 spelled by its byte pieces (as
SentencePiece shows spaces as U+2581) and special tokens' text
left to SentencePiece (``<|endoftext|>`` is its own symbol, a literal ``<unk>`` is text); no BOS or EOS is added. Decoding is SentencePiece's own, byte for byte."""

from __future__ import annotations

import os
import shutil
from typing import Any

import sentencepiece as spm
from transformers import PreTrainedTokenizer

META_SPACE = "\u2581"


class CodeGeeXTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file: str, eos_token: str = "<|endoftext|>", pad_token: str = "<pad>",
                 unk_token: str = "<unk>", **kwargs: Any) -> None:
        self.vocab_file = vocab_file
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self._meta_pieces = [f"<0x{b:02X}>" for b in META_SPACE.encode("utf-8")]
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        kwargs.setdefault("split_special_tokens", True)  # SentencePiece alone splits: "<unk>" in a text is text
        super().__init__(eos_token=eos_token, pad_token=pad_token, unk_token=unk_token, **kwargs)

    @property
    def vocab_size(self) -> int:
        return int(self.sp_model.get_piece_size())

    def get_vocab(self) -> dict[str, int]:
        return {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        pieces: list[str] = []
        for i, part in enumerate(text.split(META_SPACE)):
            if i:
                pieces.extend(self._meta_pieces)
            if part:
                pieces.extend(self.sp_model.encode(part, out_type=str))
        return pieces

    def _convert_token_to_id(self, token: str) -> int:
        return int(self.sp_model.piece_to_id(token))

    def _convert_id_to_token(self, index: int) -> str:
        return str(self.sp_model.id_to_piece(int(index)))

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return str(self.sp_model.decode([self._convert_token_to_id(t) for t in tokens]))

    def _decode(self, token_ids: Any, skip_special_tokens: bool = False, clean_up_tokenization_spaces: Any = None,
                **kwargs: Any) -> str:
        ids = [int(token_ids)] if isinstance(token_ids, int) else [int(i) for i in token_ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in set(self.all_special_ids)]
        return str(self.sp_model.decode(ids))

    def save_vocabulary(self, save_directory: str, filename_prefix: str | None = None) -> tuple[str]:
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(out) != os.path.abspath(self.vocab_file):
            shutil.copyfile(self.vocab_file, out)
        return (out,)
