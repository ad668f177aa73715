"""The bottom layer every stage shares: typed configuration, logging and progress, atomic file and JSONL I/O, the git
revision, the device table, and the contracts between stages (the store and checkpoint manifests).

It imports nothing from the four packages above it (``data_pipeline``, ``megatron_code``, ``eval_harness``,
``launch``); ``make lint`` checks that with import-linter.
"""
