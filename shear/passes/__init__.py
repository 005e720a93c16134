"""shear.passes."""
