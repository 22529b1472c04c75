"""Bad input and interruptions, tried as a new user would: each case runs `optimum-recon` in its own process on the
bundled SmolLM2-135M-Instruct with a 4 x 32-token calibration, in a scratch folder holding a user's files.

For each case: the exit code, the seconds until the process ended, whether the model's weights were loaded before it
failed, the one line it printed, and what changed on disk among the user's files (nothing, for every failure).

    python examples/benchmarks/robustness.py [--output examples/benchmarks/results/robustness.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import HERE, offline_env, run_metadata, write_results

CLI = [sys.executable, "-m", "optimum_recon.cli"]


def _snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()}


def _setup(root: Path, model: Path) -> None:
    """The user's scratch folder: a copy of the model (weights linked), text, notes, a folder of results."""
    copy = root / "model_copy"
    copy.mkdir()
    for f in model.iterdir():
        (copy / f.name).symlink_to(f) if f.suffix == ".safetensors" else shutil.copy(f, copy / f.name)
    (copy / "my-notes.md").write_text("the user's own file in the model folder\n")
    (root / "notes.txt").write_text("my notes\n")
    (root / "results").mkdir()
    (root / "results" / "table.csv").write_text("a,b\n1,2\n")
    (root / "calib.txt").write_text(open(HERE.parents[1] / "optimum_recon" / "data" / "bundled" /
                                         "wikitext-2-raw-test.txt", encoding="utf-8").read()[:20000])
    (root / "no_text.jsonl").write_text('{"text": "a b c"}\n{"body": "no text field"}\n')
    (root / "not_objects.jsonl").write_text('{"text": "a b c"}\n[1, 2, 3]\n')
    (root / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "empty.jsonl").write_text("")
    import datasets

    datasets.Dataset.from_dict({"id": [1, 2], "score": [0.5, 0.7]}).to_parquet(str(root / "numbers.parquet"))
    for name, content in (("recipe_targets", '{"targets": 5}'), ("recipe_list", "[1, 2]"),
                          ("recipe_broken", "{not json"),
                          ("recipe_future", '{"optimum_recon_version": "99.0", "method": "magnitude", '
                                            '"reconstruction": "layer", "new_knob": 1}')):
        (root / name).mkdir()
        (root / name / "pruning_config.json").write_text(content)
    bert = root / "bert_config_llama_weights"
    shutil.copytree(copy, bert, symlinks=True)
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertLMHeadModel"],
                                                  "is_decoder": True, "vocab_size": 49152, "hidden_size": 576,
                                                  "num_hidden_layers": 2, "num_attention_heads": 9,
                                                  "intermediate_size": 1536}))
    (root / "empty_folder").mkdir()


BASE = ["prune", "--calibration", "calib.txt", "--num-samples", "4", "--seq-len", "32", "--method", "magnitude",
        "--reconstruction", "layer", "--no-progress"]

# name -> (arguments after BASE, or a full argument list when it starts with a subcommand)
CASES = {
    "--output is the model's folder": ["--model", "model_copy", "--output", "model_copy"],
    "--output . with the user's files": ["--output", "."],
    "--output: a folder of the user's": ["--output", "results"],
    "--output: a file": ["--output", "notes.txt"],
    "--output: unwritable": ["--output", "/proc/optimum-recon/out"],
    "--lr inf with BR": ["--reconstruction", "block", "--lr", "inf"],
    "--lr inf with SparseGPT BR": ["--reconstruction", "block", "--method", "sparsegpt", "--lr", "inf"],
    "--weight-decay nan": ["--weight-decay", "nan"],
    "--weight-decay inf": ["--weight-decay", "inf"],
    "--self-temperature inf": ["--self-temperature", "inf"],
    "BERT config beside Llama weights": ["--model", "bert_config_llama_weights", "--output", "out_bert"],
    "JSONL row without the text field": ["--calibration", "no_text.jsonl"],
    "JSONL rows that are not objects": ["--calibration", "not_objects.jsonl"],
    "recipe: targets 5": ["--recipe", "recipe_targets"],
    "recipe: a JSON list": ["--recipe", "recipe_list"],
    "recipe: invalid JSON": ["--recipe", "recipe_broken"],
    "recipe from a future version": ["--recipe", "recipe_future"],
    "--dtype foo": ["--dtype", "foo"],
    "--device cuda without a GPU": ["--device", "cuda"],
    "--device foo": ["--device", "foo"],
    "calibration: invalid JSON": ["--calibration", "broken.jsonl"],
    "calibration: a binary file": ["--calibration", "binary.txt"],
    "calibration: an empty JSONL": ["--calibration", "empty.jsonl"],
    "calibration: parquet without a string column": ["--calibration", "numbers.parquet"],
    "--model: a folder without config.json": ["--model", "empty_folder"],
    "compare: the second model does not exist": ["compare", "bundled", "./no-such-model", "--no-latency",
                                                 "--no-progress"],
    "finished run with --checkpoint-dir": ["--output", "out_ck", "--checkpoint-dir", "ck"],
    "--output inside the model's folder": ["--model", "model_copy", "--output", "model_copy/pruned"],
    "--num_samples (HfArgumentParser's spelling)": ["--num_samples", "4", "--seq_len", "32", "--output", "out_us"],
    "--dry-run": ["--dry-run", "--output", "out_dry"],
}


def _saved(root: Path, env: dict, name: str) -> Path:
    """A folder an earlier prune saved (the user then changes it)."""
    _run(BASE + ["--output", name], root, env)
    return root / name


def _edit_readme(folder: Path) -> None:
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nOur evaluation: 71%.\n")


def _forge_marker(folder: Path) -> None:
    (folder / "thesis.txt").write_text("two years of work\n")
    marker = json.loads((folder / ".optimum-recon.json").read_text())
    marker["files"]["thesis.txt"] = {"bytes": 18, "mtime_ns": 0, "sha256": "0" * 64}
    (folder / ".optimum-recon.json").write_text(json.dumps(marker))


# name -> (how the user changed a folder optimum-recon saved, before the prune into it again)
CHANGED_FOLDERS = {
    "saved folder, then its README edited": _edit_readme,
    "saved folder, then a symlink added": lambda folder: (folder / "latest").symlink_to(folder / "config.json"),
    "saved folder, then an empty sub-folder added": lambda folder: (folder / "plots").mkdir(),
    "saved folder, then a marker written by hand": _forge_marker,
}


def _run(argv: list[str], cwd: Path, env: dict) -> dict:
    start = time.perf_counter()
    proc = subprocess.run(CLI + argv, cwd=cwd, env=env, capture_output=True, text=True)
    said = [ln for ln in proc.stdout.splitlines() if "checkpoint folder" in ln]
    return {"code": proc.returncode, "seconds": time.perf_counter() - start, "stderr": proc.stderr,
            "stdout": proc.stdout, "note": said[0] if said else ""}


def _line(result: dict) -> str:
    lines = [ln for ln in result["stderr"].splitlines() if ln.startswith("optimum-recon:")]
    return lines[-1] if lines else ""


def _default_sigint() -> None:
    # a process started in the background inherits an ignored SIGINT, and Python then installs no handler for it
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _ctrl_c(root: Path, env: dict) -> dict:
    argv = BASE + ["--reconstruction", "block", "--epochs", "100", "--checkpoint-dir", "ck_int", "--output", "out_int"]
    start = time.perf_counter()
    proc = subprocess.Popen(CLI + argv, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)
    while not (root / "ck_int" / ".optimum-recon.json").exists() and proc.poll() is None:
        time.sleep(0.1)
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate()
    return {"code": proc.returncode, "seconds": time.perf_counter() - start, "stderr": err, "stdout": out}


def _sigkill_save(root: Path, env: dict) -> dict:
    """Kill a save with SIGKILL while its .partial folder exists; then save again and look for leftovers."""
    argv = BASE + ["--output", "out_kill"]
    proc = subprocess.Popen(CLI + argv, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed = False
    while proc.poll() is None:
        if any(root.glob(".out_kill.partial-*/model.safetensors")):
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.02)
    proc.wait()
    left = [p.name for p in root.glob(".out_kill.partial-*")]
    again = _run(argv, root, env)
    again["note"] = (f"killed during the save: {killed}; partial folders after the kill: {len(left)}, after the next "
                     f"save: {len(list(root.glob('.out_kill.partial-*')))}")
    return again


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=str(HERE / "results" / "robustness.json"))
    parser.add_argument("--table", action="store_true", help="print the Markdown table of an earlier --output")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.output).read_text())["cases"]))
        return
    from optimum_recon.data.default_model import default_model_path

    model = Path(default_model_path())
    env = offline_env(None)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    results = {"meta": {**run_metadata(), "model": "bundled SmolLM2-135M-Instruct", "calibration": "4 x 32 tokens"},
               "cases": []}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        _setup(root, model)
        runs = [(name, lambda argv=argv: _run(argv if argv[0] == "compare" else BASE + argv, root, env))
                for name, argv in CASES.items()]
        runs += [("Ctrl-C during BR", lambda: _ctrl_c(root, env)), ("save killed with SIGKILL, then saved again",
                                                                   lambda: _sigkill_save(root, env))]
        prepared = {}
        for index, (name, change) in enumerate(CHANGED_FOLDERS.items()):
            folder = _saved(root, env, f"saved_{index}")
            prepared[name] = lambda folder=folder, change=change: change(folder)
            runs.append((name, lambda folder=folder: _run(BASE + ["--output", folder.name, "--sparsity", "0.6"], root,
                                                          env)))
        for name, run in runs:
            if name in prepared:
                prepared[name]()
            before = _snapshot(root)
            result = run()
            after = _snapshot(root)
            changed = sorted(k for k in before if after.get(k) != before[k])
            row = {"case": name, "exit_code": result["code"], "seconds": round(result["seconds"], 1),
                   "model_loaded": "Loading weights" in result["stderr"], "message": _line(result),
                   "traceback": "Traceback" in result["stderr"], "user_files_changed_or_deleted": changed,
                   "new_files": sorted(k for k in after if k not in before)[:5], "note": result.get("note", "")}
            results["cases"].append(row)
            print(f"{name:50} exit {row['exit_code']:>3}  {row['seconds']:5.1f} s  loaded={row['model_loaded']!s:5} "
                  f"changed={len(changed)}  {row['message'][:90]}", flush=True)
            write_results(args.output, results)
    print("\n" + markdown_table(results["cases"]))
    print(f"\nresults: {args.output}")


def markdown_table(cases: list[dict]) -> str:
    """The table docs/troubleshooting.md shows."""
    lines = ["| case | exit code | seconds | weights loaded first | user files changed | what it printed |",
             "| --- | ---: | ---: | --- | --- | --- |"]
    for c in cases:
        message = c["message"].replace("optimum-recon: ", "").replace("|", "\\|")
        message = message if len(message) <= 150 else message[:147] + "..."
        extra = f" ({c['note']})" if c["note"] else ""
        lines.append(f"| {c['case']} | {c['exit_code']} | {c['seconds']:.1f} | {'yes' if c['model_loaded'] else 'no'} "
                     f"| {len(c['user_files_changed_or_deleted']) or 'none'} | {message or '(results)'}{extra} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
