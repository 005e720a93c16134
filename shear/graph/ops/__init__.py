"""Per-aten-op facts: the channel, alias and size rules of every op shear knows, in one table."""
