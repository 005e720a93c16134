"""Passes every pipeline needs: discovery, erasure, LoRA adapters."""
