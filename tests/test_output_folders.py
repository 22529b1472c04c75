"""The output-folder contract through the real command line, on a tiny model: a prune writes only into a new or
empty folder, or one optimum-recon saved and that holds exactly what it wrote; never into or beside the model it
reads, the current folder or home. Every case checks the exit code, the one-line message, that the error came before
the weights were loaded, and that no file of the user's changed (`cli_cases.py`; counted with test_robustness.py in
docs/troubleshooting.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli_cases import one_line_error as _one_line_error
from cli_cases import prune_argv as _prune
from cli_cases import run_cli as _run
from cli_cases import snapshot as _snapshot

from optimum_recon.folders import MARKER, PARTIAL_MARKER


# --- the output folder contract --------------------------------------------------------------------------
def test_output_is_the_model_folder(user, tiny_model_dir, text_file, capsys):
    before = _snapshot(tiny_model_dir)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", tiny_model_dir, "--overwrite"), capsys)
    assert code == 2
    _one_line_error(err, "is the input model's folder")
    assert "Loading weights" not in err and _snapshot(tiny_model_dir) == before


def test_output_containing_the_model_folder(user, tiny_model_dir, text_file, capsys):
    before = _snapshot(user)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", user, "--overwrite"), capsys)
    assert code == 2
    _one_line_error(err, "contains the input model's folder")
    assert _snapshot(user) == before


def test_output_dot_with_user_files(user, tiny_model_dir, text_file, capsys, monkeypatch):
    work = user / "work"
    work.mkdir()
    (work / "data.csv").write_text("a,b\n")
    monkeypatch.chdir(work)
    before = _snapshot(work)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", "."), capsys)
    assert code == 2
    _one_line_error(err, "already holds files that optimum-recon did not write (data.csv)")
    assert "Loading weights" not in err and _snapshot(work) == before


def test_current_folder_is_never_replaced(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("a,b\n")
    monkeypatch.chdir(work)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", ".", "--overwrite"), capsys)
    assert code == 2
    _one_line_error(err, "never replaced")
    assert (work / "data.csv").read_text() == "a,b\n"


def test_an_empty_current_folder_is_not_replaced_either(tmp_path, tiny_model_dir, text_file, capsys, monkeypatch):
    work = tmp_path / "empty-work"
    work.mkdir()
    monkeypatch.chdir(work)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", "."), capsys)
    assert code == 2  # a save replaces its folder by a rename: the shell's folder would vanish under it
    _one_line_error(err, "never replaced")
    assert work.is_dir() and not list(work.iterdir())


def test_existing_folder_of_user_files(user, tiny_model_dir, text_file, capsys):
    out = user / "out"
    out.mkdir()
    (out / "results.txt").write_text("precious\n")
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)
    assert code == 2
    _one_line_error(err, "results.txt")
    assert "--overwrite" in err and (out / "results.txt").read_text() == "precious\n"
    # said explicitly, the folder is replaced
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", out, "--overwrite"), capsys)
    assert code == 0, err
    assert (out / "model.safetensors").is_file() and not (out / "results.txt").exists()


def test_own_folder_is_rewritten_but_not_with_a_user_file_in_it(user, tiny_model_dir, text_file, capsys):
    out = user / "out"
    assert _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["kind"] == "model" and "model.safetensors" in marker["files"]
    assert _run(_prune(tiny_model_dir, text_file, "--output", out, "--sparsity", "0.6"), capsys)[0] == 0
    (out / "eval-notes.txt").write_text("mine\n")
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)
    assert code == 2
    _one_line_error(err, "eval-notes.txt")
    assert (out / "eval-notes.txt").read_text() == "mine\n"


def test_output_is_a_file_or_cannot_be_created(user, tiny_model_dir, text_file, capsys):
    for output, message in ((user / "notes.txt", "is a file"), (user / "notes.txt" / "sub", "is a file"),
                            ("/proc/optimum-recon-test/out", "cannot be written")):
        code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", output), capsys)
        assert code == 2
        _one_line_error(err, message)
        assert "Loading weights" not in err
    assert (user / "notes.txt").read_text() == "my notes\n"


def test_stale_partial_folders_are_removed_but_not_others(user, tiny_model_dir, text_file, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = user / ".out.partial-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"0" * 1000)
    (stale / PARTIAL_MARKER).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    lookalike = user / ".out.partial-userdir"  # same pattern, not ours: kept
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("x")
    assert _run(_prune(tiny_model_dir, text_file, "--output", user / "out"), capsys)[0] == 0
    assert not stale.exists() and (lookalike / "keep.txt").is_file()


def test_output_inside_the_model_folder(user, tiny_model_dir, text_file, capsys):
    before = _snapshot(tiny_model_dir)
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", tiny_model_dir / "pruned", "--overwrite"),
                        capsys)
    assert code == 2
    _one_line_error(err, "is inside the input model's folder")
    assert "Loading weights" not in err and _snapshot(tiny_model_dir) == before


def _saved_once(user, tiny_model_dir, text_file, capsys) -> Path:
    out = user / "out"
    assert _run(_prune(tiny_model_dir, text_file, "--output", out), capsys)[0] == 0
    return out


def _change_readme(out: Path) -> None:
    (out / "README.md").write_text((out / "README.md").read_text() + "\nMy evaluation on our data: 71%.\n")


def _add_link(out: Path) -> None:
    (out / "latest").symlink_to(out / "model.safetensors")


def _add_folder(out: Path) -> None:
    (out / "plots").mkdir()


def _forge_marker(out: Path) -> None:
    (out / "thesis.txt").write_text("two years of work\n")
    marker = json.loads((out / MARKER).read_text())
    marker["files"]["thesis.txt"] = {"bytes": 18, "mtime_ns": 0, "sha256": "0" * 64}
    (out / MARKER).write_text(json.dumps(marker))


def _names_only_marker(out: Path) -> None:
    (out / "thesis.txt").write_text("two years of work\n")
    marker = json.loads((out / MARKER).read_text())
    marker["files"] = sorted([*marker["files"], "thesis.txt"])
    (out / MARKER).write_text(json.dumps(marker))


@pytest.mark.parametrize("change, entry", [
    (_change_readme, "README.md (changed since optimum-recon wrote it)"),
    (_add_link, "latest (a symbolic link)"),
    (_add_folder, "plots/ (a folder)"),
    (_forge_marker, "thesis.txt (changed since optimum-recon wrote it)"),
    (_names_only_marker, "without the hash of every file it lists"),
])
def test_a_saved_folder_the_user_changed_is_theirs(change, entry, user, tiny_model_dir, text_file, capsys):
    """Each of these was replaced or deleted silently when the marker held names alone."""
    out = _saved_once(user, tiny_model_dir, text_file, capsys)
    change(out)
    before = _snapshot(out)
    links = sorted(p.name for p in out.iterdir() if p.is_symlink() or p.is_dir())
    code, _, err = _run(_prune(tiny_model_dir, text_file, "--output", out, "--sparsity", "0.6"), capsys)
    assert code == 2
    _one_line_error(err, entry)
    assert "Loading weights" not in err and "--overwrite" in err
    assert _snapshot(out) == before and sorted(p.name for p in out.iterdir() if p.is_symlink() or p.is_dir()) == links


def test_a_saved_folder_touched_but_unchanged_is_still_ours(user, tiny_model_dir, text_file, capsys):
    out = _saved_once(user, tiny_model_dir, text_file, capsys)
    os.utime(out / "README.md", ns=(1, 1))  # touched (copied with cp, say): same bytes, another time
    assert _run(_prune(tiny_model_dir, text_file, "--output", out, "--sparsity", "0.6"), capsys)[0] == 0
    assert json.loads((out / "pruning_config.json").read_text())["sparsity"] == 0.6


def test_a_card_updated_by_eval_is_still_ours(user, tiny_model_dir, text_file, capsys):
    out = _saved_once(user, tiny_model_dir, text_file, capsys)
    code, _, err = _run(["eval", "--model", out, "--dataset", text_file, "--eval-max-tokens", "256", "--no-progress",
                         "--update-card"], capsys)
    assert code == 0, err
    assert _run(_prune(tiny_model_dir, text_file, "--output", out, "--sparsity", "0.6"), capsys)[0] == 0


def test_eval_update_card_never_replaces_an_edited_card(user, tiny_model_dir, text_file, capsys):
    out = _saved_once(user, tiny_model_dir, text_file, capsys)
    _change_readme(out)
    before = _snapshot(out)
    code, _, err = _run(["eval", "--model", out, "--dataset", text_file, "--eval-max-tokens", "256", "--no-progress",
                         "--update-card"], capsys)
    assert code == 2
    _one_line_error(err, "README.md changed since optimum-recon wrote it; recording the results would replace your "
                         "edits")
    assert _snapshot(out) == before


def test_a_push_stages_links_and_leaves_the_saved_folder_as_it_was(user, tiny_model_dir, text_file, capsys):
    from optimum_recon.hub.push import PLACEHOLDER, card_for_repo

    out = _saved_once(user, tiny_model_dir, text_file, capsys)
    before = _snapshot(out)
    assert PLACEHOLDER in (out / "README.md").read_text()
    with card_for_repo(out, "me/model") as staging:
        assert staging != out and 'from_pretrained("me/model")' in (staging / "README.md").read_text()
        assert (staging / "model.safetensors").is_symlink() and not (staging / MARKER).exists()
    assert not staging.exists()  # the staging folder (links only) is removed ...
    assert _snapshot(out) == before and sorted(os.listdir(out)) == sorted(before)  # ... not its targets
