"""The export extra: safetensors, onnx and onnxruntime, imported only when a function
needs one, so that ``gaqat.export`` imports (and folds batch norm) without them."""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL = 'install the export extra: pip install "gaqat[export]"'


def require(module: str) -> ModuleType:
    """Import ``module``; RuntimeError naming the extra to install when it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise RuntimeError(f"export needs {module.split('.')[0]} ({error}); {INSTALL}") from error
