"""Optional dependencies of the model layer: import one, or fail naming the extra that installs it.

``compass_kernels`` needs torch alone; ``compass_model`` adds its packages as extras of the
``compass-kernels`` distribution (``[model]``, ``[train]``, ``[plots]``, ``[hf]``, see pyproject.toml).
"""

from __future__ import annotations

import importlib
import importlib.util


def missing_message(package: str, extra: str, purpose: str) -> str:
    """The one-line error for a missing optional package."""
    return (f"{purpose} needs the '{package}' package, which is not installed: "
            f"pip install 'compass-kernels[{extra}]' (or pip install {package})")


def require(module: str, extra: str, purpose: str, package: str | None = None):
    """Import ``module`` and return it; an ImportError naming ``extra`` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(missing_message(package or module.split(".")[0], extra, purpose)) from e


def check_installed(module: str, extra: str, purpose: str, package: str | None = None) -> None:
    """Raise the same ImportError as ``require`` without importing ``module``."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(missing_message(package or module, extra, purpose))
