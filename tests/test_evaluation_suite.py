"""Zero-shot tasks through the real lm-eval harness (a local task), latency, and `compare`."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
from optimum_recon.cli import main
from optimum_recon.evaluation.latency import measure_latency

pytest.importorskip("lm_eval", reason="the eval extra (lm-eval) is part of the dev install")

DOCS = [  # question, choices, label: a made-up multiple-choice task over the tiny tokenizer's words
    ("the quick brown fox jumps over the", ["lazy dog", "river", "old mill"], 0),
    ("a cat sat on the", ["mat", "farmer kept his sheep", "birds"], 0),
    ("the farmer kept his", ["sheep", "fox", "cat sat"], 0),
    ("watched the birds fly across the", ["river", "mat", "dog"], 0),
    ("towards the old", ["mill", "quick fox", "sheep"], 0),
    ("the lazy", ["dog", "birds fly", "river"], 1),
    ("jumps over the lazy dog while a", ["cat", "mill", "farmer"], 2),
    ("the birds fly across the river towards the", ["old mill", "sheep", "cat"], 1),
]


@pytest.fixture
def local_task(tmp_path):
    """An lm-eval multiple-choice task defined the way the harness supports custom tasks: YAML over local JSONL."""
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "tiny_choice.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "choices": c, "label": lab}) for q, c, lab in DOCS) + "\n")
    (folder / "tiny_choice.yaml").write_text(
        "task: tiny_choice\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def _by_hand(model, tokenizer, docs):
    """Accuracy and length-normalized accuracy computed directly: sum of the choice's token log-probabilities."""
    correct = correct_norm = 0
    with torch.no_grad():
        for question, choices, label in docs:
            scores = []
            for choice in choices:
                continuation = " " + choice
                context_ids = tokenizer(question, add_special_tokens=False).input_ids
                whole = tokenizer(question + continuation, add_special_tokens=False).input_ids
                target = whole[len(context_ids):]
                logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].float()
                logprobs = torch.log_softmax(logits, -1)[len(context_ids) - 1:]
                scores.append(float(logprobs[torch.arange(len(target)), torch.tensor(target)].sum()))
            correct += max(range(len(choices)), key=lambda i: scores[i]) == label
            norm = [s / len(" " + c) for s, c in zip(scores, choices)]
            correct_norm += max(range(len(choices)), key=lambda i: norm[i]) == label
    return correct / len(docs), correct_norm / len(docs)


def test_local_task_accuracy_matches_the_hand_computation(tiny_model_dir, local_task):
    from optimum_recon.evaluation.zero_shot import evaluate_zero_shot

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    results = evaluate_zero_shot(model, tokenizer, "tiny_choice", include_path=local_task, batch_size=3)
    acc, acc_norm = _by_hand(model, tokenizer, DOCS)
    result = results["tiny_choice"]
    assert result.num_samples == len(DOCS)
    assert result.accuracy == pytest.approx(acc)
    assert result.metrics["acc_norm"] == pytest.approx(acc_norm)
    limited = evaluate_zero_shot(model, tokenizer, ["tiny_choice"], include_path=local_task, limit=3)["tiny_choice"]
    assert limited.num_samples == 3
    assert limited.accuracy == pytest.approx(_by_hand(model, tokenizer, DOCS[:3])[0])


def test_the_pruned_weights_are_scored_not_a_reload(tiny_model_dir, local_task):
    """lm-eval gets the live model: after its weights change, its scores are those of the changed weights."""
    from optimum_recon.evaluation.zero_shot import evaluate_zero_shot

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    before = _by_hand(model, tokenizer, DOCS)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every token equally likely: the choice with the fewest tokens wins
    after = _by_hand(model, tokenizer, DOCS)
    assert after != before  # the two models are distinguishable on this task
    result = evaluate_zero_shot(model, tokenizer, "tiny_choice", include_path=local_task)["tiny_choice"]
    assert (result.accuracy, result.metrics["acc_norm"]) == pytest.approx(after)


def test_unknown_task_and_missing_harness_are_clear(tiny_model_dir, local_task, monkeypatch):
    from optimum_recon.evaluation.zero_shot import evaluate_zero_shot, parse_tasks

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ValueError, match="tiny_choice"):
        evaluate_zero_shot(model, tokenizer, "tiny_choise", include_path=local_task)
    assert parse_tasks("paper,boolq") == ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
                                          "openbookqa"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match=r"optimum-recon\[eval\]"):
        evaluate_zero_shot(model, tokenizer, "tiny_choice")


def test_latency_is_positive_and_respects_warmup_and_repeats(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = []
    real = model.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        return real(*args, **kwargs)

    model.generate = counting
    result = measure_latency(model, prompt_tokens=16, new_tokens=5, batch_size=2, warmup=2, repeats=3)
    assert calls == [5] * 5
    assert len(result.prefill_seconds) == len(result.decode_seconds) == 3
    assert all(t > 0 and math.isfinite(t) for t in result.prefill_seconds + result.decode_seconds)
    assert result.prefill_tokens_per_s > 0 and math.isfinite(result.decode_tokens_per_s)
    assert result.to_dict()["decode_tokens_per_s"] == result.decode_tokens_per_s
    for bad in (dict(new_tokens=1), dict(repeats=0), dict(warmup=-1), dict(prompt_tokens=200, new_tokens=100)):
        with pytest.raises(ValueError):
            measure_latency(model, **bad)


@pytest.fixture
def three_models(tiny_model_dir, text_file, tmp_path):
    """The dense tiny model and two pruned versions saved by optimum-recon (LR Wanda, BR SparseGPT)."""
    paths = [str(tiny_model_dir)]
    for name, method, reconstruction in (("lr", "wanda", "layer"), ("br", "sparsegpt", "block")):
        config = PruningConfig(method=method, reconstruction=reconstruction, epochs=1, batch_size=4,
                               calibration=CalibrationConfig(source=str(text_file), num_samples=8, seq_len=32))
        pruner = ReconPruner.from_pretrained(str(tiny_model_dir), config=config)
        pruner.prune(progress=False)
        paths.append(str(pruner.save_pretrained(tmp_path / name)))
    return paths


def test_compare_writes_the_table_json_and_plots(three_models, text_file, local_task, tmp_path):
    from optimum_recon.evaluation.compare import compare_models

    out = tmp_path / "cmp"
    comparison = compare_models(three_models, datasets=[str(text_file)], tasks="tiny_choice", include_path=local_task,
                                eval_seq_len=32, latency_kwargs=dict(prompt_tokens=8, new_tokens=3, repeats=2),
                                output_dir=out, progress=False)
    assert [m.name for m in comparison.models] == ["tiny-llama", "lr", "br"]
    dense, lr, br = comparison.models
    assert dense.sparsity == 0 and lr.sparsity == pytest.approx(0.5, abs=0.01) and br.sparsity == pytest.approx(0.5,
                                                                                                              abs=0.01)
    assert dense.report is None and lr.report.blocks and br.report.config["reconstruction"] == "block"
    assert all(m.size_bytes and m.size_bytes > 0 for m in comparison.models)
    data = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in data["models"]] == ["tiny-llama", "lr", "br"]
    assert data["models"][2]["reconstruction"]["final_error"] == br.report.blocks[-1].error
    assert all(m["latency"]["decode_tokens_per_s"] > 0 for m in data["models"])
    assert data["models"][0]["perplexity"][str(text_file)] != data["models"][1]["perplexity"][str(text_file)]
    table = (out / "comparison.md").read_text()
    assert table.count("\n") == 5 and "tiny_choice acc" in table and "50.0%" in table
    for png in ("perplexity.png", "block_errors.png", "training_3.png"):  # the guarded BR model's curves
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "training_2.png").exists()  # LR trains nothing


def test_cli_eval_records_results_in_the_card_and_compare_runs(three_models, text_file, local_task, tmp_path,
                                                               capsys):
    pruned = three_models[1]
    assert main(["eval", "--model", pruned, "--dataset", str(text_file), "--eval-seq-len", "32", "--tasks",
                 "tiny_choice", "--include-path", str(local_task), "--limit", "4", "--latency",
                 "--latency-prompt-tokens", "8", "--latency-new-tokens", "3", "--json", str(tmp_path / "e.json"),
                 "--update-card", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "tiny_choice: acc" in printed and "decode" in printed
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["tasks"]["tiny_choice"]["num_samples"] == 4
    card = (tmp_path / "lr" / "README.md").read_text()
    assert "Zero-shot accuracy" in card and "| tiny_choice | not measured | " in card
    report = json.loads((tmp_path / "lr" / "pruning_report.json").read_text())
    assert report["zero_shot"]["tiny_choice"]["pruned"] == result["tasks"]["tiny_choice"]["metrics"]["acc"]
    # published by its base name, with how it was measured
    assert report["perplexity"]["text.txt"]["pruned"] == result["results"][str(text_file)]["perplexity"]
    assert report["evaluation"]["text.txt"]["pruned"]["seq_len"] == 32 and str(tmp_path) not in card

    assert main(["compare", *three_models, "--names", "dense", "lr", "br", "--datasets", str(text_file),
                 "--eval-seq-len", "32", "--no-latency", "--output", str(tmp_path / "c"), "--no-progress"]) == 0
    assert "| dense | 0.0% |" in capsys.readouterr().out
    assert (tmp_path / "c" / "comparison.md").is_file() and (tmp_path / "c" / "block_errors.png").is_file()
    assert main(["eval", "--model", pruned, "--dataset", "none"]) == 2  # nothing to evaluate: a clear error
