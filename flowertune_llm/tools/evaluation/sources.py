"""Load an evaluation dataset from the hub or from a local file or folder in its public schema.

A local file stands for the split the reference loads (FiQA: its three splits concatenated); a
local folder is read by `datasets` and keeps its split files (train/validation/test). MMLU comes as
a folder with one file per subject, `<subject>.jsonl` (or .json, .csv, .parquet). The reference's
own selection (FPB's and FiQA's seeded 25% test split) is applied to local data too, so the same
file gives the same examples as the hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from flowertune_llm.tools.evaluation.suites import MMLU_CATEGORIES, DataSource

FILE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The reference's split: `train_test_split(0.25, seed=42)["test"]`.
SPLIT_SEED = 42


class DataError(ValueError):
    """A dataset cannot be loaded, or a local file does not have its schema's columns."""


def _read_file(path: Path, key: str) -> Dataset:
    """Read one local file as a Dataset, refusing an extension `datasets` cannot read."""
    builder = FILE_FORMATS.get(path.suffix.lower())
    if builder is None:
        raise DataError(f"{key}: '{path}' has extension '{path.suffix}'; accepted: {', '.join(FILE_FORMATS)}")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets raises many types for an unreadable file
        raise DataError(f"{key}: cannot read '{path}': {type(error).__name__}: {error}") from error


def check_columns(table: Dataset, source: DataSource, key: str) -> None:
    """Refuse a table that lacks any column the prompts of its dataset read, naming them."""
    missing = [column for column in source.columns if column not in table.column_names]
    if missing:
        raise DataError(
            f"{key}: missing column(s) {', '.join(missing)} of the {source.name} schema "
            f"(needs {', '.join(source.columns)}; found {', '.join(table.column_names) or 'none'})"
        )


def _pick_split(splits: DatasetDict, source: DataSource, key: str) -> Dataset:
    """Return the reference's split (or concatenation) from a local folder's splits."""
    if source.concat:
        present = [splits[name] for name in source.concat if name in splits]
        if present:
            return datasets.concatenate_datasets(present)
    if source.split in splits:
        return splits[source.split]
    if len(splits) == 1:
        return next(iter(splits.values()))
    raise DataError(f"{key}: no '{source.split}' split among {', '.join(splits)}")


def _read_local(path: Path, source: DataSource, key: str) -> Dataset:
    """Read a local file or folder of a (non-MMLU) source as the split the reference uses."""
    if path.is_file():
        return _read_file(path, key)
    try:
        splits = datasets.load_dataset(str(path))
    except Exception as error:
        raise DataError(f"{key}: cannot read the folder '{path}': {type(error).__name__}: {error}") from error
    return _pick_split(splits, source, key)


def _read_hub(source: DataSource, config: str | None, key: str) -> Dataset:
    """Load the reference's split from the hub, turning any failure into advice to use --data."""
    try:
        loaded = datasets.load_dataset(source.hub_id, config, revision=source.revision)
    except Exception as error:  # offline, missing, gated, or a loading script datasets>=4 refuses
        raise DataError(
            f"{key}: cannot load '{source.hub_id}'{f' ({config})' if config else ''} from the Hugging Face Hub "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). Offline or "
            f"air-gapped: download it elsewhere and pass --data {source.name}=PATH, a file with the columns "
            f"{', '.join(source.columns)}."
        ) from error
    return _pick_split(loaded, source, key)


def _select(table: Dataset, source: DataSource) -> Dataset:
    """Apply the reference's selection: a seeded 25% test split where it takes one."""
    if source.test_fraction:
        return table.train_test_split(test_size=source.test_fraction, seed=SPLIT_SEED)["test"]
    return table


def _mmlu_rows(path: Path | None, source: DataSource, key: str) -> list[dict[str, Any]]:
    """Return MMLU's rows of every ranked subject with a `subject` field, from the hub or a folder."""
    subjects = [subject for category in MMLU_CATEGORIES.values() for subject in category]
    if path is not None and not path.is_dir():
        raise DataError(f"{key}: '{path}' is not a folder; MMLU is a folder of <subject>.jsonl files "
                        f"(e.g. {subjects[0]}.jsonl) with the columns {', '.join(source.columns)}")
    rows: list[dict[str, Any]] = []
    for subject in subjects:
        if path is None:
            table = _read_hub(source, subject, key)
        else:
            files = [path / f"{subject}{suffix}" for suffix in FILE_FORMATS]
            found = next((file for file in files if file.is_file()), None)
            if found is None:
                continue
            table = _read_file(found, f"{key} ({found.name})")
        check_columns(table, source, f"{key} ({subject})")
        rows.extend({**row, "subject": subject} for row in table)
    if not rows:
        raise DataError(f"{key}: '{path}' holds no file named after an MMLU subject "
                        f"(e.g. {subjects[0]}.jsonl)")
    return rows


def load_rows(source: DataSource, path: Path | None) -> list[dict[str, Any]]:
    """Return the rows the reference evaluates, from `path` if given, else from the hub."""
    key = f"--data {source.name}={path}" if path is not None else f"dataset {source.name}"
    if path is not None and not path.exists():
        raise DataError(f"{key}: no such file or folder")
    if source.per_subject:
        return _mmlu_rows(path, source, key)
    table = _read_local(path, source, key) if path is not None else _read_hub(source, source.hub_config, key)
    check_columns(table, source, key)
    return list(_select(table, source))


def describe_source(source: DataSource, path: Path | None) -> str:
    """Return where a dataset came from, for the results JSON."""
    if path is not None:
        return str(path.resolve())
    config = f" ({source.hub_config})" if source.hub_config else ""
    return f"hub:{source.hub_id}{config} split {source.split}"
