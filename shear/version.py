"""shear's version, in a module of its own: any layer may read it (checkpoint fingerprints record it)
without importing the package's top, which sits above every layer.

Example:
    >>> from shear.version import __version__
    >>> __version__ == __import__("shear").__version__
    True
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
