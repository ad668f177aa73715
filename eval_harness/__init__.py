"""Evaluation: HumanEval-X and MBPP generation, sandboxed execution, pass@k and reports."""
