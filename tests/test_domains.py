"""Other domains' data through the column mapping: small local files shaped like each domain preset's dataset."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from flowertune_llm.client.data import ColumnMapping, DatasetSourceError, load_client_data, to_prompt_completion
from flowertune_llm.client.model import load_tokenizer
from flowertune_llm.client.preflight import check_training_data
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.shared.settings import parse_config

from conftest import REPO_ROOT, default_run_config, preset_run_config

# One record shaped like each domain preset's dataset (its columns, and what sits in them).
DOMAIN_RECORDS = {
    "medical-flashcards": {
        "instruction": "Answer this question truthfully",
        "input": "What is the mechanism of action of aspirin?",
        "output": "It irreversibly inhibits cyclooxygenase.",
    },
    "finance-sentiment": {
        "input": "Shares of the company rose 5% after strong quarterly results.",
        "output": "positive",
        "instruction": "What is the sentiment of this news? Please choose an answer from {negative/neutral/positive}.",
    },
    "code-alpaca": {
        "instruction": "Write a Python function that returns the square of a number.",
        "input": "",
        "output": "def square(x):\n    return x * x",
    },
}


def _write_jsonl(path, record, copies=20):
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(copies)), encoding="utf-8")
    return path


@pytest.mark.parametrize("domain", sorted(DOMAIN_RECORDS))
def test_domain_preset_mapping_reads_a_file_shaped_like_its_dataset(domain, tmp_path):
    record = DOMAIN_RECORDS[domain]
    data_file = _write_jsonl(tmp_path / f"{domain}.jsonl", record)
    # The domain preset as shipped, on the local file and the tiny model (no hub here).
    config = parse_config(preset_run_config(REPO_ROOT / "presets" / f"{domain}.toml", **{
        "dataset.name": str(data_file), "model.name": "builtin:tiny-llama", "train.seq-length": 256,
    }))
    check_training_data(config, load_tokenizer(config.model))
    train, _ = load_client_data(config.dataset, partition_id=0, num_partitions=2)
    assert len(train) == 10
    assert train[0] == {
        "prompt": alpaca_prompt(record["instruction"], record["input"]),
        "completion": record["output"],
    }


def test_differently_named_columns_are_mapped(tmp_path):
    # Question/answer data with no instruction column name in common with Alpaca.
    data_file = _write_jsonl(tmp_path / "qa.jsonl", {"qtype": "symptoms", "Question": "What are the symptoms of flu?",
                                                     "Answer": "Fever, cough and aches."})
    config = parse_config(default_run_config(**{
        "dataset.name": str(data_file), "dataset.instruction-column": "Question",
        "dataset.input-column": "", "dataset.response-column": "Answer",
    }))
    check_training_data(config, load_tokenizer(config.model))
    train, _ = load_client_data(config.dataset, partition_id=1, num_partitions=2)
    assert train[0] == {"prompt": alpaca_prompt("What are the symptoms of flu?"), "completion": "Fever, cough and aches."}


def test_label_columns_become_text():
    records = Dataset.from_list([{"sentence": "Profit fell.", "label": 0}])
    converted = to_prompt_completion(records, ColumnMapping(instruction="sentence", input="", response="label"))
    assert converted[0] == {"prompt": alpaca_prompt("Profit fell."), "completion": "0"}


def test_a_configured_column_that_is_missing_is_named(tmp_path):
    data_file = _write_jsonl(tmp_path / "qa.jsonl", {"Question": "q?", "Answer": "a."})
    config = parse_config(default_run_config(**{
        "dataset.name": str(data_file), "dataset.instruction-column": "Question", "dataset.input-column": "context",
        "dataset.response-column": "Answer",
    }))
    with pytest.raises(DatasetSourceError, match=r"no column 'context' \(dataset.input-column\); their columns are \['Answer', 'Question'\]"):
        check_training_data(config, load_tokenizer(config.model))


def test_column_names_are_validated_at_start_up():
    with pytest.raises(ValueError, match="dataset.instruction-column must be a column name"):
        parse_config(default_run_config(**{"dataset.instruction-column": ""}))
