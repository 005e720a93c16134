"""shear.graph."""
