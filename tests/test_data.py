"""Data: the shipped dataset, Alpaca prompts, partitions, held-out split and response-only labels."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset

from flowertune_llm.builtin.world import (
    BUILTIN_DATASET_FILE,
    BUILTIN_HELDOUT_FILE,
    generate_examples,
    generate_heldout,
    write_jsonl,
)
from flowertune_llm.client.data import (
    DatasetSourceError,
    check_dataset_source,
    dataset_source,
    load_client_data,
    to_prompt_completion,
)
from flowertune_llm.client.model import build_peft_model, load_tokenizer
from flowertune_llm.client.preflight import check_node_data
from flowertune_llm.client.training import _trainer
from flowertune_llm.server.evaluator import load_heldout_data
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.shared.settings import ConfigError, NodeSettings, for_node, parse_config, parse_node_config

from conftest import default_run_config


def test_shipped_dataset_is_the_deterministic_generator_output(tmp_path):
    regenerated = tmp_path / "again.jsonl"
    write_jsonl(generate_examples(), regenerated)
    assert regenerated.read_bytes() == BUILTIN_DATASET_FILE.read_bytes()
    records = [json.loads(line) for line in BUILTIN_DATASET_FILE.read_text().splitlines()]
    assert len(records) >= 1000
    assert all(record["instruction"] and record["output"] for record in records)


def test_shipped_heldout_set_is_regenerated_and_asks_nothing_the_clients_see(tmp_path):
    regenerated = tmp_path / "heldout.jsonl"
    write_jsonl(generate_heldout(), regenerated)
    assert regenerated.read_bytes() == BUILTIN_HELDOUT_FILE.read_bytes()
    heldout = [json.loads(line) for line in BUILTIN_HELDOUT_FILE.read_text().splitlines()]
    seen = {(r["instruction"], r["input"]) for r in generate_examples()}
    assert len(heldout) == 180 and not any((r["instruction"], r["input"]) in seen for r in heldout)
    data = load_heldout_data("builtin:tiny-instructions-heldout")
    assert data.column_names == ["category", "prompt", "completion"] and len(data) == 180


def test_alpaca_prompt_with_and_without_input():
    with_input = alpaca_prompt("Add the two numbers.", "2 + 3")
    assert "### Input:\n2 + 3\n\n### Response:\n" in with_input
    without = alpaca_prompt("Name a colour.", "  ")
    assert "### Input" not in without and without.endswith("### Instruction:\nName a colour.\n\n### Response:\n")


def test_records_with_response_column_become_prompt_completion():
    records = Dataset.from_list([{"instruction": "Say hi.", "input": "", "response": "hi"}])
    converted = to_prompt_completion(records)
    assert converted.column_names == ["prompt", "completion"]
    assert converted[0] == {"prompt": alpaca_prompt("Say hi."), "completion": "hi"}


def test_records_without_output_column_are_refused():
    with pytest.raises(DatasetSourceError, match="no column 'output' \\(dataset.response-column\\); their columns are \\['answer', 'instruction'\\]"):
        to_prompt_completion(Dataset.from_list([{"instruction": "x", "answer": "y"}]))


def test_dataset_sources(tmp_path):
    assert dataset_source("builtin:tiny-instructions") == ("json", str(BUILTIN_DATASET_FILE))
    assert dataset_source("vicgalle/alpaca-gpt4") == ("vicgalle/alpaca-gpt4", None)
    csv_file = tmp_path / "data.csv"
    csv_file.write_text("instruction,output\nx,y\n")
    assert dataset_source(str(csv_file)) == ("csv", str(csv_file))
    assert dataset_source(str(tmp_path)) == (str(tmp_path), None)
    with pytest.raises(DatasetSourceError, match="no such file or folder"):
        dataset_source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetSourceError, match="suffix '.txt'"):
        dataset_source(str(tmp_path / "notes.txt"))


def test_unreachable_hub_dataset_fails_with_advice():
    with pytest.raises(DatasetSourceError, match=r"cannot reach 'vicgalle/alpaca-gpt4'.*builtin:tiny-instructions"):
        check_dataset_source("vicgalle/alpaca-gpt4")
    check_dataset_source("builtin:tiny-instructions")


def test_partitions_are_disjoint_and_cover_the_data(config):
    parts = [load_client_data(config.dataset, pid, 3) for pid in range(3)]
    prompts = [set(zip(t["prompt"], t["completion"])) | set(zip(v["prompt"], v["completion"])) for t, v in parts]
    sizes = [len(t) + len(v) for t, v in parts]
    assert sum(sizes) == len(generate_examples()) and max(sizes) - min(sizes) <= 1
    # Every question is asked once in the built-in data, so the partitions are disjoint sets.
    assert sum(map(len, prompts)) == len(set().union(*prompts)) == len(generate_examples())
    assert all(abs(len(v) - 0.1 * (len(t) + len(v))) <= 1 for t, v in parts)


def test_validation_split_is_deterministic(config):
    first = load_client_data(config.dataset, 1, 2)[1]
    again = load_client_data(config.dataset, 1, 2)[1]
    assert first["completion"] == again["completion"]


def test_local_jsonl_file_works_as_dataset(tmp_path):
    path = tmp_path / "mine.jsonl"
    write_jsonl(generate_examples(40, seed=1), path)
    config = parse_config(default_run_config(**{"dataset.name": str(path)}))
    train, val = load_client_data(config.dataset, 0, 2)
    assert len(train) + len(val) == 20


def test_node_config_gives_a_partition_or_the_nodes_own_file():
    assert parse_node_config({"partition-id": 1, "num-partitions": 4}) == NodeSettings("", 1, 4)
    assert parse_node_config({"data-path": "/data/mine.jsonl"}) == NodeSettings("/data/mine.jsonl", 0, 1)
    assert parse_node_config({"data-path": "/d.jsonl", "partition-id": 1, "num-partitions": 2}) == NodeSettings("/d.jsonl", 1, 2)
    assert parse_node_config({"data-path": "/d.jsonl", "quantized-cache-dir": "/cache"}).quantized_cache_dir == "/cache"
    with pytest.raises(ConfigError, match="this SuperNode has no data.*data-path="):
        parse_node_config({})
    with pytest.raises(ConfigError, match="partition-id must be in"):
        parse_node_config({"partition-id": 4, "num-partitions": 4})
    with pytest.raises(ConfigError, match="must both be given"):
        parse_node_config({"data-path": "/d.jsonl", "partition-id": 1})
    with pytest.raises(ConfigError, match="data-path must be a string"):
        parse_node_config({"data-path": 3})
    with pytest.raises(ConfigError, match="quantized-cache-dir must be a string"):
        parse_node_config({"partition-id": 0, "num-partitions": 1, "quantized-cache-dir": True})


def test_node_trains_on_its_own_file_not_on_dataset_name(tmp_path, config):
    path = tmp_path / "node.jsonl"
    write_jsonl(generate_examples(50, seed=7), path)
    node = parse_node_config({"data-path": str(path), "quantized-cache-dir": str(tmp_path / "cache")})
    check_node_data(node)
    node_config = for_node(config, node)
    assert node_config.dataset.name == str(path) and node_config.model.quantized_cache_dir == str(tmp_path / "cache")
    assert config.dataset.name == "builtin:tiny-instructions"  # the run's own settings are untouched
    train, val = load_client_data(node_config.dataset, node.partition_id, node.num_partitions)
    assert (len(train), len(val)) == (45, 5)
    own = {(alpaca_prompt(r["instruction"], r["input"]), r["output"]) for r in generate_examples(50, seed=7)}
    assert set(zip(train["prompt"], train["completion"])) <= own
    # A simulated node is unchanged: its slice of dataset.name.
    simulated = parse_node_config({"partition-id": 0, "num-partitions": 3})
    assert for_node(config, simulated) == config


def test_unreadable_node_data_file_is_named(tmp_path):
    with pytest.raises(DatasetSourceError, match="node config data-path: no such file"):
        check_node_data(NodeSettings(str(tmp_path / "missing.jsonl")))
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DatasetSourceError, match="node config data-path: .* is empty"):
        check_node_data(NodeSettings(str(tmp_path / "empty.jsonl")))


def test_labels_mask_the_prompt_and_keep_the_response(config, tmp_path):
    tokenizer = load_tokenizer(config.model)
    model = build_peft_model(config.model)
    example = {"prompt": alpaca_prompt("Reverse the letters of the word.", "castle"), "completion": "eltsac"}
    trainer = _trainer(model, tokenizer, config.train, 1e-3, 0, str(tmp_path), Dataset.from_list([example]))
    batch = next(iter(trainer.get_train_dataloader()))
    input_ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    prompt_length = len(tokenizer(example["prompt"])["input_ids"])
    assert all(label == -100 for label in labels[:prompt_length])
    response = labels[prompt_length:]
    assert response == input_ids[prompt_length:]
    assert tokenizer.decode(response).startswith("eltsac") and response[-1] == tokenizer.eos_token_id


def test_dirichlet_partitioner_over_builtin_category_skews_partitions():
    config = parse_config(default_run_config(**{
        "dataset.partitioner": "dirichlet", "dataset.partition-by": "category", "dataset.dirichlet-alpha": 0.3,
    }))
    sizes = [sum(map(len, load_client_data(config.dataset, pid, 3))) for pid in range(3)]
    assert sum(sizes) == len(generate_examples())
    assert len(set(sizes)) > 1
