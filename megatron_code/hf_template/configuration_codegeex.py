"""CodeGeeX-shaped decoder configuration for Hugging Face ``transformers`` (``trust_remote_code``).

Written by ``codegeex model convert --to hf``; plain ``transformers``, no import of the training project, so the
exported directory loads on any machine."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig


class CodeGeeXConfig(PretrainedConfig):
    """Pre-LayerNorm layers, learned absolute positions, FastGELU MLP, a top-query layer, output tied to the input
    embedding.

    vocab_size: rows of the word embedding (and logits); the tokenizer's vocabulary padded, unless
    ``vocab_trimmed``, in which case it is the tokenizer's size. tokenizer_vocab_size: the tokenizer's real size
    (0: unknown); ids from there to vocab_size are padding rows no tokenizer produces."""

    model_type = "codegeex"

    def __init__(self, vocab_size: int = 1024, hidden_size: int = 64, num_layers: int = 2,
                 num_attention_heads: int = 4, ffn_hidden_size: int = 256, max_position_embeddings: int = 256,
                 layernorm_epsilon: float = 1e-5, top_query_layer: bool = True, tokenizer_vocab_size: int = 0,
                 vocab_trimmed: bool = False, initializer_range: float = 0.02, **kwargs: Any) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_hidden_layers = num_layers + int(top_query_layer)
        self.num_attention_heads = num_attention_heads
        self.ffn_hidden_size = ffn_hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.layernorm_epsilon = layernorm_epsilon
        self.top_query_layer = top_query_layer
        self.tokenizer_vocab_size = tokenizer_vocab_size
        self.vocab_trimmed = vocab_trimmed
        self.initializer_range = initializer_range
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(**kwargs)
