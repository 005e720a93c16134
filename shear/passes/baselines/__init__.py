"""Baselines at equal budget: magnitude, Wanda, SparseGPT, Taylor (LLM-Pruner), random."""
