"""Evaluation: MT-Bench with an LLM judge (FastChat-compatible), lm-evaluation-harness, perplexity."""
