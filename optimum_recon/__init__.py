"""optimum-recon: prune large language models and reconstruct them block by block.

Importing this package is cheap: the public objects are loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .sparse_loading import install as _install_sparse_loading
from .version import __version__

_install_sparse_loading()  # compact sparse checkpoints load with AutoModelForCausalLM.from_pretrained

_LAZY = {
    "CalibrationConfig": ".calibration_config",
    "CalibrationSet": ".data.calibration_set",
    "ModelLoadError": ".modeling.loading",
    "OutputFolderError": ".folders",
    "PruningConfig": ".configuration",
    "PruningReport": ".report",
    "ReconPruner": ".pruner",
    "Runtime": ".engine.runtime",
    "evaluate_perplexity": ".evaluation",
    "packed_loading": ".hub.packed",
    "prune_model": ".engine.sequential",
}

__all__ = [
    "CalibrationConfig",
    "CalibrationSet",
    "ModelLoadError",
    "OutputFolderError",
    "PruningConfig",
    "PruningReport",
    "ReconPruner",
    "Runtime",
    "__version__",
    "evaluate_perplexity",
    "packed_loading",
    "prune_model",
]

if TYPE_CHECKING:  # pragma: no cover
    from .calibration_config import CalibrationConfig
    from .configuration import PruningConfig
    from .data.calibration_set import CalibrationSet
    from .engine.runtime import Runtime
    from .engine.sequential import prune_model
    from .evaluation import evaluate_perplexity
    from .folders import OutputFolderError
    from .hub.packed import packed_loading
    from .modeling.loading import ModelLoadError
    from .pruner import ReconPruner
    from .report import PruningReport


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'optimum_recon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
