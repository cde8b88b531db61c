"""Pruning math on plain tensors: criteria (scores), mask patterns, SparseGPT, OWL budgets and input statistics.
Nothing here reads or writes a work directory."""
