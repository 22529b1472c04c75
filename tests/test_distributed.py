"""Data parallelism with `torchrun --nproc_per_node=2` and Gloo on CPU, against a single-process run.

Both runs go through `torchrun` (the reference with one process) with one thread per process, so that every
forward pass is computed the same way; the reference sets ``OPTIMUM_RECON_EXACT_STATISTICS=1`` to sum mask
statistics in float64 like a distributed run does. Then:

* masks are identical, and so are LR's weights (each batch is run whole by one rank and the statistics are
  order-independent sums);
* trained weights (BR, CR) agree within 1e-5 (absolute and relative): a training batch's windows are split
  over ranks and its gradient is summed in another order;
* reports and perplexities agree to 1e-5 relative; all ranks end with the same weights;
* only rank 0 writes the saved folder; a mismatched configuration fails on every rank, and a stalled rank
  makes the others fail after the process-group timeout instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from optimum_recon.testing import save_tiny_model, save_tiny_text

WORKER = Path(__file__).with_name("distributed_worker.py")
RECIPES = ("sparsegpt-lr", "sparsegpt-br-gp", "wanda-cr-local", "sparsegpt-br-self", "wanda-lr-owl")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


def _torchrun(nproc: int, args: list[str], env: dict[str, str] | None = None, timeout: float = 600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    model = save_tiny_model(root / "model", num_hidden_layers=3)
    text = save_tiny_text(root / "text.txt")
    results = {}
    for nproc in (1, 2):
        out = root / f"world{nproc}"
        out.mkdir()
        env = {"OPTIMUM_RECON_CACHE": str(root / f"cache{nproc}")}  # generate again: no shared cache
        if nproc == 1:
            env["OPTIMUM_RECON_EXACT_STATISTICS"] = "1"
        done = _torchrun(nproc, [str(model), str(text), str(out)], env)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
        results[nproc] = out
    return root, model, text, results


def _load(folder: Path, recipe: str, rank: int) -> dict:
    return torch.load(folder / f"{recipe}-rank{rank}.pt", weights_only=False)


@pytest.mark.parametrize("recipe", RECIPES)
def test_two_processes_match_one(runs, recipe):
    _, _, _, results = runs
    single = _load(results[1], recipe, 0)
    ranks = [_load(results[2], recipe, r) for r in (0, 1)]
    assert single["world"] == 1 and ranks[0]["world"] == 2
    # every rank holds the same model, bit for bit
    for name, value in ranks[0]["weights"].items():
        assert torch.equal(value, ranks[1]["weights"][name]), name
    trained = single["report"]["config"]["reconstruction"] != "layer"
    for name, expected in single["weights"].items():
        got = ranks[0]["weights"][name]
        assert torch.equal(got == 0, expected == 0), f"{recipe}: the mask of {name} differs"
        if trained:
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=f"{recipe}: {name}")
        else:
            assert torch.equal(got, expected), f"{recipe}: {name} differs"
    for a, b in zip(single["report"]["blocks"], ranks[0]["report"]["blocks"]):
        for key in ("error", "error_normalized", "heldout_error", "error_before", "sparsity"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), (recipe, a["index"], key)
    assert single["report"]["model_sparsity"] == pytest.approx(ranks[0]["report"]["model_sparsity"], abs=0)
    # the same allocation of the sparsity over the blocks (OWL: from statistics summed over the ranks)
    assert single["report"]["allocation"]["block_sparsity"] == ranks[0]["report"]["allocation"]["block_sparsity"]
    assert single["perplexity"] == pytest.approx(ranks[0]["perplexity"], rel=1e-5)


def test_self_generated_samples_split_over_ranks(runs):
    """Each rank generated half of the batches; the gathered samples equal the single-process ones."""
    _, _, _, results = runs
    single, double = _load(results[1], "sparsegpt-br-self", 0), _load(results[2], "sparsegpt-br-self", 0)
    assert single["report"]["calibration"]["self_generated"] == 6
    assert single["report"]["calibration"] == double["report"]["calibration"]
    import datasets

    caches = [sorted((results[n].parent / f"cache{n}" / "self-calibration").iterdir()) for n in (1, 2)]
    assert len(caches[0]) == len(caches[1]) == 1  # written once (by rank 0); held-out windows come from the text
    for a, b in zip(*caches):
        assert a.name == b.name
        assert datasets.load_from_disk(str(a))["input_ids"] == datasets.load_from_disk(str(b))["input_ids"]


def test_only_rank_zero_writes(runs):
    _, _, _, results = runs
    out = results[2]
    saved = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert saved == sorted(f"saved-{r}" for r in RECIPES)  # one folder per recipe, not one per rank
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(out / "saved-sparsegpt-lr")
    expected = _load(out, "sparsegpt-lr", 0)["weights"]
    for name, value in reloaded.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert (out / "saved-sparsegpt-lr" / "pruning_report.json").is_file()


def test_mismatched_configuration_fails_on_every_rank(runs, tmp_path):
    _, model, text, _ = runs
    done = _torchrun(2, [str(model), str(text), str(tmp_path), "--recipes", "sparsegpt-lr", "--fail", "mismatch"],
                     {"OPTIMUM_RECON_DIST_TIMEOUT": "60"}, timeout=300)
    assert done.returncode != 0
    log = done.stdout + done.stderr
    assert log.count("DistributedMismatchError") >= 2, log[-4000:]  # raised on both ranks
    assert "recipe" in log and not list(tmp_path.iterdir())


def test_a_stalled_rank_times_out_instead_of_hanging(runs, tmp_path):
    _, model, text, _ = runs
    start = time.monotonic()
    done = _torchrun(2, [str(model), str(text), str(tmp_path), "--recipes", "sparsegpt-lr", "--fail", "stall"],
                     {"OPTIMUM_RECON_DIST_TIMEOUT": "15"}, timeout=300)
    elapsed = time.monotonic() - start
    assert done.returncode != 0
    assert elapsed < 200, f"took {elapsed:.0f} s"  # rank 1 sleeps 600 s: the timeout ended the run
    log = done.stdout + done.stderr
    assert "DistributedPeerError: rank 0 of 2" in log and "OPTIMUM_RECON_DIST_TIMEOUT" in log, log[-4000:]


def test_cli_under_torchrun(runs, tmp_path):
    """`torchrun -m optimum_recon.cli prune ...`: one saved folder, the summary printed once (by rank 0)."""
    _, model, text, _ = runs
    out = tmp_path / "pruned"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
               "optimum_recon.cli", "prune", "--model", str(model), "--calibration", str(text), "--num-samples", "8",
               "--seq-len", "16", "--batch-size", "4", "--reconstruction", "block", "--epochs", "1", "--no-progress",
               "--output", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert done.stdout.count("saved to") == 1, done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]
    assert (out / "model.safetensors").is_file() and (out / "pruning_report.json").is_file()


def test_interrupted_distributed_run_resumes_to_the_same_model(runs, tmp_path):
    """Both ranks stop entering block 2; the same command with the same checkpoint folder finishes from there
    and gives exactly the model of the uninterrupted 2-process run."""
    _, model, text, results = runs
    checkpoint = tmp_path / "checkpoint"
    args = [str(model), str(text), str(tmp_path), "--recipes", "sparsegpt-br-gp", "--checkpoint-dir", str(checkpoint)]
    crashed = _torchrun(2, [*args, "--crash-at-block", "2"], timeout=300)
    assert crashed.returncode != 0 and "injected crash" in crashed.stdout + crashed.stderr
    assert sorted(p.name for p in checkpoint.iterdir()) == [".optimum-recon.json", "rank0-of-2", "rank1-of-2"]
    resumed = _torchrun(2, args, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-5000:]
    assert "resuming from" in resumed.stderr
    straight = _load(results[2], "sparsegpt-br-gp", 0)
    again = _load(tmp_path, "sparsegpt-br-gp", 0)
    for name, value in straight["weights"].items():
        assert torch.equal(again["weights"][name], value), name
    assert [b["error"] for b in again["report"]["blocks"]] == [b["error"] for b in straight["report"]["blocks"]]
