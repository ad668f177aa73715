"""Launching jobs: the `codegeex` command line, typed configuration, and (later) local, multi-node and SLURM launchers."""
