"""Make ``AutoModelForCausalLM.from_pretrained`` read compact sparse checkpoints once `optimum_recon` is imported.

The reader is a transformers quantizer (`hub/quantizer.py`). Registering it needs `transformers.quantizers.auto`,
which takes seconds to import (it imports torch), while importing optimum_recon takes milliseconds. So the
registration waits for transformers: done at once when that module is already imported, else right after Python
imports it (which every ``from_pretrained`` does), through an import hook that removes itself once used.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.quantizers.auto"


def _register() -> None:
    quantizer = sys.modules.get(__package__ + ".hub.quantizer")
    if quantizer is not None and not hasattr(quantizer, "register"):
        return  # hub/quantizer.py itself is importing transformers' registry (imported first): it registers at its end
    from .hub.quantizer import register

    register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of ``_TARGET`` so that registration follows its import."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TARGET:
            return None
        sys.meta_path.remove(self)  # one use; and the real finder must not find us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_and_register
        return spec


def install() -> None:
    """Register now if transformers' quantizer registry is imported, else when it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
