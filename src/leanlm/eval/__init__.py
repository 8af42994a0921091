"""Evaluation: perplexity / loss on held-out text (and, later, tasks and comparisons)."""
