"""Client data: load the instruction dataset, take this node's partition, split off validation.

Flower Datasets partitions the dataset over the federation's nodes (in a deployment, a node's own
file, its node config's `data-path`, takes the place of `dataset.name`); each record becomes an Alpaca
`prompt` and the `completion` to learn, the two columns trl's SFTTrainer uses to compute the loss
on response tokens only.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from datasets import Dataset

from flowertune_llm.builtin.world import BUILTIN_DATASET_FILE, BUILTIN_HELDOUT_FILE
from flowertune_llm.client.imports import defer_submodule
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.shared.settings import DatasetSettings

# Flower Datasets' package imports its plotting helpers, and with them matplotlib, seaborn and
# scipy: 1.5-2 s and ~50 MB in every client process, which never plots. They load on first use.
defer_submodule("flwr_datasets.visualization")
from flwr_datasets import FederatedDataset  # noqa: E402
from flwr_datasets.partitioner import (  # noqa: E402
    DirichletPartitioner,
    ExponentialPartitioner,
    IidPartitioner,
    LinearPartitioner,
    NaturalIdPartitioner,
    Partitioner,
    SquarePartitioner,
)

BUILTIN_DATASET_NAME = "builtin:tiny-instructions"
BUILTIN_HELDOUT_NAME = "builtin:tiny-instructions-heldout"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
RESPONSE_COLUMNS = ("output", "response")
# The task of each record (the built-in data has one); it is kept beside prompt and completion so
# that evaluation can report per task. trl drops it from training batches (not a model input).
TASK_COLUMN = "category"


class DatasetSourceError(ValueError):
    """The configured dataset cannot be found, read or understood."""


def dataset_source(name: str, key: str = "dataset.name") -> tuple[str, str | None]:
    """Return (Flower Datasets `dataset` argument, local data file or None) for a dataset name."""
    if name == BUILTIN_DATASET_NAME:
        return "json", str(BUILTIN_DATASET_FILE)
    if name == BUILTIN_HELDOUT_NAME:
        return "json", str(BUILTIN_HELDOUT_FILE)
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), None
    if path.is_file():
        if path.suffix.lower() not in LOCAL_FORMATS:
            raise DatasetSourceError(
                f"{key}: '{name}' has suffix '{path.suffix}'; local files must be one of "
                + ", ".join(LOCAL_FORMATS)
            )
        return LOCAL_FORMATS[path.suffix.lower()], str(path)
    if path.suffix.lower() in LOCAL_FORMATS or name.startswith((".", "/", "~")):
        raise DatasetSourceError(f"{key}: no such file or folder '{name}'")
    return name, None


def check_dataset_source(name: str) -> None:
    """Fail early, with advice, if `dataset.name` is neither local nor reachable on the hub."""
    dataset, _ = dataset_source(name)
    if dataset in LOCAL_FORMATS.values() or Path(dataset).expanduser().is_dir():
        return
    from huggingface_hub import HfApi

    try:
        HfApi().dataset_info(dataset)
    except Exception as error:  # offline mode, DNS failure, 404 and 401 all mean: cannot use it
        raise DatasetSourceError(
            f"dataset.name: cannot reach '{name}' on the Hugging Face Hub (no network, a private "
            "dataset, or a typo). Download it where the hub is reachable and give the local file or "
            f"folder, or use the built-in default dataset.name='{BUILTIN_DATASET_NAME}'. "
            f"Cause: {type(error).__name__}: {error}"
        ) from error


def make_partitioner(settings: DatasetSettings, num_partitions: int) -> Partitioner:
    """Return the Flower Datasets partitioner named by `dataset.partitioner`."""
    if settings.partitioner == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by=settings.partition_by,
            alpha=settings.dirichlet_alpha,
            seed=settings.seed,
        )
    if settings.partitioner == "natural-id":
        # One partition per distinct value of the column: the number of nodes must match it.
        return NaturalIdPartitioner(partition_by=settings.partition_by)
    size_skewed = {"linear": LinearPartitioner, "square": SquarePartitioner, "exponential": ExponentialPartitioner}
    if settings.partitioner in size_skewed:
        return size_skewed[settings.partitioner](num_partitions=num_partitions)
    return IidPartitioner(num_partitions=num_partitions)


@functools.lru_cache(maxsize=4)
def _federated_dataset(
    name: str, partitioner: str, partition_by: str, alpha: float, seed: int, num_partitions: int
) -> FederatedDataset:
    """Build the FederatedDataset once per process (later rounds reuse the loaded data)."""
    settings = DatasetSettings(
        name=name, partitioner=partitioner, partition_by=partition_by,
        dirichlet_alpha=alpha, validation_fraction=0.0, seed=seed,
    )
    dataset, data_file = dataset_source(name)
    extra = {"data_files": data_file} if data_file else {}
    return FederatedDataset(
        dataset=dataset,
        partitioners={"train": make_partitioner(settings, num_partitions)},
        shuffle=True,
        seed=seed,
        **extra,
    )


@dataclass(frozen=True)
class ColumnMapping:
    """Which record columns hold the instruction, the optional input and the response."""

    instruction: str = "instruction"
    input: str = "input"
    response: str = ""  # "" = `output`, else `response` (Alpaca's and Dolly-style names)

    @classmethod
    def from_settings(cls, settings: DatasetSettings) -> ColumnMapping:
        """Return the mapping configured by `dataset.*-column`."""
        return cls(settings.instruction_column, settings.input_column, settings.response_column)


def _text(value: object) -> str:
    """Return a cell as text: missing cells are empty, labels (numbers) become their digits."""
    return "" if value is None else str(value)


def to_prompt_completion(records: Dataset, columns: ColumnMapping = ColumnMapping()) -> Dataset:
    """Map instruction records to Alpaca prompt/completion pairs, reading the mapped columns."""
    present = set(records.column_names)
    response = columns.response or next((name for name in RESPONSE_COLUMNS if name in present), "output")
    # The default `input` column may be absent (instruction-only data); a configured one may not.
    input_column = columns.input if columns.input in present or columns.input != "input" else ""
    wanted = {
        "dataset.instruction-column": columns.instruction,
        "dataset.input-column": input_column,
        "dataset.response-column": response,
    }
    missing = {key: name for key, name in wanted.items() if name and name not in present}
    if missing:
        raise DatasetSourceError(
            "dataset: the records have no column "
            + ", ".join(f"'{name}' ({key})" for key, name in missing.items())
            + f"; their columns are {sorted(present)}. Map them with dataset.instruction-column, "
            "dataset.input-column and dataset.response-column."
        )

    def convert(record: dict) -> dict:
        context = _text(record[input_column]) if input_column else ""
        return {
            "prompt": alpaca_prompt(_text(record[columns.instruction]), context),
            "completion": _text(record[response]),
        }

    dropped = [name for name in records.column_names if name != TASK_COLUMN]
    return records.map(convert, remove_columns=dropped)


def load_client_data(
    settings: DatasetSettings, partition_id: int, num_partitions: int
) -> tuple[Dataset, Dataset | None]:
    """Return this node's (training, validation) prompt/completion data; validation may be None."""
    federated = _federated_dataset(
        settings.name, settings.partitioner, settings.partition_by,
        settings.dirichlet_alpha, settings.seed, num_partitions,
    )
    if settings.partitioner == "natural-id":
        check_natural_id_count(federated, settings.partition_by, num_partitions)
    partition = to_prompt_completion(
        federated.load_partition(partition_id, "train"), ColumnMapping.from_settings(settings)
    )
    if settings.validation_fraction <= 0:
        return partition, None
    # A fixed seed keeps the held-out share identical in every round and every run.
    split = partition.train_test_split(test_size=settings.validation_fraction, seed=settings.seed)
    return split["train"], split["test"]


def check_natural_id_count(federated: FederatedDataset, column: str, num_partitions: int) -> None:
    """Fail with advice unless the federation has one node per distinct value of `column`."""
    federated.load_partition(0, "train")  # makes the partitioner read the ids
    num_ids = federated.partitioners["train"].num_partitions
    if num_ids != num_partitions:
        raise DatasetSourceError(
            f"dataset.partitioner='natural-id' gives one partition per distinct '{column}' value: "
            f"{num_ids} here, but the federation has {num_partitions} nodes. Run it with "
            f'--federation-config "num-supernodes={num_ids}", or use dataset.partitioner=\'dirichlet\''
        )
