"""Judge pruned models before picking one: perplexity, zero-shot accuracy (lm-eval), speed, side by side.

Shows: ReconPruner.evaluate_tasks (zero-shot accuracy recorded as dense/pruned in the report and model card),
compare_models (one table, JSON, Markdown and PNG plots for a dense model and pruned versions of it), and a
custom lm-eval task defined by a YAML file over local data.
Full run (the bundled SmolLM2-135M-Instruct, Wanda 50% and 2:4 with LR, WikiText-2 perplexity and speed):
about 10 minutes on 2 CPU cores. Add `--tasks arc_easy,boolq --limit 200` when the Hub is reachable (lm-eval
downloads the task data). `--tiny` runs it all on a tiny random model and a local task in seconds.
Needs the eval extra: pip install 'optimum-recon[eval]'.

    python examples/evaluate_and_compare.py [--model ID_OR_PATH] [--tasks T1,T2] [--limit N] [--output DIR] [--tiny]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from optimum_recon import CalibrationConfig, PruningConfig, ReconPruner
from optimum_recon.evaluation.compare import compare_models


def write_local_task(folder: Path) -> Path:
    """A two-choice task in lm-eval's YAML format over a local JSONL file (how you add your own task)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"question": "the quick brown fox jumps over the", "choices": ["lazy dog", "river"], "label": 0},
            {"question": "a cat sat on the", "choices": ["birds", "mat"], "label": 1},
            {"question": "the farmer kept his", "choices": ["sheep", "mill"], "label": 0}]
    (folder / "fox.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    (folder / "fox.yaml").write_text(
        f"task: fox\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {folder / 'fox.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="default: the bundled SmolLM2-135M-Instruct")
    parser.add_argument("--tasks", default=None, help="lm-eval tasks, e.g. arc_easy,boolq (needs the Hub)")
    parser.add_argument("--limit", type=int, default=None, help="documents per task")
    parser.add_argument("--output", default="outputs/comparison")
    parser.add_argument("--tiny", action="store_true", help="a tiny random model, local text and a local task")
    args = parser.parse_args()

    calibration = CalibrationConfig(source="c4", num_samples=32, seq_len=512)
    datasets, seq_len, max_tokens, include_path = ["wikitext2"], 1024, 16384, None
    latency = dict(prompt_tokens=128, new_tokens=32, repeats=3)
    work = Path(tempfile.mkdtemp(prefix="optimum-recon-compare-"))
    if args.tiny:
        from optimum_recon.testing import save_tiny_model, save_tiny_text

        args.model = str(save_tiny_model(work / "dense"))
        text = str(save_tiny_text(work / "text.txt"))
        calibration = CalibrationConfig(source=text, num_samples=8, seq_len=32)
        datasets, seq_len, max_tokens = [text], 32, None
        latency = dict(prompt_tokens=8, new_tokens=4, repeats=2)
        include_path, args.tasks = str(write_local_task(work / "tasks")), "fox"
        args.output = str(work / "comparison")

    saved = []
    for name, pattern in (("wanda-50", "unstructured"), ("wanda-2of4", "2:4")):
        config = PruningConfig(sparsity=0.5, pattern=pattern, method="wanda", reconstruction="layer",
                               calibration=calibration)
        pruner = ReconPruner.from_pretrained(args.model, config=config)
        if args.tasks:
            pruner.evaluate_tasks(args.tasks, limit=args.limit, include_path=include_path)  # dense accuracy
        pruner.prune()
        if args.tasks:  # pruned accuracy: both end up in the report and the model card's results table
            pruner.evaluate_tasks(args.tasks, limit=args.limit, include_path=include_path)
        saved.append(str(pruner.save_pretrained(work / name)))

    comparison = compare_models([args.model, *saved], names=["dense", "wanda 50%", "wanda 2:4"], datasets=datasets,
                                tasks=args.tasks, limit=args.limit, include_path=include_path, eval_seq_len=seq_len,
                                eval_max_tokens=max_tokens, latency_kwargs=latency, output_dir=args.output)
    print(comparison.to_markdown())
    print(f"measured sparsity: {', '.join(f'{m.name} {m.sparsity:.1%}' for m in comparison.models)}")
    print(f"table, JSON and plots in {args.output}; model card of the first pruned model: {saved[0]}/README.md")


if __name__ == "__main__":
    main()
