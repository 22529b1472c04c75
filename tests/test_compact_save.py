"""Saving pruned models in the checkpoint's dtype and in the compact sparse format, and loading them back with a
plain `AutoModelForCausalLM.from_pretrained`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import QUIET, make_tiny_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from optimum_recon import CalibrationSet, PruningConfig, ReconPruner, prune_model
from optimum_recon.cli import main
from optimum_recon.hub import compact
from optimum_recon.hub.sparse_format import MASK_SUFFIX

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _pruned(pattern="unstructured", seed=0) -> ReconPruner:
    model = make_tiny_model("llama", seed=seed)
    config = PruningConfig(method="magnitude", reconstruction="layer", pattern=pattern)
    torch.manual_seed(seed)
    report = prune_model(model, config, CalibrationSet(torch.randint(0, 100, (4, 16))), QUIET)
    pruner = ReconPruner(model, None, config)
    pruner.report = report
    return pruner


def _state(folder):
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key].view(_INT[a[key].dtype]), b[key].view(_INT[b[key].dtype])), key


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
def test_compact_round_trip_is_bit_identical_to_the_dense_save(tmp_path, pattern, dtype):
    pruner = _pruned(pattern)
    pruner.save_pretrained(tmp_path / "dense", save_dtype=dtype)
    pruner.save_pretrained(tmp_path / "compact", save_dtype=dtype, sparse_format="bitmask")
    dense_model, dense = _state(tmp_path / "dense")
    compact_model, packed = _state(tmp_path / "compact")
    assert dense_model.dtype == getattr(torch, dtype) == compact_model.dtype
    _assert_bit_identical(dense, packed)
    # loaded as a plain model: nothing of the format is left, and saving it again writes a dense checkpoint
    assert getattr(compact_model.config, "quantization_config", None) is None
    assert not getattr(compact_model, "is_quantized", False)
    # the zeros are the pruned model's, every N:M group valid
    for name, tensor in packed.items():
        if ".layers." in name and name.endswith("proj.weight"):
            original = pruner.model.get_parameter(name)
            zeros = original == 0
            assert bool((tensor[zeros] == 0).all()), name  # every pruned weight stays zero
            if dtype != "float16":  # (float16 may round tiny kept weights to zero: more zeros, still valid N:M)
                assert torch.equal(tensor == 0, zeros), name
            if pattern != "unstructured":
                n, m = map(int, pattern.split(":"))
                assert int((tensor.view(tensor.shape[0], -1, m) != 0).sum(-1).max()) <= n
    saved = pruner.report.saved
    assert saved["sparse_format"] == "bitmask" and saved["dtype"] == dtype and saved["compressed_tensors"] == 21
    with safe_open(tmp_path / "compact" / "model.safetensors", "pt") as reader:
        assert "model.layers.0.mlp.up_proj.weight" + MASK_SUFFIX in reader.keys()
        assert "model.embed_tokens.weight" + MASK_SUFFIX not in reader.keys()  # dense: nothing to gain
    sizes = {k: os.path.getsize(tmp_path / k / "model.safetensors") for k in ("dense", "compact")}
    assert sizes["compact"] < sizes["dense"]


def test_the_saved_dtype_defaults_to_the_checkpoints(tmp_path, tiny_tokenizer, text_file):
    """A bfloat16 checkpoint pruned in float32 on the CPU is saved in bfloat16; save_dtype overrides."""
    from optimum_recon import CalibrationConfig

    source = tmp_path / "bf16"
    make_tiny_model("llama").to(torch.bfloat16).save_pretrained(source)
    tiny_tokenizer.save_pretrained(source)
    config = PruningConfig(method="magnitude", reconstruction="layer",
                           calibration=CalibrationConfig(source=str(text_file), num_samples=4, seq_len=16))
    pruner = ReconPruner.from_pretrained(str(source), config=config, dtype="float32")
    assert pruner.model.dtype == torch.float32 and pruner.checkpoint_dtype == "bfloat16"
    pruner.prune(progress=False)
    pruner.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as reader:
        assert {reader.get_tensor(k).dtype for k in reader.keys()} == {torch.bfloat16}
    assert "bfloat16" in (tmp_path / "out" / "README.md").read_text()
    pruner.save_pretrained(tmp_path / "fp32", save_dtype="float32")
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    # a model made in memory has no checkpoint: its own dtype is kept
    assert _pruned().checkpoint_dtype == "float32"


def test_an_interrupted_compact_save_leaves_the_previous_folder_intact(tmp_path, monkeypatch):
    pruner = _pruned()
    pruner.save_pretrained(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    calls = {"n": 0}
    real = compact.encode

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compact, "encode", failing)
    with pytest.raises(KeyboardInterrupt):
        pruner.save_pretrained(tmp_path / "out", sparse_format="bitmask")
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no leftover temporary folder


def test_a_corrupted_compact_file_is_an_error_naming_the_tensor(tmp_path, caplog):
    from safetensors.torch import load_file, save_file

    _pruned().save_pretrained(tmp_path / "c", sparse_format="bitmask")
    path = tmp_path / "c" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight" + MASK_SUFFIX][3] ^= 1
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(RuntimeError, match="conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")
    # transformers reports the failed conversion in its load report, with our message
    assert "model.layers.1.mlp.up_proj.weight: the checksum of its values and mask does not match" in caplog.text
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight: the checksum"):
        compact.decompress_folder(tmp_path / "c", tmp_path / "d")


def test_a_truncated_compact_file_is_an_error(tmp_path):
    _pruned().save_pretrained(tmp_path / "c", sparse_format="bitmask")
    path = tmp_path / "c" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(Exception, match="(?i)safetensor|incomplete|invalid|truncat|size"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_a_model_that_is_not_sparse_is_refused_with_what_would_be_saved(tmp_path):
    pruner = ReconPruner(make_tiny_model("llama"), None, PruningConfig())
    with pytest.raises(ValueError, match="no weight of this model has zeros enough"):
        pruner.save_pretrained(tmp_path / "x", sparse_format="bitmask")
    assert not (tmp_path / "x").exists()


def test_bad_save_arguments(tmp_path):
    pruner = _pruned()
    with pytest.raises(ValueError, match="sparse_format='zip' is not valid: choose bitmask"):
        pruner.save_pretrained(tmp_path / "a", sparse_format="zip")
    with pytest.raises(ValueError, match="save_dtype='int8' is not valid"):
        pruner.save_pretrained(tmp_path / "b", save_dtype="int8")
    with torch.no_grad():
        pruner.model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e6
    with pytest.raises(OverflowError, match="up_proj.weight holds values up to 1e\\+06, beyond torch.float16"):
        pruner.save_pretrained(tmp_path / "c", save_dtype="float16")
    assert not any(tmp_path.iterdir())


def test_a_future_format_version_says_to_upgrade(tmp_path):
    _pruned().save_pretrained(tmp_path / "c", sparse_format="bitmask")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["quantization_config"]["format_version"] = 99
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="version 99.*pip install -U optimum-recon"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def _load_in_fresh_python(folder, first_line: str = "") -> subprocess.CompletedProcess:
    """`AutoModelForCausalLM.from_pretrained(folder)` in a new interpreter, after ``first_line`` (an import)."""
    code = (first_line + "; " if first_line else "") + (
        "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])")
    return subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=300)


def test_without_optimum_recon_imported_loading_fails_and_names_it(tmp_path):
    _pruned().save_pretrained(tmp_path / "c", sparse_format="bitmask")
    plain = _load_in_fresh_python(tmp_path / "c")
    assert plain.returncode != 0
    # the first thing the user reads (transformers' line naming the unknown method) says what to do
    first = plain.stderr.strip().splitlines()[0]
    assert "Unknown quantization type, got optimum-recon (pip install optimum-recon, then import optimum_recon)" in \
        first
    imported = _load_in_fresh_python(tmp_path / "c", "import optimum_recon")
    assert imported.returncode == 0, imported.stderr[-2000:]


def test_a_checkpoint_with_the_first_method_name_still_loads(tmp_path):
    pruner = _pruned()
    pruner.save_pretrained(tmp_path / "c", sparse_format="bitmask")
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    config["quantization_config"]["quant_method"] = "optimum_recon"  # as written before the name was an instruction
    (tmp_path / "c" / "config.json").write_text(json.dumps(config))
    assert compact.is_compact(tmp_path / "c")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "c").state_dict()
    assert all(torch.equal(tensor, reloaded[name]) for name, tensor in pruner.model.state_dict().items())


def test_importing_the_quantizer_module_first_registers_it(tmp_path):
    # `from optimum_recon.hub.quantizer import ...` before anything else imports transformers' registry from inside
    # the half-imported module; the import hook must leave the registration to the module instead of failing
    _pruned().save_pretrained(tmp_path / "c", sparse_format="bitmask")
    result = _load_in_fresh_python(tmp_path / "c", "from optimum_recon.hub.quantizer import SparseCheckpointConfig")
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_saves_compact_and_decompresses(tmp_path, tiny_model_dir, text_file, capsys):
    out, dense = tmp_path / "compact", tmp_path / "dense"
    assert main(["prune", "--model", str(tiny_model_dir), "--reconstruction", "layer", "--method", "magnitude",
                 "--pattern", "2:4", "--calibration", str(text_file), "--num-samples", "4", "--seq-len", "16",
                 "--save-dtype", "bfloat16", "--sparse-format", "bitmask", "--output", str(out),
                 "--no-progress"]) == 0
    assert compact.is_compact(out)
    card = (out / "README.md").read_text()
    assert "import optimum_recon" in card and "optimum-recon decompress" in card and "bfloat16" in card
    assert main(["decompress", str(out), str(dense)]) == 0
    assert "wrote the dense checkpoint" in capsys.readouterr().out
    assert not compact.is_compact(dense)
    _assert_bit_identical(_state(out)[1], _state(dense)[1])
    # the dense copy's card and report say what it is: dense, decompressed, same provenance
    card = (dense / "README.md").read_text()
    assert "import optimum_recon" not in card and "optimum-recon's compact sparse format" not in card
    assert "written by `optimum-recon decompress`" in card and "no extra package is needed" in card
    assert "`text.txt`" in card and "in bfloat16 as ordinary safetensors" in card
    report = json.loads((dense / "pruning_report.json").read_text())
    assert report["saved"]["sparse_format"] is None and report["saved"]["decompressed_from"]["sparse_format"] == \
        "bitmask"
    assert report["provenance"] == json.loads((out / "pruning_report.json").read_text())["provenance"]
    with safe_open(dense / "model.safetensors", "pt") as reader:
        assert not any(k.endswith(MASK_SUFFIX) for k in reader.keys())
    with pytest.raises(ValueError, match="not a compact sparse checkpoint"):
        compact.decompress_folder(dense, tmp_path / "again")


def test_decompress_never_writes_into_the_input_or_a_users_folder(tmp_path):
    from optimum_recon import OutputFolderError

    _pruned().save_pretrained(tmp_path / "c", sparse_format="bitmask")
    before = {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()}
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    for target in (tmp_path / "c", user, tmp_path):
        with pytest.raises(OutputFolderError):
            compact.decompress_folder(tmp_path / "c", target)
    assert (user / "notes.txt").read_text() == "keep me"
    assert {p.name: p.read_bytes() for p in (tmp_path / "c").iterdir()} == before
