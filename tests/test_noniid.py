"""Non-IID partitions by config: natural ids, Dirichlet label skew, size skew, and the shipped preset."""

from __future__ import annotations

import tomllib
from collections import Counter

import pytest
from flwr.common.config import flatten_dict
from flwr_datasets import FederatedDataset

from flowertune_llm.builtin.world import BUILTIN_DATASET_FILE, generate_examples
from flowertune_llm.client.data import DatasetSourceError, load_client_data, make_partitioner
from flowertune_llm.shared.settings import parse_config

from conftest import REPO_ROOT, default_run_config

PRESET = REPO_ROOT / "presets" / "tiny-noniid-dirichlet.toml"
CATEGORIES = len({example["category"] for example in generate_examples()})  # tasks in the built-in data


def _categories(settings, partition_id: int, num_partitions: int) -> Counter:
    """Count the built-in data's `category` values in one node's partition (before the validation split)."""
    federated = FederatedDataset(dataset="json", data_files=str(BUILTIN_DATASET_FILE),
                                 partitioners={"train": make_partitioner(settings, num_partitions)},
                                 shuffle=True, seed=settings.seed)
    return Counter(federated.load_partition(partition_id, "train")["category"])


def test_natural_id_gives_each_node_one_category():
    config = parse_config(default_run_config(**{"dataset.partitioner": "natural-id", "dataset.partition-by": "category"}))
    seen = []
    for partition_id in range(CATEGORIES):
        counts = _categories(config.dataset, partition_id, CATEGORIES)
        assert len(counts) == 1
        seen += counts
    assert len(set(seen)) == CATEGORIES
    train, held_out = load_client_data(config.dataset, 0, CATEGORIES)
    assert len(train) + len(held_out) == sum(_categories(config.dataset, 0, CATEGORIES).values())


def test_natural_id_with_another_number_of_nodes_says_how_many_are_needed():
    config = parse_config(default_run_config(**{"dataset.partitioner": "natural-id", "dataset.partition-by": "category"}))
    with pytest.raises(DatasetSourceError, match=rf"{CATEGORIES} here, but the federation has 2 nodes. Run it with "
                                                 rf"--federation-config \"num-supernodes={CATEGORIES}\""):
        load_client_data(config.dataset, 0, 2)


@pytest.mark.parametrize("partitioner", ["linear", "square", "exponential"])
def test_size_skewed_partitioners_give_growing_shares(partitioner):
    config = parse_config(default_run_config(**{"dataset.partitioner": partitioner}))
    sizes = [sum(_categories(config.dataset, pid, 3).values()) for pid in range(3)]
    assert sum(sizes) == len(generate_examples()) and sizes[0] < sizes[1] < sizes[2]


def test_preset_parses_and_skews_categories_across_the_default_two_nodes():
    preset = flatten_dict(tomllib.loads(PRESET.read_text()))
    config = parse_config(default_run_config(**preset))
    assert (config.dataset.partitioner, config.dataset.partition_by) == ("dirichlet", "category")
    iid = parse_config(default_run_config())
    shares = []
    for settings in (config.dataset, iid.dataset):
        counts = [_categories(settings, pid, 2) for pid in range(2)]
        # Largest gap between the two nodes' share of a category: IID keeps it small.
        # Over the large categories only: a 26-question one splits unevenly by chance alone.
        shares.append(max(abs(counts[0][c] - counts[1][c]) / (counts[0][c] + counts[1][c])
                          for c in counts[0] | counts[1] if counts[0][c] + counts[1][c] >= 100))
    skewed, balanced = shares
    assert skewed > 0.5 > 0.25 > balanced
