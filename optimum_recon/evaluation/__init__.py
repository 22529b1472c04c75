"""Judging a pruned model: perplexity, zero-shot tasks (lm-eval), latency, and side-by-side comparison.

`lm-eval` is an optional extra (``pip install 'optimum-recon[eval]'``); everything else needs only the core
dependencies. Each submodule is imported on first use, so ``import optimum_recon`` stays light.
"""

from __future__ import annotations

from .perplexity import DEFAULT_EVAL_SEQ_LEN, PerplexityResult, evaluate_perplexity, model_context, perplexity_of_ids

__all__ = [
    "DEFAULT_EVAL_SEQ_LEN",
    "PerplexityResult",
    "evaluate_perplexity",
    "model_context",
    "perplexity_of_ids",
]
