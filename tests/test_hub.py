"""Save and push against a Hub-compatible server on 127.0.0.1, driven by the real huggingface_hub client.

The client runs in a subprocess: huggingface_hub reads HF_ENDPOINT (and the offline flags this test suite
sets) once, at import.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hub_server import HubServer

from optimum_recon.hub.sparse_format import QUANT_METHOD


@pytest.fixture(scope="module")
def hub():
    server = HubServer()
    yield server
    server.close()


def run_client(hub, tmp_path, code: str, *args: str, check: bool = True, token: str | None = "test-token") -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HUB_DISABLE_XET="1", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__), env.get("PYTHONPATH", "")]))
    if token:
        env["HF_TOKEN"] = token
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], env=env, capture_output=True,
                            text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    lines = result.stdout.strip().splitlines()
    return {"returncode": result.returncode, "stderr": result.stderr,
            **(json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {})}


PRUNE = """
import json, sys, torch
from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
model_dir, text, out, repo = sys.argv[1:5]
config = PruningConfig(method="wanda", pattern="2:4", reconstruction="layer",
                       calibration=CalibrationConfig(source=text, num_samples=4, seq_len=32))
pruner = ReconPruner.from_pretrained(model_dir, config=config)
pruner.prune(progress=False)
pruner.save_pretrained(out)
"""


def test_push_then_download_gives_identical_weights(hub, tmp_path, tiny_model_dir, text_file):
    code = PRUNE + """
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForCausalLM
first = pruner.push_to_hub(repo)
second = pruner.push_to_hub(repo)  # unchanged folder: no new commit
local = snapshot_download(repo)
reloaded = AutoModelForCausalLM.from_pretrained(repo)
state = pruner.model.state_dict()
identical = all(torch.equal(t, state[n]) for n, t in reloaded.state_dict().items())
card = ModelCard.load(repo)
recipe = PruningConfig.from_pretrained(repo)
print(json.dumps({"first": first.oid, "second": second.oid, "identical": identical,
                  "files": sorted(__import__("os").listdir(local)), "tags": card.data.tags,
                  "library": card.data.library_name,
                  # the recipe names the local calibration file by its base name, never by its path
                  "recipe_ok": recipe.calibration.source == __import__("os").path.basename(text) and
                               recipe.to_dict() | {"calibration": None} == config.to_dict() | {"calibration": None}}))
"""
    result = run_client(hub, tmp_path, code, str(tiny_model_dir), str(text_file), str(tmp_path / "out"), "me/tiny")
    assert result["identical"] and result["recipe_ok"]
    assert result["first"] == result["second"]
    assert len(hub.state.repos["me/tiny"].history) == 2  # the initial commit and one upload
    assert {"model.safetensors", "pruning_config.json", "pruning_report.json", "README.md"} <= set(result["files"])
    assert {"optimum-recon", "sparsity-50", "2:4", "wanda"} <= set(result["tags"])
    assert result["library"] == "transformers"


def test_push_and_download_the_compact_format(hub, tmp_path, tiny_model_dir, text_file):
    """A compact push (the user's dense save is left alone), downloaded and loaded with transformers, and turned into
    a dense folder by `optimum-recon decompress REPO`."""
    code = PRUNE + """
from huggingface_hub import ModelCard, snapshot_download
from transformers import AutoModelForCausalLM
from optimum_recon.cli import main
dense_before = open(out + "/model.safetensors", "rb").read()
pruner.push_to_hub(repo, sparse_format="bitmask")
local = snapshot_download(repo)
reloaded = AutoModelForCausalLM.from_pretrained(repo)
state = pruner.model.state_dict()
identical = all(torch.equal(t, state[n]) for n, t in reloaded.state_dict().items())
code = main(["decompress", repo, out + "-dense"])
dense = AutoModelForCausalLM.from_pretrained(out + "-dense")
print(json.dumps({"identical": identical, "card": ModelCard.load(repo).text, "decompress": code,
                  "config": json.load(open(local + "/config.json")),
                  "dense_kept": open(out + "/model.safetensors", "rb").read() == dense_before,
                  "dense_identical": all(torch.equal(t, state[n]) for n, t in dense.state_dict().items())}))
"""
    result = run_client(hub, tmp_path, code, str(tiny_model_dir), str(text_file), str(tmp_path / "out"), "me/compact")
    assert result["identical"] and result["dense_identical"] and result["dense_kept"] and result["decompress"] == 0
    assert result["config"]["quantization_config"]["quant_method"] == QUANT_METHOD
    assert result["config"]["quantization_config"]["pattern"] == "2:4"
    assert "import optimum_recon" in result["card"] and "compact sparse format" in result["card"]


def test_cli_push_and_recipe_from_the_hub(hub, tmp_path, tiny_model_dir, text_file):
    code = """
import sys
from optimum_recon.cli import main
sys.exit(main(sys.argv[1:]))
"""
    out = tmp_path / "cli-out"
    result = run_client(hub, tmp_path, code, "prune", "--model", str(tiny_model_dir), "--method", "magnitude",
                        "--reconstruction", "layer", "--calibration", str(text_file), "--num-samples", "4",
                        "--seq-len", "32", "--output", str(out), "--push-to-hub", "me/cli-model", "--no-progress")
    assert result["returncode"] == 0
    files = hub.state.repos["me/cli-model"].commits[hub.state.repos["me/cli-model"].branches["main"]]
    assert "pruning_config.json" in files and files["model.safetensors"].lfs
    again = run_client(hub, tmp_path, code, "prune", "--model", str(tiny_model_dir), "--recipe", "me/cli-model",
                       "--calibration", str(text_file), "--output", str(tmp_path / "again"), "--no-progress")
    assert again["returncode"] == 0
    assert '"method": "magnitude"' in (tmp_path / "again" / "pruning_config.json").read_text()


def test_a_card_pushed_from_local_inputs_names_no_local_path(hub, tmp_path, tiny_model_dir, text_file):
    """The issue's check, as a Hub visitor reads the repository: a prune of a local model folder with a local
    calibration file, evaluated on a local file and on WikiText-2 (the bundled copy, offline), pushed by the CLI."""
    code = """
import sys
from optimum_recon.cli import main
sys.exit(main(sys.argv[1:]))
"""
    out = tmp_path / "out"
    result = run_client(hub, tmp_path, code, "prune", "--model", str(tiny_model_dir), "--method", "wanda",
                        "--reconstruction", "block", "--epochs", "1", "--calibration", str(text_file),
                        "--num-samples", "4", "--seq-len", "32", "--eval", f"{text_file},wikitext2",
                        "--eval-seq-len", "32", "--eval-max-tokens", "256", "--output", str(out),
                        "--push-to-hub", "me/local-inputs", "--base-model", "org/tiny-llama", "--license", "mit",
                        "--dataset-tag", "me/my-data", "--no-progress")
    assert result["returncode"] == 0, result["stderr"][-2000:]
    repo = hub.state.repos["me/local-inputs"]
    files = repo.commits[repo.branches["main"]]
    assert {"README.md", "pruning_config.json", "pruning_report.json", "config.json"} <= set(files)
    for name, stored in files.items():  # every uploaded file, weights included
        for secret in (str(tmp_path), str(tiny_model_dir), str(text_file), os.path.expanduser("~")):
            assert secret.encode() not in stored.data, (name, secret)
    card = files["README.md"].data.decode()
    assert 'from_pretrained("me/local-inputs")' in card and "REPO_OR_FOLDER" not in card
    # the headline: dense -> pruned, the recovery, and how it was measured
    headline = next(line for line in card.splitlines() if line.startswith("- **WikiText-2"))
    assert "dense →" in headline and "recovery" in headline
    assert "the first 256 of the" in headline and "WikiText-2 (raw) test split" in headline
    assert "copy bundled with optimum-recon" in headline and "windows of 32 tokens" in headline
    assert "`text.txt` (a local file)" in card and "sha256 `" in card
    assert "--model org/tiny-llama" in card and "--calibration path/to/text.txt" in card
    from huggingface_hub import ModelCard

    meta = ModelCard(card).data
    assert (meta.base_model, meta.license, meta.datasets) == ("org/tiny-llama", "mit", ["me/my-data"])
    assert [r.dataset_type for r in meta.eval_results] == ["wikitext"]  # the local file is not a Hub dataset
    assert json.loads(files["pruning_config.json"].data)["calibration"]["source"] == "text.txt"
    report = json.loads(files["pruning_report.json"].data)
    assert report["provenance"]["model"] == {"name": tiny_model_dir.name, "local": True, "kind": "folder"}
    assert report["provenance"]["calibration"]["sha256"] == hashlib.sha256(text_file.read_bytes()).hexdigest()
    # the local folder keeps its placeholder card: the push only read it
    assert "REPO_OR_FOLDER" in (out / "README.md").read_text()


def test_server_error_mid_upload_is_clear_and_keeps_the_local_save(hub, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "out"
    hub.state.fail_next("/commit/", status=500, times=10)
    code = PRUNE + """
from optimum_recon.hub import HubUploadError
try:
    pruner.push_to_hub(repo)
except HubUploadError as err:
    print(json.dumps({"error": str(err)}))
"""
    result = run_client(hub, tmp_path, code, str(tiny_model_dir), str(text_file), str(out), "me/broken")
    hub.state.failures.clear()
    assert "pushing" in result["error"] and "me/broken" in result["error"]
    assert f"The local save at {out} is intact" in result["error"]
    assert (out / "model.safetensors").stat().st_size > 0 and (out / "pruning_config.json").is_file()
    repo = hub.state.repos["me/broken"]
    assert "model.safetensors" not in repo.commits[repo.branches["main"]]  # nothing half-committed


def test_invalid_repo_id_is_a_clear_error(hub, tmp_path, tiny_model_dir, text_file):
    code = PRUNE + """
from optimum_recon.hub import HubUploadError
try:
    pruner.push_to_hub(repo)
except HubUploadError as err:
    print(json.dumps({"error": str(err)}))
"""
    result = run_client(hub, tmp_path, code, str(tiny_model_dir), str(text_file), str(tmp_path / "o"), "bad name/x!")
    assert "repository id is not valid" in result["error"] and "is intact" in result["error"]


def test_missing_token_is_a_clear_error(hub, tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    code = """
import json, sys
from optimum_recon.hub import HubUploadError, push_folder
try:
    push_folder(sys.argv[1], "me/no-token")
except HubUploadError as err:
    print(json.dumps({"error": str(err)}))
"""
    hub.state.require_token = True
    try:
        result = run_client(hub, tmp_path, code, str(folder), token=None)
    finally:
        hub.state.require_token = False
    assert "refused the token (401)" in result["error"] and "hf auth login" in result["error"]
    assert (folder / "config.json").read_text() == "{}"


def test_card_is_idempotent_and_complete(tmp_path):
    from optimum_recon import PruningConfig
    from optimum_recon.hub import build_model_card

    config = PruningConfig(pattern="2:4", calibration={"source": "c4", "num_samples": 8, "seq_len": 64})
    a = str(build_model_card(config, None, base_model="org/base", license="mit"))
    b = str(build_model_card(config, None, base_model="org/base", license="mit"))
    assert a == b
    for heading in ("## Results", "## How to load", "## How to reproduce", "## Limitations", "## Configuration",
                    "## Citation"):
        assert a.count(heading) == 1
    assert "base_model: org/base" in a and "license: mit" in a and "allenai/c4" in a
    assert "optimum-recon prune --model org/base" in a and "--pattern 2:4" in a


def test_card_says_when_the_time_includes_an_interrupted_run():
    from optimum_recon import PruningConfig, PruningReport
    from optimum_recon.hub import build_model_card
    from optimum_recon.report import BlockRecord

    block = BlockRecord(index=0, error=1.0, error_normalized=0.1, error_local=None, sparsity=0.5, seconds=1.0)
    report = PruningReport(blocks=[block], total_seconds=600.0, environment={"device": "cpu"})
    assert "took 10.0 minutes on `cpu`." in str(build_model_card(PruningConfig(), report))
    report.environment["torch_threads"] = "2"  # CPU results are bit-identical only with the same thread count
    assert "took 10.0 minutes on `cpu` with 2 torch threads." in str(build_model_card(PruningConfig(), report))
    report.resumed_seconds = 240.0
    assert ("took 10.0 minutes on `cpu` with 2 torch threads (resumed from a checkpoint: 4.0 of them by the "
            "interrupted earlier run).") in str(build_model_card(PruningConfig(), report))


def test_card_says_which_precision_training_ran_in():
    from optimum_recon import PruningConfig, PruningReport
    from optimum_recon.hub import build_model_card
    from optimum_recon.report import BlockRecord

    def card(config, dtype, **record):
        training = {"lr": 1e-3, "loss_per_epoch": [1.0], "train_dtype": dtype, **record}
        block = BlockRecord(index=0, error=1.0, error_normalized=0.1, error_local=None, sparsity=0.5, seconds=1.0,
                            reconstruction={"windows": [training]})
        return str(build_model_card(config, PruningReport(blocks=[block], environment={"device": "cpu"})))

    auto = card(PruningConfig(), "bfloat16")
    assert "in bfloat16 autocast with float32 master weights (chosen by `train_dtype=\"auto\"`" in auto
    assert "in float32 (chosen by" in card(PruningConfig(), "float32")
    given = card(PruningConfig(train_dtype="bfloat16"), "bfloat16")
    assert "in bfloat16 autocast with float32 master weights." in given and "(chosen by" not in given
    # a model loaded in bfloat16 trains in its own dtype, without autocast, and the card says so
    own = card(PruningConfig(), "bfloat16", autocast=False)
    assert "in bfloat16 (the model's own dtype) (chosen by" in own and "autocast" not in own
    half = card(PruningConfig(train_dtype="float16"), "float16", autocast=True, weights_dtype="bfloat16")
    assert "in float16 autocast with bfloat16 master weights." in half


def test_the_protocol_words_docs_hub_quotes():
    from optimum_recon.hub.card import protocol_words

    protocol = {"tokens": 16384, "total_tokens": 304734, "seq_len": 1024, "split": "test", "origin": "bundled",
                "selection": "all rows"}
    words = ("the first 16,384 of the 304,734 tokens of the WikiText-2 (raw) test split, read from the copy bundled "
             "with optimum-recon (the whole raw test split), in non-overlapping windows of 1,024 tokens")
    assert protocol_words("wikitext2", protocol, {}) == words
    page = (Path(__file__).resolve().parents[1] / "docs" / "hub.md").read_text()
    assert " ".join(("Measured on " + words).split()) in " ".join(page.split())
    # the whole text: "all N tokens", with what the last partial window dropped
    assert protocol_words("wikitext2", {**protocol, "tokens": 304128}, {}).startswith(
        "all 304,734 tokens (the 606 after the last whole window dropped) of the WikiText-2 (raw) test split")
