"""Refactors change no number: prunes of tiny models give the very weights, masks and errors recorded before.

`golden_prunes.json` holds a SHA-256 of every pruned model's weights and of its report's errors, for a few recipes
that cover the mask methods, N:M, LR/BR/CR, local and global propagation and held-out windows. They were recorded
with the torch version named in the file, one CPU thread; elsewhere the test is skipped (other kernels round
differently). After a change that is *meant* to change numbers, record them again with
`python tests/test_golden.py --write` and say why in the commit. Each record names the kind of CPU it was made on
(vector ISA, AMX): another kind rounds differently, and the test skips where no record of its kind exists.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import QUIET, VOCAB, make_tiny_model  # noqa: E402

from optimum_recon import CalibrationSet, PruningConfig, prune_model  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "golden_prunes.json"

# The recipes recorded before the guard, lr="auto" and the relative loss (their defaults then: lr 2e-4, unguarded,
# MSE), and the defaults now but for train_dtype: "auto" trains in bfloat16 on CPUs with AMX and in float32 on
# others, and bfloat16 kernels round differently from one CPU generation to the next.
# All were recorded before allocation="auto" (OWL for unstructured sparsity) became the default: they keep "uniform".
_BEFORE = dict(lr=2e-4, guard=False, loss="mse", train_dtype="float32", allocation="uniform")
RECIPES = {
    "llama-sparsegpt-LR": ("llama", dict(method="sparsegpt", reconstruction="layer", allocation="uniform")),
    "llama-wanda-2:4-BR": ("llama", dict(method="wanda", pattern="2:4", reconstruction="block", epochs=2,
                                         batch_size=4, **_BEFORE)),
    "gpt2-magnitude-CR-local": ("gpt2", dict(method="magnitude", reconstruction="cross_block", propagation="local",
                                             epochs=1, batch_size=4, sparsity=0.6, **_BEFORE)),
    "opt-sparsegpt-4:8-BR-lora": ("opt", dict(method="sparsegpt", pattern="4:8", reconstruction="block", epochs=1,
                                              batch_size=4, lora_rank=4, **_BEFORE)),
    "llama-sparsegpt-BR-guarded-auto": ("llama", dict(method="sparsegpt", epochs=3, batch_size=4,
                                                       train_dtype="float32", allocation="uniform")),
    "gpt2-wanda-CR-guarded-auto": ("gpt2", dict(method="wanda", reconstruction="cross_block", epochs=2,
                                                batch_size=4, train_dtype="float32", allocation="uniform")),
}


def prune_digests() -> dict[str, str]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digests = {}
        for name, (arch, settings) in RECIPES.items():
            model = make_tiny_model(arch)
            generator = torch.Generator().manual_seed(3)
            ids = torch.randint(0, VOCAB, (8, 16), generator=generator)
            heldout = torch.randint(0, VOCAB, (4, 16), generator=generator)
            report = prune_model(model, PruningConfig(**settings), CalibrationSet(ids, heldout=heldout), QUIET)
            digest = hashlib.sha256()
            for key, tensor in sorted(model.state_dict().items()):
                digest.update(key.encode())
                digest.update(tensor.detach().contiguous().numpy().tobytes())
            for block in report.blocks:
                digest.update(repr((block.error, block.error_before, block.heldout_error, block.error_local,
                                    [layer.sparsity for layer in block.layers])).encode())
            digests[name] = digest.hexdigest()
        return digests
    finally:
        torch.set_num_threads(threads)


def cpu_signature() -> str:
    """What decides how this CPU's float kernels round: the vector ISA torch dispatches to, and AMX."""
    amx = getattr(torch.cpu, "get_capabilities", lambda: {})().get("amx_tile", False)
    return torch.backends.cpu.get_cpu_capability() + ("+AMX" if amx else "")


def test_prunes_match_the_recorded_ones():
    records = json.loads(GOLDEN.read_text())["records"]
    here = [r for r in records if r["torch"] == torch.__version__ and r["machine"] == platform.machine()]
    if not here:
        pytest.skip(f"recorded with torch {', '.join(r['torch'] for r in records)}; this is torch "
                    f"{torch.__version__} on {platform.machine()}")
    digests = prune_digests()
    if any(digests == r["digests"] for r in here):
        return
    cpu = cpu_signature()
    # a record from a CPU that was not written down (before the signature was kept) may or may not be this kind
    assert not any(r.get("cpu") == cpu for r in here), "the prunes differ from those recorded on this kind of CPU"
    pytest.skip(f"no record for this kind of CPU ({cpu}): its kernels round differently; "
                "`python tests/test_golden.py --write` adds one")


if __name__ == "__main__":
    if "--write" in sys.argv:  # replaces the record of this torch, machine and CPU, keeps the others
        record = {"torch": torch.__version__, "machine": platform.machine(), "cpu": cpu_signature(),
                  "digests": prune_digests()}
        records = [r for r in json.loads(GOLDEN.read_text())["records"]
                   if (r["torch"], r["machine"], r.get("cpu")) != (record["torch"], record["machine"], record["cpu"])]
        GOLDEN.write_text(json.dumps({"records": records + [record]}, indent=2) + "\n")
        print(f"wrote {GOLDEN}")
