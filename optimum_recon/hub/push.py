"""Uploading a saved pruned model to the Hugging Face Hub with `huggingface_hub`.

The upload reads the saved folder and never writes to it, so a failed push leaves the local save intact. The
model card's load snippet names the folder with a placeholder until the model has a repository: the pushed card
names the repository instead. It is uploaded from a staging folder of links to the saved files beside that one
rewritten card, so that `upload_folder` (one commit, resumable uploads) sends exactly what the folder holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from ..folders import MARKER

PLACEHOLDER = "REPO_OR_FOLDER"  # what the saved card's load snippet says until the model is pushed

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """A push that failed; the message says why and that the local save is intact."""


def _explain(err: Exception) -> str:
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, RepositoryNotFoundError

    if isinstance(err, HFValidationError):
        return f"the repository id is not valid ({err}); use 'namespace/name' with letters, digits, '-', '_', '.'"
    status = getattr(getattr(err, "response", None), "status_code", None)
    if status == 401 or "401" in str(err)[:200]:
        return "the Hub refused the token (401): log in with `hf auth login` or pass token=..."
    if status == 403:
        return "the token may not write to this repository (403): check its permissions or the namespace"
    if isinstance(err, RepositoryNotFoundError):
        return "the repository does not exist or is not visible with this token"
    if isinstance(err, HfHubHTTPError):
        return f"the Hub answered with an error ({str(err).splitlines()[0]})"
    if isinstance(err, (ConnectionError, OSError)) or "connect" in type(err).__name__.lower():
        return f"the Hub could not be reached ({type(err).__name__}: {str(err)[:200]})"
    return f"{type(err).__name__}: {str(err)[:300]}"


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
) -> Any:
    """Create ``repo_id`` if needed and upload ``folder`` to it; return the `CommitInfo`.

    Raises:
        HubUploadError: for an invalid id, missing or refused credentials, network loss or a server error.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with card_for_repo(folder, repo_id) as upload:
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=upload,
                revision=revision,
                create_pr=create_pr,
                commit_message=commit_message or "Upload model pruned with optimum-recon",
                ignore_patterns=[MARKER],  # the local folder's bookkeeping (folders.py), not part of the model
            )
    except Exception as err:  # noqa: BLE001 - every failure gets the same framing and keeps its cause
        raise HubUploadError(
            f"pushing {folder} to {repo_id!r} failed: {_explain(err)}. The local save at {folder} is intact; "
            "run the push again once this is fixed."
        ) from err


@contextlib.contextmanager
def card_for_repo(folder: Path, repo_id: str) -> Iterator[Path]:
    """``folder`` as it is uploaded to ``repo_id``: itself when its card has no placeholder, else a staging folder
    of symbolic links to its files with a README.md whose placeholder names the repository (the user's edits to
    the card, if any, kept)."""
    readme = folder / "README.md"
    text = readme.read_text(encoding="utf-8") if readme.is_file() else ""
    if PLACEHOLDER not in text:
        yield folder
        return
    staging = Path(tempfile.mkdtemp(prefix="optimum-recon-push-"))
    try:
        for path in folder.rglob("*"):
            if path.is_dir() or path == readme or path.name == MARKER:
                continue
            link = staging / path.relative_to(folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path.resolve())
        (staging / "README.md").write_text(text.replace(PLACEHOLDER, repo_id), encoding="utf-8")
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
