"""The CodeGeeX model and its Megatron-style trainer."""
