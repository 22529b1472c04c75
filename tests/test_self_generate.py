"""Self-generated calibration data: determinism, caching, mixing, and masks independent of it by default."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_model

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
from optimum_recon.data import self_generate
from optimum_recon.data.self_generate import generate_samples, load_or_generate


def _config(**kwargs):
    base = dict(source="self:6", seq_len=20, seed=0, self_batch_size=4)
    return CalibrationConfig(**{**base, **kwargs})


def test_same_seed_same_tokens(tiny_tokenizer):
    model = make_tiny_model("llama")
    a, texts = generate_samples(model, tiny_tokenizer, _config(), 6, progress=False)
    b, _ = generate_samples(model, tiny_tokenizer, _config(), 6, progress=False)
    c, _ = generate_samples(model, tiny_tokenizer, _config(seed=1), 6, progress=False)
    assert a.shape == (6, 20) and len(texts) == 6
    assert torch.equal(a, b) and not torch.equal(a, c)
    special = set(tiny_tokenizer.all_special_ids)
    assert not any(int(t) in special for t in a[:, 0])  # first tokens never special


def test_cache_is_hit_and_missed_when_a_setting_changes(tiny_tokenizer, tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    calls = []
    real = self_generate.generate_samples
    monkeypatch.setattr(self_generate, "generate_samples", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = load_or_generate(model, tiny_tokenizer, _config(), cache=tmp_path, progress=False)
    second = load_or_generate(model, tiny_tokenizer, _config(), cache=tmp_path, progress=False)
    assert len(calls) == 1 and first["input_ids"] == second["input_ids"]
    load_or_generate(model, tiny_tokenizer, _config(self_temperature=0.7), cache=tmp_path, progress=False)
    other = make_tiny_model("llama", seed=3)
    load_or_generate(other, tiny_tokenizer, _config(), cache=tmp_path, progress=False)
    assert len(calls) == 3  # a new setting and a different model each generate again
    assert set(first.column_names) == {"input_ids", "text"}


def test_end_of_sequence_handling(tiny_tokenizer, monkeypatch):
    """`continue` keeps full-length rows (EOS is suppressed by min_new_tokens); `resample` drops rows that
    contain EOS and generates replacements."""
    model = make_tiny_model("llama")
    eos = tiny_tokenizer.eos_token_id
    seen = []
    real = self_generate._generate_batch

    def fake(model, starts, seq_len, settings, eos_id, pad, bar, ranks=1):
        seen.append(settings["on_eos"])
        out = real(model, starts, seq_len, settings, eos_id, pad, bar, ranks)
        if len(seen) == 1:
            out[0, 5] = eos  # the first batch has one sequence that "ended early"
        return out

    monkeypatch.setattr(self_generate, "_generate_batch", fake)
    kept, _ = generate_samples(model, tiny_tokenizer, _config(self_on_eos="resample"), 4, progress=False)
    assert kept.shape == (4, 20) and not (kept[:, 1:] == eos).any()
    assert len(seen) >= 2  # at least one batch more to replace the dropped sequence(s)
    seen.clear()
    cont, _ = generate_samples(model, tiny_tokenizer, _config(), 4, progress=False)
    assert cont.shape == (4, 20) and len(seen) == 1 and (cont[0, 5] == eos)


def test_prompts_and_filter(tiny_tokenizer):
    model = make_tiny_model("llama")
    ids, texts = generate_samples(model, tiny_tokenizer, _config(self_prompts=["the quick brown"]), 3,
                                  sample_filter=lambda text, row: True, progress=False)
    prefix = tiny_tokenizer("the quick brown").input_ids
    assert all(row[: len(prefix)].tolist() == prefix for row in ids)


def test_bad_input(tiny_tokenizer, tmp_path):
    model = make_tiny_model("llama")
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        generate_samples(model, tiny_tokenizer, _config(seq_len=500), 2, progress=False)
    with pytest.raises(ValueError, match="must be positive"):
        generate_samples(model, tiny_tokenizer, _config(), 0, progress=False)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot write self-generated calibration data"):
        load_or_generate(model, tiny_tokenizer, _config(), cache=blocker / "sub", progress=False)
    with pytest.raises(ValueError, match="self:N"):
        CalibrationConfig(source="c4+self:0")


def test_mixed_calibration_and_masks_from_external_data_only(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTIMUM_RECON_CACHE", str(tmp_path / "cache"))

    def prune(source, use="reconstruction"):
        config = PruningConfig(method="sparsegpt", reconstruction="layer", batch_size=3, calibration=CalibrationConfig(
            source=source, num_samples=6, seq_len=16, self_use=use, self_batch_size=5))
        pruner = ReconPruner.from_pretrained(str(tiny_model_dir), config=config)
        ids, _ = pruner.calibration_ids()
        report = pruner.prune(progress=False)
        return ids, pruner.model, report

    ids, mixed, report = prune(f"{text_file}+self:5")
    assert ids.shape == (11, 16)  # 6 external windows, then 5 generated
    assert report.calibration["external"] == 6 and report.calibration["self_generated"] == 5
    assert report.calibration["for_masks"] == 6 and report.calibration["generation"]["top_k"] == 50
    external_ids, external, _ = prune(str(text_file))
    assert torch.equal(ids[:6], external_ids)
    for a, b in zip(mixed.parameters(), external.parameters()):
        assert torch.equal(a, b)  # self-generated samples did not change any mask or weight
    _, everything, _ = prune(f"{text_file}+self:5", use="all")
    assert any(not torch.equal(a, b) for a, b in zip(everything.parameters(), external.parameters()))


def test_generation_works_on_an_offloaded_model(tiny_tokenizer):
    from accelerate import cpu_offload

    plain, offloaded = make_tiny_model("llama"), make_tiny_model("llama")
    cpu_offload(offloaded, execution_device=torch.device("cpu"))
    a, _ = generate_samples(plain, tiny_tokenizer, _config(), 4, progress=False)
    b, _ = generate_samples(offloaded, tiny_tokenizer, _config(), 4, progress=False)
    assert torch.equal(a, b)
