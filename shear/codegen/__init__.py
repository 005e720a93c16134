"""Zeros -> a smaller dense module, proven equal: module-tree slicing, the graph-module fallback,
verification, the transformers config rewrite."""
