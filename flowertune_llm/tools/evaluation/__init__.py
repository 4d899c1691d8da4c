"""Benchmark evaluation of a trained adapter: the FlowerTune leaderboard's suites and lm-evaluation-harness.

`flowertune evaluate ADAPTER --suite general-nlp` (see flowertune_llm/tools/cli.py and docs/evaluation.md).
`suites.py` is the one registry of suites and datasets; `sources.py` loads a dataset from the hub or
a local file; `prompts.py` turns its rows into prompts and gold answers as the reference does;
`generation.py` runs the model; `scoring.py` extracts answers and scores them; `sandbox.py` runs
generated programs; `lm_eval_bridge.py` hands the adapter to lm-evaluation-harness; `report.py`
prints the table and writes the JSON; `runner.py` puts these together.
"""
