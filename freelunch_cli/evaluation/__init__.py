"""Measuring models: streamed perplexity, zero-shot accuracy with lm-eval, tables across runs and their plots."""
