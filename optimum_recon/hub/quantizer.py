"""Loading compact sparse checkpoints with a plain ``AutoModelForCausalLM.from_pretrained(folder)``.

transformers' extension point for checkpoint formats is its quantizer registry: a checkpoint whose config.json holds
``quantization_config = {"quant_method": QUANT_METHOD, ...}`` is loaded by the quantizer registered under that
name. Ours registers when `optimum_recon` is imported. It declares the tensors a compact weight is saved as
(`sparse_format.py`), and one load operation that hands the loader each weight decoded into the dense weight: decoded
ahead of the loader, two at a time, from the time the model skeleton is built (`decode_ahead.py`), so that loading
holds at most three decoded weights beyond those the model has taken. After loading, the
quantization config is removed (``dequantize=True``): the model in memory is an ordinary dense model with zeros, and
its own `save_pretrained` writes a dense checkpoint.

Without optimum-recon imported, transformers does not know the method and, because the compact tensors do not have
the dense weights' shapes, stops with a size mismatch: an error, never a model with random weights. The only words of
ours it prints are the method's name, in its first line ("Unknown quantization type, got <name> - supported types
are: ..."), before a report of every mismatched weight; so the name is the instruction: ``optimum-recon (pip install
optimum-recon, then import optimum_recon)``. Checkpoints written before it was (``optimum_recon``) still load.
"""

from __future__ import annotations

from typing import Any

import torch

from .decode_ahead import DecodeAhead
from .packed import PackedLinear, is_packed_loading, keep_packed, pack_linear_layers
from .sparse_format import (
    FORMAT_VERSION,
    MASK_SUFFIX,
    META_SUFFIX,
    QUANT_METHOD,
    QUANT_METHODS,
    SparseFormatError,
    decode_stored,
)


def _bases():
    from transformers.core_model_loading import ConversionOps
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    return ConversionOps, HfQuantizer, QuantizationConfigMixin


ConversionOps, HfQuantizer, QuantizationConfigMixin = _bases()


class SparseCheckpointConfig(QuantizationConfigMixin):
    """``quantization_config`` of a compact sparse checkpoint: the format, its version and the sparsity pattern."""

    def __init__(self, sparse_format: str = "bitmask", format_version: int = FORMAT_VERSION,
                 pattern: str = "unstructured", dequantize: bool = True, **kwargs: Any):
        self.quant_method = QUANT_METHOD
        self.sparse_format = sparse_format
        self.format_version = int(format_version)
        self.pattern = pattern
        self.dequantize = True  # always expanded to dense weights on load
        if self.format_version > FORMAT_VERSION:
            raise SparseFormatError(
                f"this checkpoint was written in optimum-recon's sparse format version {self.format_version}; the "
                f"installed optimum-recon reads version {FORMAT_VERSION} and older. Upgrade: pip install -U "
                "optimum-recon (or ask for `optimum-recon decompress` output from whoever wrote it).")
        if sparse_format != "bitmask":
            raise SparseFormatError(f"unknown sparse format {sparse_format!r} in this checkpoint's config.json; this "
                                    "optimum-recon writes and reads 'bitmask'. Upgrade: pip install -U optimum-recon.")

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD, "sparse_format": self.sparse_format,
                "format_version": self.format_version, "pattern": self.pattern}


def _stored(input_dict: dict[str, Any]) -> tuple[Any, Any, Any]:
    """The values, mask and record of one weight as the loader hands them over (each may come as a one-item list;
    mask and record are None for a weight stored dense)."""

    def first(key):
        value = input_dict.get(key)
        return value[0] if isinstance(value, list) else value

    return first("weight"), first("weight" + MASK_SUFFIX), first("weight" + META_SUFFIX)


class SparseDecompress(ConversionOps):
    """The load operation: {"weight": values, "weight_sparse_mask": ..., "weight_sparse_meta": ...} -> the dense
    weight in the model parameter's dtype; a weight stored dense (no mask beside it) passes through."""

    def __init__(self, hf_quantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], source_patterns=None, target_patterns=None,
                full_layer_name: str | None = None, model=None, **kwargs) -> dict[str, torch.Tensor]:
        name = full_layer_name or "weight"
        values, mask, meta = _stored(input_dict)
        ahead = getattr(self.hf_quantizer, "ahead", None)
        weight = ahead.take(name, meta) if ahead is not None and mask is not None and meta is not None else None
        if weight is None:
            weight = decode_stored(name, values, mask, meta)
        dtype = None
        if model is not None and full_layer_name is not None:
            try:
                dtype = model.get_parameter(full_layer_name).dtype
            except AttributeError:
                dtype = None
        return {name: weight if dtype is None else weight.to(dtype)}


class SparseKeepPacked(SparseDecompress):
    """The load operation inside `packed_loading` (`packed.py`): a weight of a `PackedLinear` is checked and kept as
    stored; any other weight is expanded as `SparseDecompress` does."""

    def convert(self, input_dict: dict[str, Any], source_patterns=None, target_patterns=None,
                full_layer_name: str | None = None, model=None, **kwargs) -> dict[str, torch.Tensor]:
        path, _, leaf = (full_layer_name or "").rpartition(".")
        module = model.get_submodule(path) if model is not None and path else None
        if not isinstance(module, PackedLinear) or leaf != "weight":
            return super().convert(input_dict, source_patterns, target_patterns, full_layer_name, model, **kwargs)
        return keep_packed(full_layer_name, *_stored(input_dict))

    @property
    def reverse_op(self):
        """Saving: the packed tensors are already what the file stores."""
        from transformers.core_model_loading import _IdentityOp

        return _IdentityOp()


class SparseCheckpointQuantizer(HfQuantizer):
    """Reads compact sparse checkpoints (see the module docstring); it quantizes nothing."""

    requires_calibration = True  # only pre-compressed checkpoints: it cannot compress a model while loading
    serialized_names = {"weight": ["weight", "weight" + MASK_SUFFIX, "weight" + META_SUFFIX]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        # inside `packed_loading`: keep the linear weights packed, and the quantization config on the model
        self.packed = is_packed_loading()
        if self.packed:
            quantization_config.dequantize = False
        self.ahead: DecodeAhead | None = None  # (set while weights load: `decode_ahead.py`)

    def get_load_operations(self) -> dict:
        return {"dequantize": SparseDecompress, "deserialize": SparseKeepPacked}

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.packed:
            pack_linear_layers(model, checkpoint_files or [])
        else:
            self._stop_decoding_ahead()
            self.ahead = DecodeAhead(checkpoint_files or [])
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        self._stop_decoding_ahead()
        return model

    def _stop_decoding_ahead(self) -> None:
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead.close()

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    def is_serializable(self, safe_serialization=None) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return not self.packed  # (packed weights are expanded anew at every forward pass: nothing to train)


def register() -> bool:
    """Register the config and the quantizer with transformers (once; importing optimum_recon does it)."""
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, register_quantization_config, register_quantizer

    for name in QUANT_METHODS:
        if name not in AUTO_QUANTIZER_MAPPING:
            register_quantization_config(name)(SparseCheckpointConfig)
            register_quantizer(name)(SparseCheckpointQuantizer)
    return True


# Importing this module imports transformers' quantizer registry; when it is imported before `optimum_recon` has
# registered (``from optimum_recon.hub.quantizer import ...`` first), the import hook of `sparse_loading.py` finds
# it half-initialized and leaves the registration to this line.
register()
