"""shear.runtime."""
