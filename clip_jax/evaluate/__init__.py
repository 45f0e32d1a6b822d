"""Evaluation: zero-shot classification, image-text retrieval, linear probe, prompt registry.

`run_zeroshot` is what the trainer's in-loop evaluation calls; `python -m clip_jax.evaluate`
is the command line (see clip_jax/evaluate/__main__.py): one task (runner.py), or a suite of
them with a summary table and chart (suite.py, summary.py); few-shot probes in fewshot.py.
"""
from clip_jax.evaluate.features import compute_features, run_zeroshot
from clip_jax.evaluate.linear_probe import linear_probe
from clip_jax.evaluate.retrieval import retrieval_metrics
from clip_jax.evaluate.zeroshot import ClassifierCache, build_classifier, zeroshot_metrics
