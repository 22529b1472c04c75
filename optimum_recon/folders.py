"""The output-folder contract: optimum-recon writes only into folders it may write, and never loses a user's files.

Every folder the tool writes (a saved model, a comparison, a checkpoint, a generated dataset) holds a marker file,
`.optimum-recon.json`, naming its kind and the files the tool wrote there, each with its size and SHA-256. A folder
may be written when it is

* new, or empty;
* a folder of the same kind that optimum-recon wrote itself and that holds exactly the files its marker lists,
  unchanged: no file edited since (a README.md the user improved), none added, no sub-folder or symbolic link
  (optimum-recon writes neither into these folders), and a marker whose hashes match its files (a marker written by
  hand, or by a version that recorded no hashes, proves nothing).

Anything else is refused before any work starts, naming the entry, unless the caller passes ``overwrite=True``
(`--overwrite`); even then the model being pruned, a folder that contains it or lies inside it, the current folder, a
parent of it, the home folder and the filesystem root are never replaced.

Checking a hash reads the file; a file whose size and modification time (in nanoseconds) are the ones recorded is
taken as unchanged without reading it, so checking a saved 70B model's folder costs a few `stat` calls, and only a
file that was touched is read again.

Writes are atomic (`atomic_directory`): everything goes into a hidden sibling ``.<name>.partial-<random>`` that
replaces the target only once complete. A save killed with SIGKILL leaves such a sibling behind; it carries its
writer's process id, and the next write beside it removes the ones whose process is gone (only those: a
folder without our partial marker is never touched).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

MARKER = ".optimum-recon.json"
PARTIAL_MARKER = ".optimum-recon-partial.json"
KINDS = ("model", "comparison", "checkpoint", "dataset")


class OutputFolderError(ValueError):
    """A folder that optimum-recon must not write into; the message says why and what to do instead."""


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder optimum-recon wrote, or None (no marker, or one that is not ours)."""
    path = Path(folder) / MARKER
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("kind") not in KINDS or not isinstance(data.get("files"), (list, dict)):
        return None
    return data


def sha256_of(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(path: Path) -> dict[str, Any]:
    """What the marker keeps of a file it lists: bytes, modification time (ns) and SHA-256 of the content."""
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256_of(path)}


def write_marker(folder: str | os.PathLike, kind: str, files: Iterable[str] | None = None) -> Path:
    """Write the marker of ``folder``: its kind and the files in it (all of them unless ``files`` is given), each
    with its size and content hash."""
    from .version import __version__

    folder = Path(folder)
    names = _listing(folder) if files is None else files
    records = {name: file_record(folder / name) for name in sorted(set(names) - {MARKER})}
    data = {"kind": kind, "files": records, "optimum_recon_version": __version__}
    path = folder / MARKER
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    return path


def changed_since_written(folder: str | os.PathLike, names: Iterable[str]) -> list[str]:
    """Which of ``names`` in a folder optimum-recon wrote no longer hold what it wrote (edited by the user since):
    what a rewrite of those files in place must not replace. Empty for a folder without a marker of hashes (nothing
    proves a change there)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or not isinstance(marker["files"], dict):
        return []
    return [name for name in names if (folder / name).exists() and not _unchanged(folder / name,
                                                                                   marker["files"].get(name))]


def update_marker(folder: str | os.PathLike, names: Iterable[str]) -> None:
    """Record new contents of files optimum-recon itself rewrote in a folder it owns (``eval --update-card``)."""
    folder = Path(folder)
    marker = read_marker(folder)
    if marker is None or not isinstance(marker["files"], dict):
        return
    for name in names:
        marker["files"][name] = file_record(folder / name)
    (folder / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")


def _listing(folder: Path) -> list[str]:
    """Every file under ``folder`` as a relative POSIX path (folders themselves are not listed)."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def _entries(folder: Path) -> Iterator[tuple[str, str]]:
    """Every entry under ``folder`` as (relative POSIX path, "file" | "folder" | "link"), without following links."""
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        for name in dirs + files:
            path = base / name
            kind = "link" if path.is_symlink() else "folder" if path.is_dir() else "file"
            yield path.relative_to(folder).as_posix(), kind


def _unchanged(path: Path, record: Any) -> bool:
    """Whether ``path`` still holds what the marker recorded (size and time first; the hash when they differ)."""
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        return False
    try:
        stat = path.stat()
    except OSError:
        return False
    if stat.st_size != record.get("bytes"):
        return False
    if stat.st_mtime_ns == record.get("mtime_ns"):
        return True
    return sha256_of(path) == record["sha256"]


def foreign_entries(folder: str | os.PathLike, marker: dict) -> list[str]:
    """The entries of an optimum-recon folder that are not exactly what its marker (one with a record of every file:
    `_check_existing` refuses others first) says it wrote, each with why: files changed, files added, sub-folders
    and links. Empty when the folder may be replaced."""
    folder = Path(folder)
    files = marker["files"]
    found = []
    for name, kind in _entries(folder):
        if name == MARKER:
            continue
        if kind == "link":
            found.append(f"{name} (a symbolic link)")
        elif kind == "folder":
            if not any(listed.startswith(name + "/") for listed in files):
                found.append(f"{name}/ (a folder)")
        elif name not in files:
            found.append(name)
        elif not _unchanged(folder / name, files[name]):
            found.append(f"{name} (changed since optimum-recon wrote it)")
    return found


def _never_replaced() -> list[Path]:
    """Folders never replaced, even with overwrite: the current folder and its parents, the home folder."""
    cwd = Path.cwd().resolve()
    return [cwd, *cwd.parents, Path.home().resolve()]


def _contains(folder: Path, other: Path) -> bool:
    return folder == other or folder in other.parents


def check_output_dir(
    path: str | os.PathLike,
    *,
    kind: str,
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
    what: str = "output folder",
    flag: str | None = "--overwrite",
    owned: Callable[[str], bool] | None = None,
) -> Path:
    """Refuse ``path`` unless optimum-recon may write a ``kind`` folder there; return it resolved.

    Args:
        path: The folder to write.
        kind: What will be written (`model`, `comparison`, `checkpoint`, `dataset`).
        overwrite: Replace a folder that holds other files (never a protected one).
        protect: Folders that must survive whatever happens: typically the input model's folder (an entry may be a
            pair (how the message names it, path)). ``path`` may not be one of them, contain one or lie inside one.
        what: How the message names the folder (e.g. ``"--output"``).
        flag: How the message names the overwrite option (None: there is none, as for checkpoints).
        owned: For folders whose files change while they are written (checkpoints): which relative paths are the
            tool's own, instead of the list in the marker.

    Raises:
        OutputFolderError: with the reason and the fix.
    """
    target = Path(path).expanduser().resolve()
    shown = str(path)
    if target.exists() and not target.is_dir():
        raise OutputFolderError(f"{what} {shown!r} is a file, not a folder: pass a folder path.")
    for guarded in protect:
        label, guarded = guarded if isinstance(guarded, tuple) else ("the input model's folder", guarded)
        if guarded is None:
            continue
        guarded = Path(guarded).expanduser().resolve()
        if _contains(target, guarded) or _contains(guarded, target):
            where = "is" if target == guarded else "contains" if _contains(target, guarded) else "is inside"
            read = "the model being read" if label.endswith("model's folder") else "it"
            raise OutputFolderError(
                f"{what} {shown!r} {where} {label} {str(guarded)!r}; writing there would mix the output with "
                f"{read}. Choose a folder outside it"
                + (f" (this is refused even with {flag})." if flag else ".")
            )
    if target.is_dir():
        _check_existing(target, shown, kind, overwrite, what, flag, owned)
        # a save replaces its folder whole (a rename): never the one the user is in, a parent of it, or home, even
        # when it is empty, ours, or overwrite is given
        if any(_contains(target, kept) for kept in _never_replaced()) or target == Path(target.anchor):
            raise OutputFolderError(
                f"{what} {shown!r} is the current folder, a parent of it or your home folder: it is never replaced"
                f"{f', even with {flag}' if flag else ''}. Name a sub-folder instead (e.g. "
                f"{shown.rstrip('/') + '/pruned'!r})."
            )
    _check_writable(target, shown, what)
    return target


def _check_existing(target: Path, shown: str, kind: str, overwrite: bool, what: str, flag: str | None,
                    owned: Callable[[str], bool] | None) -> None:
    entries = [p.name for p in target.iterdir()]
    if not entries:
        return
    if overwrite:
        return
    marker = read_marker(target)
    if marker is None:
        raise OutputFolderError(
            f"{what} {shown!r} already holds files that optimum-recon did not write ({_some(entries)}). Choose a new "
            f"or empty folder{f', or pass {flag} to replace the folder and everything in it' if flag else ''}."
        )
    if marker["kind"] != kind:
        raise OutputFolderError(
            f"{what} {shown!r} holds a {marker['kind']} written by optimum-recon, not a {kind}. Choose another "
            f"folder{f', or pass {flag} to replace it' if flag else ''}."
        )
    if owned is not None:
        extra = [name for name in _listing(target) if name != MARKER and not owned(name)]
    elif not isinstance(marker["files"], dict) or not all(
            isinstance(r, dict) and "sha256" in r for r in marker["files"].values()):
        raise OutputFolderError(
            f"{what} {shown!r} has an optimum-recon marker ({MARKER}) without the hash of every file it lists (one "
            "written by hand, or by an older version), so its files cannot be told from yours. Move your files out "
            f"and delete the folder, or choose another folder{f', or pass {flag} to replace it' if flag else ''}."
        )
    else:
        extra = foreign_entries(target, marker)
    if extra:
        raise OutputFolderError(
            f"{what} {shown!r} was written by optimum-recon but now also holds things it did not write "
            f"({_some(extra)}); they would be lost. Move them out or choose another folder"
            f"{f', or pass {flag} to replace it' if flag else ''}."
        )


def check_output_file(path: str | os.PathLike, *, overwrite: bool, what: str, ours: Callable[[Any], bool],
                      writer: str = "optimum-recon") -> Path:
    """The same contract for a single JSON file: a new file, or one whose content ``ours`` recognises as written by
    ``writer``; anything else only with ``overwrite``. Its folder must exist."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise OutputFolderError(f"{what} {str(path)!r} is a folder: name a file.")
    if not target.resolve().parent.is_dir():
        raise OutputFolderError(f"{what} {str(path)!r}: the folder {str(target.resolve().parent)!r} does not exist.")
    if target.exists() and not overwrite:
        try:
            recognised = ours(json.loads(target.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            recognised = False
        if not recognised:
            raise OutputFolderError(f"{what} {str(path)!r} already exists and was not written by {writer}; choose "
                                    "another file, or pass --overwrite to replace it.")
    return target


def _check_writable(target: Path, shown: str, what: str) -> None:
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise OutputFolderError(f"{what} {shown!r} cannot be created: {str(existing)!r} is a file.")
    # the save writes a sibling of the target, so the parent must be writable too; a real probe (not os.access),
    # which also catches read-only filesystems and holds for root
    probe = existing if existing != target else target.parent
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".optimum-recon-probe-", dir=probe))
    except OSError as err:
        raise OutputFolderError(f"{what} {shown!r} cannot be written: {err.strerror or err} in {str(probe)!r}. "
                                "Choose a folder you can write to.") from None


def _some(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# --- partial folders of interrupted saves --------------------------------------------------------------------
def _is_ours_partial(path: Path) -> bool:
    return path.name.startswith(".") and ".partial-" in path.name and (path / PARTIAL_MARKER).is_file()


def _alive(info: dict) -> bool:
    if info.get("host") != socket.gethostname():
        return True  # another machine's save into a shared folder: never ours to judge
    pid = info.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)  # PermissionError: it exists, owned by someone else (alive)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_partials(parent: str | os.PathLike, name: str) -> list[Path]:
    """Remove the ``.<name>.partial-*`` siblings left by killed saves of ``name`` (only ours, only dead ones)."""
    parent = Path(parent)
    removed = []
    if not parent.is_dir():
        return removed
    for path in parent.glob(f".{name}.partial-*"):
        if not _is_ours_partial(path):
            continue
        try:
            info = json.loads((path / PARTIAL_MARKER).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not _alive(info):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
            logger.info("removed %s, left by an interrupted save", path)
    return removed


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike,
    *,
    kind: str = "model",
    overwrite: bool = False,
    protect: Iterable[str | os.PathLike | None] = (),
    what: str = "output folder",
) -> Iterator[Path]:
    """Yield a temporary folder that becomes ``target`` when the block finishes without error.

    ``target`` is checked first (`check_output_dir`). The temporary folder is a hidden sibling, so the final
    step is two renames on one filesystem; a failure leaves the old folder untouched and removes the partial one.
    The marker (kind and files) is written last, just before the rename.
    """
    target = check_output_dir(target, kind=kind, overwrite=overwrite, protect=protect, what=what)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target.parent, target.name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the saved model should not be
    try:
        (tmp / PARTIAL_MARKER).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}),
                                            encoding="utf-8")
        yield tmp
        (tmp / PARTIAL_MARKER).unlink()
        write_marker(tmp, kind)
        backup = None
        if target.exists():
            backup = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, backup)
        os.replace(tmp, target)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(err):
            raise OSError(
                errno.ENOSPC,
                f"no space left on the device while saving to {str(target)!r}; nothing was replaced. Free space "
                "(about twice the model's size on disk is needed during the save) or choose another folder.",
            ) from err
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` reports a full disk: an `OSError` with ENOSPC, or the text of one wrapped by a library that
    raises its own type (safetensors' ``SafetensorError`` says "No space left on device (os error 28)")."""
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    text = str(err)
    return "No space left on device" in text or "os error 28" in text


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested dict / list / tuple) structure: what saving it needs on disk, roughly."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def write_error(err: Exception, path: str | os.PathLike, needed: int, what: str, hint: str) -> Exception:
    """A failed write as an `OSError` that names the file, the bytes it needs and the bytes free, or ``err`` itself
    when it is not a write failure.

    ``torch.save`` reports a full disk as a bare ``RuntimeError`` from its C++ writer ("unexpected pos ...",
    "basic_ios::clear: iostream error"), which says neither where nor why; an `OSError` keeps its errno."""
    path = Path(path)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    io_failure = isinstance(err, OSError) or disk_full(err) or any(
        s in str(err) for s in ("unexpected pos", "iostream error", "file write failed"))
    if not io_failure and (free is None or free >= needed):
        return err
    space = f"it needs about {needed / 2**20:,.0f} MiB"
    if free is not None:
        space += f" and {free / 2**20:,.0f} MiB are free on that disk"
    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[-1][:200]
    code = errno.ENOSPC if free is not None and free < needed else getattr(err, "errno", None) or errno.EIO
    return OSError(code, f"cannot write {what} to {path} ({reason}); {space}. {hint}")
