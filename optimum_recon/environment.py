"""`optimum-recon env`: what a bug report needs to know about this machine, as `transformers env` and
`accelerate env` print it (one `- name: value` line each, ready to paste into an issue)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

# Packages that change what optimum-recon does, in the order a reader looks for them.
_PACKAGES = ("torch", "transformers", "accelerate", "datasets", "huggingface_hub", "safetensors", "tokenizers",
             "peft", "lm_eval", "compressed-tensors", "numpy")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Versions, the accelerators and the CPU's threads, as name -> text."""
    import torch

    from .reconstruction.training import native_bf16
    from .version import __version__

    info = {"optimum-recon": __version__, "Python": sys.version.split()[0],
            "Platform": platform.platform(), "CPU": f"{platform.machine()}, {os.cpu_count()} logical cores, "
            f"{torch.get_num_threads()} torch threads, bfloat16 matmuls "
            f"{'native (AMX)' if native_bf16(torch.device('cpu')) else 'emulated'}"}
    info.update({name: _version(name) for name in _PACKAGES})
    info["torch"] += f" (CUDA {torch.version.cuda})" if torch.version.cuda else " (CPU build)"
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            info[f"GPU {index}"] = (f"{props.name}, {props.total_memory / 2**30:.1f} GiB, compute capability "
                                    f"{props.major}.{props.minor}, bfloat16 "
                                    f"{'native' if native_bf16(torch.device('cuda', index)) else 'emulated'}")
    else:
        info["GPU"] = "none visible (torch.cuda.is_available() is False)"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        info["MPS"] = "available"
    for name in ("CUDA_VISIBLE_DEVICES", "HF_HUB_OFFLINE", "OPTIMUM_RECON_DATA_DIR", "OMP_NUM_THREADS"):
        if os.environ.get(name) is not None:
            info[name] = os.environ[name]
    return info


def environment_report() -> str:
    lines = ["Copy and paste the text below into your GitHub issue, and FILL OUT the two last points.", ""]
    lines += [f"- {name}: {value}" for name, value in environment().items()]
    lines += ["- Using distributed or parallel set-up in script?: <fill in>", "- The command you ran: <fill in>"]
    return "\n".join(lines)
