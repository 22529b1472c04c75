"""Calibration windows and data sources (local files, known names, offline behaviour)."""

from __future__ import annotations

import json

import pytest
import torch

from optimum_recon import CalibrationConfig
from optimum_recon.data import DataSourceError, load_documents, load_eval_text, sample_calibration_windows


def test_windows_shape_and_seed(tiny_tokenizer, text_file):
    config = CalibrationConfig(source=str(text_file), num_samples=6, seq_len=16, seed=0)
    a = sample_calibration_windows(tiny_tokenizer, config)
    b = sample_calibration_windows(tiny_tokenizer, config)
    c = sample_calibration_windows(tiny_tokenizer, CalibrationConfig(source=str(text_file), num_samples=6,
                                                                     seq_len=16, seed=1))
    assert a.shape == (6, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_windows_are_crops_of_documents(tiny_tokenizer):
    docs = ["the quick brown fox " * 20, "lazy dog " * 3]
    ids = sample_calibration_windows(tiny_tokenizer, CalibrationConfig(num_samples=5, seq_len=8), docs)
    full = tiny_tokenizer(docs[0]).input_ids
    for row in ids.tolist():
        assert any(full[i : i + 8] == row for i in range(len(full) - 8))  # only the long document qualifies


def test_short_documents_fall_back_to_one_stream(tiny_tokenizer):
    docs = ["the quick brown fox"] * 50
    with pytest.warns(UserWarning, match="one stream"):
        ids = sample_calibration_windows(tiny_tokenizer, CalibrationConfig(num_samples=3, seq_len=20), docs)
    assert ids.shape == (3, 20)


def test_text_shorter_than_seq_len_is_an_error(tiny_tokenizer):
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="not more than seq_len=500"):
        sample_calibration_windows(tiny_tokenizer, CalibrationConfig(num_samples=2, seq_len=500), ["a dog"])


def test_local_formats(tmp_path):
    import datasets

    rows = [{"text": f"document {i}", "other": i} for i in range(4)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "d.txt").write_text("document 0\ndocument 1\n\ndocument 3\n")
    expected = [r["text"] for r in rows]
    assert load_documents(str(tmp_path / "d.jsonl")) == expected
    assert load_documents(str(tmp_path / "d.parquet")) == expected
    assert load_documents(str(tmp_path / "saved")) == expected
    assert load_documents(str(tmp_path / "d.txt")) == ["document 0", "document 1", "", "document 3"]
    with pytest.raises(DataSourceError, match="no column 'body'"):
        load_documents(str(tmp_path / "d.jsonl"), text_column="body")


def test_missing_local_file_is_named(tmp_path):
    with pytest.raises(DataSourceError, match="does not exist"):
        load_documents(str(tmp_path / "nope.jsonl"))


def test_unreachable_hub_dataset_says_how_to_pass_a_local_file():
    with pytest.raises(DataSourceError, match=r"could not load 'someone/some-dataset'.*local \.txt/\.jsonl"):
        load_documents("someone/some-dataset")


def test_known_name_offline_falls_back_to_the_bundled_copy_with_a_warning():
    with pytest.warns(UserWarning, match="bundled"):
        docs = load_documents("c4")
    assert len(docs) == 300 and all(docs)
    with pytest.raises(DataSourceError, match="could not load 'ptb"):
        load_documents("ptb", "test")


def test_data_dir_is_used_for_known_names(shared_data, monkeypatch):
    monkeypatch.setenv("OPTIMUM_RECON_DATA_DIR", str(shared_data))
    lines = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 4358
    assert load_eval_text("wikitext2") == "\n\n".join(lines)
    assert len(load_documents("c4")) == 1000


def test_bundled_wikitext_equals_the_shared_copy(shared_data):
    with pytest.warns(UserWarning, match="bundled"):
        text = load_eval_text("wikitext2")
    lines = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8").splitlines()
    assert text == "\n\n".join(lines)
