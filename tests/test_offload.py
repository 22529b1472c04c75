"""Pruning models dispatched by accelerate with CPU or disk offload gives exactly the in-memory result."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import QUIET, make_tiny_model
from transformers import AutoModelForCausalLM

from optimum_recon import CalibrationSet, PruningConfig, Runtime, prune_model

DISK_MAP = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk", "model.layers.2": "disk",
            "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "ckpt"
    make_tiny_model("llama").save_pretrained(path)
    return path


def _digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def _ids():
    return torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("reconstruction", ["layer", "block"])
def test_disk_offload_equals_in_memory(checkpoint, tmp_path, reconstruction):
    config = PruningConfig(method="sparsegpt", pattern="2:4", reconstruction=reconstruction, epochs=2, batch_size=4)
    before = _digest(checkpoint)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    ref_report = prune_model(reference, config, _ids(), QUIET)
    offloaded = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=DISK_MAP, offload_folder=tmp_path / "off",
                                                     dtype=torch.float32)
    assert offloaded.model.layers[1].self_attn.q_proj.weight.device.type == "meta"
    report = prune_model(offloaded, config, _ids(), QUIET)
    assert [b.error for b in report.blocks] == [b.error for b in ref_report.blocks]
    with torch.no_grad():  # later forwards and generate see the pruned weights
        assert torch.equal(offloaded(input_ids=_ids()).logits, reference(input_ids=_ids()).logits)
        gen = offloaded.generate(input_ids=_ids()[:2, :4], max_new_tokens=5, do_sample=False)
        assert torch.equal(gen, reference.generate(input_ids=_ids()[:2, :4], max_new_tokens=5, do_sample=False))
    offloaded.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32)
    state = reference.state_dict()
    assert all(torch.equal(t, state[n]) for n, t in reloaded.state_dict().items())
    assert _digest(checkpoint) == before  # the original checkpoint is never written to


def test_cpu_offload_equals_in_memory(tmp_path):
    from accelerate import cpu_offload

    config = PruningConfig(method="wanda", reconstruction="block", epochs=2, batch_size=4)
    reference, offloaded = make_tiny_model("llama"), make_tiny_model("llama")
    prune_model(reference, config, _ids(), QUIET)
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    assert offloaded.model.layers[0].mlp.up_proj.weight.device.type == "meta"
    prune_model(offloaded, config, _ids(), QUIET)
    with torch.no_grad():
        assert torch.equal(offloaded(input_ids=_ids()).logits, reference(input_ids=_ids()).logits)
    from optimum_recon.hub.save import save_pruned_model

    # cpu_offload sets no hf_device_map: the save must still fetch the weights from the weights map
    save_pruned_model(offloaded, None, config, None, tmp_path / "saved")
    assert not hasattr(offloaded, "hf_device_map")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", dtype=torch.float32).state_dict()
    assert all(torch.equal(t, reloaded[n]) for n, t in reference.state_dict().items())


def test_a_failed_block_keeps_its_offloaded_weights(checkpoint, tmp_path, monkeypatch):
    from optimum_recon.engine import sequential

    offloaded = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=DISK_MAP, offload_folder=tmp_path / "off",
                                                     dtype=torch.float32)
    with torch.no_grad():
        before = offloaded(input_ids=_ids()).logits
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # block 1 (offloaded) fails after its masks would be chosen
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    real = sequential.apply_masks
    monkeypatch.setattr(sequential, "apply_masks", failing)
    with pytest.raises(RuntimeError, match="simulated failure"):
        prune_model(offloaded, PruningConfig(reconstruction="layer"), _ids(), QUIET)
    q = offloaded.model.layers[1].self_attn.q_proj
    assert q.weight.device.type == "meta" and q._hf_hook.offload  # hooks restored
    stored = q._hf_hook.weights_map["weight"]
    assert float((stored == 0).float().mean()) < 0.01  # block 1 on disk is still dense
    with torch.no_grad():
        after = offloaded(input_ids=_ids()).logits
    assert not torch.equal(before, after)  # block 0 (on the CPU, finished) is pruned; the model still runs


def test_unwritable_offload_folder_is_reported_before_loading(checkpoint, tmp_path):
    from optimum_recon import ReconPruner

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="offload_folder=.* cannot be written to"):
        ReconPruner.from_pretrained(str(checkpoint), device_map=DISK_MAP, offload_folder=str(blocker / "off"))


def test_max_memory_too_small_for_one_block_names_the_minimum(checkpoint):
    from optimum_recon import ReconPruner

    # one tiny Llama block: q/o 32x32, k/v 32x16 (2 KV heads), 3 MLP 32x64, 2 norms = 9,280 fp32 weights = 36.25 KiB
    with pytest.raises(ValueError, match=r"each block needs at least 36.2 KiB .*float32"):
        ReconPruner.from_pretrained(str(checkpoint), max_memory={0: "10KB", "cpu": "1GB"}, dtype="float32")


def _interrupt_at_finalize(monkeypatch, block):
    from optimum_recon.engine import sequential

    real = sequential._Run.finalize

    def interrupt(self, s, device):
        if s == block:
            raise KeyboardInterrupt  # Ctrl-C while the block finishes
        return real(self, s, device)

    monkeypatch.setattr(sequential._Run, "finalize", interrupt)
    return real


def _untimed(reconstruction: dict) -> dict:
    """A block's training records without their wall times (which no two runs share)."""
    return {"windows": [{k: v for k, v in w.items() if k not in ("seconds", "guard_seconds")}
                        for w in reconstruction.get("windows", [])]}


@pytest.mark.parametrize("reconstruction, propagation, window", [
    ("layer", "global", 1), ("block", "local", 1), ("cross_block", "global", 2), ("cross_block", "local", 2),
    ("cross_block", "global", 3),
])
def test_interrupted_then_resumed_run_equals_the_straight_run(tmp_path, monkeypatch, reconstruction, propagation,
                                                              window):
    from optimum_recon.engine import sequential

    config = PruningConfig(method="sparsegpt", reconstruction=reconstruction, propagation=propagation, window=window,
                           epochs=2, batch_size=4, lora_rank=0)
    heldout = _ids().flip(0)[:4]
    straight = make_tiny_model("qwen2")
    expected = prune_model(straight, config, CalibrationSet(_ids(), heldout=heldout), QUIET)

    real = _interrupt_at_finalize(monkeypatch, 2)
    resumed = make_tiny_model("qwen2")
    with pytest.raises(KeyboardInterrupt):
        prune_model(resumed, config, CalibrationSet(_ids(), heldout=heldout),
                    Runtime(progress=False, checkpoint_dir=tmp_path / "ck"))
    if window > 1:  # blocks 2..window-1+1 were partly trained when the run stopped: the checkpoint holds them
        assert (tmp_path / "ck" / "window-2.pt").is_file()
    finished, trained = [], []
    monkeypatch.setattr(sequential._Run, "finalize", lambda self, s, d: finished.append(s) or real(self, s, d))
    real_train = sequential._Run.reconstruct
    monkeypatch.setattr(sequential._Run, "reconstruct",
                        lambda self, s, e, i, d: trained.append((s, e)) or real_train(self, s, e, i, d))
    earlier = json.loads((tmp_path / "ck" / "state.json").read_text())["seconds"]
    assert earlier > 0
    fresh = make_tiny_model("qwen2")  # a new process would start from the dense checkpoint again
    with pytest.warns(UserWarning, match="resuming from .*blocks 0-1 were finished by an earlier run"):
        report = prune_model(fresh, config, CalibrationSet(_ids(), heldout=heldout),
                             Runtime(progress=False, checkpoint_dir=tmp_path / "ck"))
    assert finished == [2, 3]  # blocks 0 and 1 were restored, not redone
    assert report.resumed_seconds == pytest.approx(earlier)
    assert report.total_seconds > earlier  # the report's time includes the interrupted call's
    assert expected.resumed_seconds == 0.0
    # the steps left, each trained once: window 2..min(2 + w - 1, 3), then the last block alone
    assert trained == ([] if reconstruction == "layer" else [(2, min(2 + window - 1, 3)), (3, 3)])
    for a, b in zip(fresh.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    for got, want in zip(report.blocks, expected.blocks):
        assert (got.error, got.heldout_error, got.error_before, got.heldout_error_before) == (
            want.error, want.heldout_error, want.error_before, want.heldout_error_before)
        assert _untimed(got.reconstruction) == _untimed(want.reconstruction) and got.layers == want.layers
    # what is left is the last checkpoint's files only: no step's activations pile up
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == sorted(
        [f"block-{j}.safetensors" for j in range(4)] + ["activations-4.pt", "state.json", ".optimum-recon.json"])
    with pytest.raises(ValueError, match="another recipe"):
        prune_model(make_tiny_model("qwen2"), PruningConfig(method="wanda"), _ids(),
                    Runtime(progress=False, checkpoint_dir=tmp_path / "ck"))


@pytest.mark.parametrize("reconstruction", ["block", "cross_block"])
def test_an_interruption_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, reconstruction):
    """Killed after a step's new files are written but before state.json points at them: the rerun continues
    from the previous step, with that step's activations, and still equals the straight run."""
    from optimum_recon.engine import checkpoint

    config = PruningConfig(method="wanda", reconstruction=reconstruction, epochs=1, batch_size=4)
    straight = make_tiny_model("llama")
    prune_model(straight, config, _ids(), QUIET)

    real_atomic = checkpoint._atomic
    states = []

    def crash_on_third_state(path, write, content=None):
        if path.name == checkpoint.STATE:
            states.append(path)
            if len(states) == 3:
                raise KeyboardInterrupt
        real_atomic(path, write, content)

    monkeypatch.setattr(checkpoint, "_atomic", crash_on_third_state)
    with pytest.raises(KeyboardInterrupt):
        prune_model(make_tiny_model("llama"), config, _ids(), Runtime(progress=False, checkpoint_dir=tmp_path / "ck"))
    monkeypatch.setattr(checkpoint, "_atomic", real_atomic)
    fresh = make_tiny_model("llama")
    prune_model(fresh, config, _ids(), Runtime(progress=False, checkpoint_dir=tmp_path / "ck"))
    for a, b in zip(fresh.parameters(), straight.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reconstruction, propagation", [("layer", "global"), ("block", "local"),
                                                         ("cross_block", "global")])
def test_activations_on_disk_give_the_same_result(tmp_path, reconstruction, propagation, monkeypatch):
    from optimum_recon.engine.activations import DiskTensorList

    written, live = [], []
    real = DiskTensorList.append

    def spy(self, tensor):
        real(self, tensor)
        written.append(1)
        live.append(len(list(self.folder.iterdir())))

    monkeypatch.setattr(DiskTensorList, "append", spy)
    config = PruningConfig(method="wanda", reconstruction=reconstruction, propagation=propagation, epochs=2,
                           batch_size=4)
    heldout = _ids().flip(0)[:4]
    in_memory, on_disk = make_tiny_model("gemma2", num_hidden_layers=6), make_tiny_model("gemma2", num_hidden_layers=6)
    a = prune_model(in_memory, config, CalibrationSet(_ids(), heldout=heldout), QUIET)
    b = prune_model(on_disk, config, CalibrationSet(_ids(), heldout=heldout),
                    Runtime(progress=False, activation_offload="disk", activation_folder=tmp_path / "acts"))
    for pa, pb in zip(in_memory.parameters(), on_disk.parameters()):
        assert torch.equal(pa, pb)
    assert [r.error for r in a.blocks] == [r.error for r in b.blocks]
    assert [r.heldout_error for r in a.blocks] == [r.heldout_error for r in b.blocks]
    assert list((tmp_path / "acts").iterdir()) == []  # the scratch files are gone
    assert written and max(live) < len(written) / 2  # batches really went to disk, and finished depths were freed


def test_activation_offload_bad_value():
    with pytest.raises(ValueError, match="activation_offload='ram'"):
        prune_model(make_tiny_model("llama"), PruningConfig(), _ids(),
                    Runtime(activation_offload="ram", progress=False))


def test_offloaded_save_writes_block_by_block(checkpoint, tmp_path, monkeypatch):
    import transformers.modeling_utils as modeling_utils

    from optimum_recon.hub.save import save_pruned_model

    config = PruningConfig(method="wanda")
    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    prune_model(reference, config, _ids(), QUIET)
    offloaded = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=DISK_MAP, offload_folder=tmp_path / "off",
                                                     dtype=torch.float32)
    prune_model(offloaded, config, _ids(), QUIET)

    shards, real_save = [], modeling_utils.safe_save_file

    def spy(tensors, filename, metadata=None):
        shards.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", spy)
    save_pruned_model(reference, None, config, None, tmp_path / "in_memory")
    assert len(shards) == 1
    shards.clear()
    save_pruned_model(offloaded, None, config, None, tmp_path / "offloaded")
    block = sum(p.numel() * 4 for p in reference.model.layers[0].parameters())
    largest_tensor = max(p.numel() * 4 for p in reference.parameters())
    assert len(shards) > 2 and max(shards) <= max(block, largest_tensor)  # never the whole model at once
    assert sum(shards) >= sum(p.numel() * 4 for p in reference.parameters()) - largest_tensor  # tied head once
    expected = AutoModelForCausalLM.from_pretrained(tmp_path / "in_memory", dtype=torch.float32).state_dict()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "offloaded", dtype=torch.float32).state_dict()
    assert expected.keys() == reloaded.keys()
    assert all(torch.equal(t, expected[n]) for n, t in reloaded.items())


def test_full_offload_disk_is_reported_and_leaves_the_weights_intact(checkpoint, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    reference = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    offloaded = AutoModelForCausalLM.from_pretrained(checkpoint, device_map=DISK_MAP, offload_folder=tmp_path / "off",
                                                     dtype=torch.float32)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 100, 100))
    with pytest.raises(OSError, match=r"needs .* free.*finished are intact"):
        prune_model(offloaded, PruningConfig(method="wanda", reconstruction="layer"), _ids(), QUIET)
    monkeypatch.undo()
    from transformers.integrations.accelerate import load_offloaded_parameter

    state = reference.state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"):
        # block 1 (on disk) failed to write back: its weights are still the original, unpruned ones
        assert torch.equal(load_offloaded_parameter(offloaded, name), state[name])
    # block 0 finished: pruned to its OWL share (the default allocation), within 2 x 0.08 of 50%
    assert 0.5 - 0.17 < float((offloaded.model.layers[0].mlp.down_proj.weight == 0).float().mean()) < 0.5 + 0.17
