"""Resolving a data source (a known name, a Hub dataset id or a local file/folder) to text.

Known names and where they come from, in order:

* ``$OPTIMUM_RECON_DATA_DIR`` when set: a folder laid out like ``c4/c4-train.00000-of-01024*.jsonl``,
  ``c4/c4-validation.00000-of-00008*.json*``, ``wikitext-2-raw/wiki.{test,valid,train}.raw``,
  ``ptb/ptb.{test,train}.txt``;
* the Hugging Face Hub through `datasets.load_dataset` (the same files the papers use);
* a small copy bundled with this package (WikiText-2 test; 300 C4 train documents), with a warning, when
  the Hub cannot be reached.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import warnings
from pathlib import Path

logger = logging.getLogger(__name__)

BUNDLED_DIR = Path(__file__).parent / "bundled"
DATA_DIR_ENV = "OPTIMUM_RECON_DATA_DIR"
LOCAL_SUFFIXES = (".txt", ".raw", ".jsonl", ".json", ".parquet", ".csv")

# name -> split -> (Hub loader kwargs, text column, glob under $OPTIMUM_RECON_DATA_DIR, bundled file)
_KNOWN = {
    "c4": {
        "train": (dict(path="allenai/c4", data_files={"train": "en/c4-train.00000-of-01024.json.gz"}, split="train"),
                  "text", "c4/c4-train.00000-of-01024*.json*", "c4-train-sample.jsonl"),
        "validation": (dict(path="allenai/c4", data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
                            split="validation"), "text", "c4/c4-validation.00000-of-00008*.json*", None),
    },
    "wikitext2": {
        split: (dict(path="wikitext", name="wikitext-2-raw-v1", split=split), "text",
                f"wikitext-2-raw/wiki.{raw}.raw", "wikitext-2-raw-test.txt" if split == "test" else None)
        for split, raw in (("train", "train"), ("validation", "valid"), ("test", "test"))
    },
    "ptb": {
        split: (dict(path="ptb_text_only", name="penn_treebank", split=split), "sentence", f"ptb/ptb.{split}.txt", None)
        for split in ("train", "validation", "test")
    },
}


class DataSourceError(ValueError):
    """A dataset that cannot be loaded; the message says what to pass instead."""


def _read_local(path: str, text_column: str | None) -> list[str]:
    """Documents of a local file or saved dataset folder. Text files are one document per line group."""
    try:
        return _read_local_unchecked(path, text_column)
    except UnicodeDecodeError as err:
        raise DataSourceError(f"{path!r} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset "
                              f"{err.start}): pass a text, JSON Lines or parquet file.") from None
    except json.JSONDecodeError as err:
        raise DataSourceError(f"{path!r} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}.") \
            from None
    except IsADirectoryError:
        raise DataSourceError(f"{path!r} is a folder but not a dataset saved with save_to_disk.") from None
    except PermissionError:
        raise DataSourceError(f"{path!r} cannot be read: permission denied.") from None


def _read_local_unchecked(path: str, text_column: str | None) -> list[str]:
    if os.path.isdir(path):
        import datasets

        try:
            ds = datasets.load_from_disk(path)
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise DataSourceError(f"{path!r} is a folder but not a dataset saved with save_to_disk: {err}") from err
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[next(iter(ds))]
        return _column(ds, text_column, path)
    suffix = Path(path).suffix.lower()
    if suffix in (".txt", ".raw"):
        with open(path, encoding="utf-8") as fh:
            # One row per line, exactly like the Hub's text loader (empty lines kept as "").
            return fh.read().splitlines()
    if suffix == ".jsonl" or (suffix == ".json" and _looks_like_jsonl(path)):
        rows = []
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataSourceError(f"{path!r} line {number} is not valid JSON: {err.msg} (column "
                                          f"{err.colno}).") from None
                if not isinstance(rows[-1], dict):
                    raise DataSourceError(f"{path!r} line {number} is a JSON {type(rows[-1]).__name__}, not an "
                                          'object: each line must be an object such as {"text": "..."}.')
        return _column(rows, text_column, path)
    import datasets

    builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(suffix)
    if builder is None:
        raise DataSourceError(f"unsupported file type {suffix!r} for {path!r}: use one of {', '.join(LOCAL_SUFFIXES)}.")
    try:
        ds = datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as err:  # noqa: BLE001 - a malformed file: name it
        raise DataSourceError(f"{path!r} could not be read as {builder} ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:200] if str(err) else ''}).") from err
    return _column(ds, text_column, path)


def _looks_like_jsonl(path: str) -> bool:
    with open(path, encoding="utf-8") as fh:
        first = fh.readline().strip()
    return first.startswith("{") and first.endswith("}")


def _column(rows, text_column: str | None, where: str) -> list[str]:
    if hasattr(rows, "column_names"):
        columns = rows.column_names
        get = lambda col: list(rows[col])  # noqa: E731
    else:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        get = lambda col: [r.get(col) for r in rows]  # noqa: E731
    if not len(rows):
        raise DataSourceError(f"{where!r} holds no rows: it is empty.")
    fix = "name the column that holds the text with text_column= (--text-column on the command line)"
    if text_column is None:
        text_column = "text" if "text" in columns else ("sentence" if "sentence" in columns else None)
        if text_column is None:
            strings = [c for c in columns if any(isinstance(t, str) for t in get(c)[:100])]
            if len(strings) != 1:
                found = f"string columns {strings}" if strings else "no string column"
                raise DataSourceError(f"{where!r} has no 'text' column and {found} (columns: {columns}): {fix}.")
            text_column = strings[0]
    if text_column not in columns:
        raise DataSourceError(f"{where!r} has no column {text_column!r} (columns: {columns}): {fix}.")
    if not hasattr(rows, "column_names"):
        lacking = next((i for i, r in enumerate(rows) if text_column not in r), None)
        if lacking is not None:
            raise DataSourceError(f"{where!r}: row {lacking + 1} has no {text_column!r} field (the other rows have "
                                  "one); fix that row or remove it.")
    texts = get(text_column)
    if not any(isinstance(t, str) and t for t in texts):
        raise DataSourceError(f"{where!r}: column {text_column!r} holds no text: {fix}.")
    missing = sum(1 for t in texts if not isinstance(t, str))
    if missing:
        logger.info("%s: %d of %d rows have no text in column %r; they are skipped", where, missing, len(texts),
                    text_column)
    return [t if isinstance(t, str) else "" for t in texts]


def _from_data_dir(pattern: str, text_column: str) -> list[str] | None:
    root = os.environ.get(DATA_DIR_ENV)
    if not root:
        return None
    matches = sorted(glob.glob(os.path.join(root, pattern)))
    return _read_local(matches[0], text_column) if matches else None


def _from_hub(kwargs: dict, text_column: str | None, label: str) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(**kwargs)
    except Exception as err:  # noqa: BLE001 - offline, missing, gated: all get the same advice
        raise DataSourceError(
            f"could not load {label!r} from the Hugging Face Hub ({type(err).__name__}: {str(err)[:200]}). "
            "If you are offline, pass a local .txt/.jsonl/.parquet file or a saved dataset folder instead "
            f"(or set {DATA_DIR_ENV} to a folder holding local copies)."
        ) from err
    if isinstance(ds, datasets.DatasetDict):
        ds = ds[next(iter(ds))]
    return _column(ds, text_column, label)


def looks_local(source: str) -> bool:
    """Whether ``source`` names a local file (by suffix or path prefix) rather than a dataset."""
    return Path(source).suffix.lower() in LOCAL_SUFFIXES or source.startswith((".", "/", "~"))


def check_source(source: str) -> None:
    """Fail early (before loading a model) when ``source`` is clearly a local file that does not exist."""
    if source not in _KNOWN and not os.path.exists(source) and looks_local(source):
        raise DataSourceError(f"local data file {source!r} does not exist.")


def load_documents(source: str, split: str = "train", text_column: str | None = None) -> list[str]:
    """The documents (rows) of ``source``: a known name, a local file or folder, or a Hub dataset id."""
    return resolve_documents(source, split, text_column)[0]


# where `resolve_documents` read a source: the words a model card uses for it
ORIGINS = {"local": "a local file", "data_dir": f"a local copy (${DATA_DIR_ENV})", "hub": "the Hugging Face Hub",
           "bundled": "the copy bundled with optimum-recon"}


def resolve_documents(source: str, split: str = "train", text_column: str | None = None) -> tuple[list[str], str]:
    """`load_documents`, and where the documents came from: one of `ORIGINS` (a model card says which copy of a
    known dataset was measured: the bundled one is the same text, but only where it is the whole split)."""
    if os.path.exists(source):
        return _read_local(source, text_column), "local"
    if source in _KNOWN:
        if split not in _KNOWN[source]:
            raise DataSourceError(f"{source!r} has no split {split!r}; splits: {', '.join(_KNOWN[source])}.")
        hub_kwargs, column, local_glob, bundled = _KNOWN[source][split]
        docs = _from_data_dir(local_glob, column)
        if docs is not None:
            return docs, "data_dir"
        try:
            return _from_hub(hub_kwargs, column, f"{source} ({split})"), "hub"
        except DataSourceError:
            if bundled is None:
                raise
            warnings.warn(
                f"{source} ({split}) could not be loaded from the Hub; using the copy bundled with optimum-recon "
                f"({bundled}). Set {DATA_DIR_ENV} or pass a local file to choose the data explicitly.",
                stacklevel=2,
            )
            return _read_local(str(BUNDLED_DIR / bundled), column), "bundled"
    check_source(source)
    return _from_hub(dict(path=source, split=split), text_column, source), "hub"


def load_eval_text(name: str, text_column: str | None = None) -> str:
    """The single evaluation string for perplexity (see `eval_text`)."""
    return eval_text(name, text_column)[0]


def eval_text(name: str, text_column: str | None = None) -> tuple[str, dict[str, str | None]]:
    """The single evaluation string for perplexity, following the protocol of SparseGPT/Wanda/the paper, and how
    it was read (``split``, ``origin``, ``selection``: what of the split was joined).

    wikitext2: ``"\\n\\n".join`` of the test rows; ptb: the test sentences joined with spaces; c4: the first
    1,100 validation documents joined with spaces; a local file or Hub dataset: its rows joined with "\\n\\n".
    """
    if name == "wikitext2":
        docs, origin = resolve_documents("wikitext2", "test")
        return "\n\n".join(docs), {"split": "test", "origin": origin, "selection": "all rows"}
    if name == "ptb":
        docs, origin = resolve_documents("ptb", "test")
        return " ".join(docs), {"split": "test", "origin": origin, "selection": "all sentences"}
    if name == "c4":
        docs, origin = resolve_documents("c4", "validation")
        return " ".join(docs[:1100]), {"split": "validation", "origin": origin,
                                       "selection": "the first 1,100 documents of shard 0"}
    if os.path.isfile(name) and Path(name).suffix.lower() in (".txt", ".raw"):
        with open(name, encoding="utf-8") as fh:
            return fh.read(), {"split": None, "origin": "local", "selection": "the whole file"}
    split = "test" if not os.path.exists(name) else "train"
    docs, origin = resolve_documents(name, split, text_column)
    return "\n\n".join(docs), {"split": split, "origin": origin, "selection": "all rows"}
