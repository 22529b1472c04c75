"""What a published model says about its inputs: names, never the user's local paths.

A prune of ``--model /home/alice/models/x --calibration /home/alice/data/mine.jsonl`` must not publish Alice's
folder names: they are private, and useless to a Hub visitor. Everything a save writes for people to read (the
model card, `pruning_config.json`, `pruning_report.json`) goes through `Provenance`:

* a local input given as an absolute path (or with ``~``) is named by its base name (``x``, ``mine.jsonl``); one
  given as a relative path keeps what the user typed, which says nothing about their machine;
* every local input is recorded as local, a data file with its size and SHA-256, so that the card can say
  "a local file mine.jsonl (sha256 3f2a...)" and anyone holding a copy can check it is the same;
* every other occurrence of those paths in free text (the warnings a run recorded) and of the home folder
  (``~``) is rewritten the same way (`Provenance.scrub`).

The in-memory config keeps the real paths (a resumed prune needs them); only what is written is public.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

from ..calibration_config import CalibrationConfig
from ..configuration import PruningConfig
from ..folders import sha256_of

# A data file this large is named and sized but not hashed (reading it would dominate the save).
_HASH_LIMIT = 4 << 30


def _is_private(value: str) -> bool:
    """Whether ``value`` is a path that says where something lives on this machine (absolute or ``~``)."""
    return value.startswith("~") or os.path.isabs(value)


def _local(value: str | None) -> bool:
    from ..data.sources import looks_local

    return bool(value) and (os.path.exists(os.path.expanduser(value)) or _is_private(value) or looks_local(value))


def public_path(value: str) -> str:
    """``value`` as it may be published: the base name of an absolute (or ``~``) path, else unchanged."""
    if not _is_private(value):
        return value
    return Path(os.path.expanduser(value).rstrip("/\\")).name or value


def public_source(source: str) -> str:
    """A calibration source as it may be published (the ``+self:N`` part kept)."""
    external, plus, rest = source.partition("+self:")
    if external.startswith("self:"):
        return source
    return public_path(external) + plus + rest


def describe_input(value: str) -> dict[str, Any]:
    """The public record of one input: its name, whether it was local, and for a local file its size and hash."""
    if not _local(value):
        return {"name": value, "local": False}
    path = Path(os.path.expanduser(value))
    record: dict[str, Any] = {"name": public_path(value), "local": True,
                              "kind": "folder" if path.is_dir() else "file"}
    if path.is_file():
        size = path.stat().st_size
        record["bytes"] = size
        if size <= _HASH_LIMIT:
            record["sha256"] = sha256_of(path)
    return record


def local_words(record: dict[str, Any] | None) -> str:
    """How the card names a local input: "the local file `mine.txt` (12,345 bytes, sha256 3f2a...)"."""
    if not record or not record.get("local"):
        return ""
    what = "folder" if record.get("kind") == "folder" else "file"
    details = [f"{record['bytes']:,} bytes"] if "bytes" in record else []
    if "sha256" in record:
        details.append(f"sha256 `{record['sha256'][:16]}…`")
    return f"the local {what} `{record['name']}`" + (f" ({', '.join(details)})" if details else "")


def _record(value: str, earlier: dict[str, Any] | None) -> dict[str, Any]:
    """The record of ``value``; an earlier one when it names a local input that is not here to look at again (a
    report rebuilt on another machine names its data file ``mine.txt``, which is not in this folder)."""
    if earlier and _local(value) and not os.path.exists(os.path.expanduser(value)):
        return earlier
    return describe_input(value)


@dataclasses.dataclass
class Provenance:
    """The inputs of a prune as they are published, and the rewrites that keep local paths out of the files."""

    inputs: dict[str, Any]
    replacements: dict[str, str]

    @classmethod
    def of(cls, model_id: str | None, config: PruningConfig | None, evaluated: Iterable[str] = (),
           recorded: dict[str, Any] | None = None, **metadata: Any) -> "Provenance":
        """The provenance of a prune of ``model_id`` with ``config``, evaluated on ``evaluated`` datasets.

        ``recorded``: an earlier record (read back from a saved report), kept for what cannot be looked at again.
        ``config=None`` leaves the calibration record as recorded (a saved folder's recipe names its data file by
        its base name: a file of that name here may be another one).
        ``metadata``: ``base_model``, ``license``, ``datasets`` given by the user (None: inferred or unknown).
        """
        inputs: dict[str, Any] = dict(recorded or {})
        replacements: dict[str, str] = {}
        given = [("model", model_id)]
        if config is not None and config.calibration.external_source is not None:
            given.append(("calibration", config.calibration.external_source))
        for key, value in given:
            if value:
                inputs[key] = _record(value, inputs.get(key))
        evaluation = dict(inputs.get("evaluation") or {})
        for name in evaluated:
            if _local(name):
                evaluation[public_path(name)] = _record(name, evaluation.get(public_path(name)))
        if evaluation:
            inputs["evaluation"] = evaluation
        for key, value in metadata.items():
            if value is not None:
                inputs[key] = value
        for value in [v for _, v in given] + list(evaluated):
            if value and _local(value):
                public = public_path(value)
                for form in {value, os.path.expanduser(value), os.path.abspath(os.path.expanduser(value)),
                             os.path.realpath(os.path.expanduser(value))}:
                    if form != public and (os.path.isabs(form) or form.startswith("~")):
                        replacements[form.rstrip("/")] = public
        home = str(Path.home())
        if len(home) > 1:  # not "/" (a container's root user may have that)
            replacements.setdefault(home, "~")
        return cls(inputs, replacements)

    def scrub(self, value: Any) -> Any:
        """``value`` (a string, or nested dicts and lists of them, keys included) with every local path rewritten."""
        if isinstance(value, str):
            for old in sorted(self.replacements, key=len, reverse=True):  # the longest first: /a/b before /a
                if old in value:
                    value = value.replace(old, self.replacements[old])
            return value
        if isinstance(value, dict):
            return {self.scrub(k): self.scrub(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.scrub(v) for v in value)
        return value

    def public_config(self, config: PruningConfig) -> PruningConfig:
        """``config`` as `pruning_config.json` publishes it: the calibration source by its public name."""
        source = public_source(config.calibration.source)
        if source == config.calibration.source:
            return config
        calibration: CalibrationConfig = dataclasses.replace(config.calibration, source=source)
        return dataclasses.replace(config, calibration=calibration)
