"""The app's settings: `[tool.flwr.app.config]` parsed and validated into one typed object.

This is the only module that reads `context.run_config`. Keys are kebab-case with dotted groups
(`model.lora.r`, `train.seq-length`); their defaults live in pyproject.toml alone, and every key
must be present, so a typo or a missing key stops the run here, before any model is loaded.
It is also the only module that reads a node's `context.node_config` (which data the node trains on).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import re
import typing
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flwr.common.config import flatten_dict, unflatten_dict
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from flowertune_llm.shared.registry import BUILTIN_MODEL_NAME, BUILTIN_MODELS, DP_MODES, STRATEGIES, one_of

QUANTIZATION_BITS = (4, 8, 16)
TRANSFER_DTYPES = ("float32", "float16", "bfloat16")
PARTITIONERS = ("iid", "dirichlet", "natural-id", "linear", "square", "exponential")
# Partitioners that split by the values of the `dataset.partition-by` column.
PARTITIONERS_BY_COLUMN = ("dirichlet", "natural-id")
# What a run does when its clients train on CPU: nothing, a warning in the round line, or a stop.
EXPECT_GPU_MODES = ("off", "warn", "stop")
# Characters W&B refuses in a project name.
WANDB_FORBIDDEN = "/\\#?%:"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")


class ConfigError(ValueError):
    """A run-config value is unknown, mistyped or out of range."""


@dataclass
class LoraSettings:
    """LoRA adapter shape (peft's `LoraConfig` words)."""

    r: int = MISSING
    alpha: float = MISSING
    dropout: float = MISSING
    target_modules: str = MISSING

    @property
    def target_module_list(self) -> str | list[str] | None:
        """Return peft's `target_modules`: `all-linear`, None (peft's per-architecture default) or names."""
        if self.target_modules.strip() == "all-linear":
            return "all-linear"
        if self.target_modules.strip() == "peft-default":
            return None
        return [name.strip() for name in self.target_modules.split(",") if name.strip()]


@dataclass
class ModelSettings:
    """Which base model, how it is quantized, and its adapter."""

    name: str = MISSING
    quantization: int = MISSING
    gradient_checkpointing: bool = MISSING
    trust_remote_code: bool = MISSING
    reuse_base: bool = MISSING
    quantized_cache_dir: str = MISSING
    lora: LoraSettings = field(default_factory=LoraSettings)


@dataclass
class DatasetSettings:
    """Where the instruction data comes from and how it is split over clients."""

    name: str = MISSING
    partitioner: str = MISSING
    partition_by: str = MISSING
    dirichlet_alpha: float = MISSING
    validation_fraction: float = MISSING
    seed: int = MISSING
    # Which columns hold the instruction, its optional input and the response (other domains'
    # datasets name them differently from Alpaca).
    instruction_column: str = MISSING
    input_column: str = MISSING
    response_column: str = MISSING


@dataclass
class TrainSettings:
    """Local training of one client in one round (trl `SFTConfig` words where they exist)."""

    seq_length: int = MISSING
    learning_rate_max: float = MISSING
    learning_rate_min: float = MISSING
    batch_size: int = MISSING
    gradient_accumulation_steps: int = MISSING
    max_steps: int = MISSING
    max_grad_norm: float = MISSING
    optimizer: str = MISSING
    seed: int = MISSING
    save_every_round: int = MISSING
    resume_from: str = MISSING
    # 0: trl's fused LM head computes the loss; N > 0: the loss is computed N tokens at a time.
    loss_chunk_tokens: int = MISSING
    # off / warn / stop when a client trains on CPU (the GPU presets warn: a 3B base on CPU is days).
    expect_gpu: str = MISSING
    # The batch's examples concatenated into one row without pad tokens, attention kept within each
    # example (position ids restart per example): the same examples per step as padded batches.
    padding_free: bool = MISSING
    # trl's packing: short examples bin-packed into rows of `seq_length` tokens, `batch_size` rows per
    # step, so a step holds more examples than `batch_size` (and the batches are padding-free too).
    packing: bool = MISSING
    # Processes (one per device: GPU, or CPU process) a client trains with, data-parallel (DDP):
    # each trains batch_size / num_devices examples of every micro-batch. A node's `num-devices`
    # node config overrides it (multi_device.py).
    num_devices: int = MISSING

    @property
    def per_device_batch_size(self) -> int:
        """Return the examples each device trains per micro-batch."""
        return self.batch_size // self.num_devices


@dataclass
class StrategySettings:
    """Which aggregation strategy, its parameters, client sampling and the round deadline."""

    fraction_train: float = MISSING
    fraction_evaluate: float = MISSING
    min_train_nodes: int = MISSING
    min_evaluate_nodes: int = MISSING
    min_available_nodes: int = MISSING
    min_train_replies: int = MISSING
    round_timeout: float = MISSING
    # Which Flower strategy aggregates, and its own parameters (each used by the strategies named).
    name: str = MISSING
    proximal_mu: float = MISSING  # fedprox
    server_learning_rate: float = MISSING  # fedavgm
    server_momentum: float = MISSING  # fedavgm
    eta: float = MISSING  # fedadam, fedyogi, fedadagrad
    beta_1: float = MISSING  # fedadam, fedyogi
    beta_2: float = MISSING  # fedadam, fedyogi
    tau: float = MISSING  # fedadam, fedyogi, fedadagrad


@dataclass
class EvaluateSettings:
    """Server-side evaluation of the global adapter (client-side is `strategy.fraction-evaluate`)."""

    server_dataset: str = MISSING
    server_every: int = MISSING
    # Where the server evaluates: "cpu", "cuda" (its first GPU) or "cuda:N"; in a child process that
    # sees that device only, so its model is gone when the evaluation ends.
    server_device: str = MISSING
    # Exact match (flowertune_llm/client/exact_match.py): greedy answers to at most this many held-out
    # examples per evaluation (0 = off), each at most `max_new_tokens` long. Generation is the
    # costly part of an evaluation, so both bound its time.
    exact_match_examples: int = MISSING
    max_new_tokens: int = MISSING
    # Clients evaluate the adapter each train message brings (the global adapter after the previous
    # round) before training on it, and report both in the train reply; no separate evaluate
    # messages but one final evaluation. Same figures, one ClientApp process per node and round
    # where a deployment starts one per message (docs/deployment.md).
    on_receipt: bool = MISSING


@dataclass
class TransferSettings:
    """How adapters travel between server and clients."""

    dtype: str = MISSING


@dataclass
class PrivacySettings:
    """Central differential privacy with Flower's clipping wrappers (`differential_privacy='off'`: none)."""

    differential_privacy: str = MISSING
    noise_multiplier: float = MISSING
    clipping_norm: float = MISSING  # fixed clipping: the bound; adaptive: the initial bound
    target_clipped_quantile: float = MISSING  # adaptive
    clip_norm_lr: float = MISSING  # adaptive
    target_delta: float = MISSING  # the delta at which the accountant reports epsilon

    @property
    def enabled(self) -> bool:
        """Return whether updates are clipped and noised."""
        return self.differential_privacy != "off"

    @property
    def client_side(self) -> bool:
        """Return whether clients clip their own update (Flower's clipping mods)."""
        mode = DP_MODES.get(self.differential_privacy)
        return mode is not None and mode.client_side

    @property
    def adaptive(self) -> bool:
        """Return whether the clipping bound adapts to a quantile of update norms."""
        mode = DP_MODES.get(self.differential_privacy)
        return mode is not None and mode.adaptive


@dataclass
class ResultsSettings:
    """Where the server writes a run's metrics and adapters, and which trackers also get the metrics."""

    dir: str = MISSING
    run_name: str = MISSING
    # Per-round metrics also as TensorBoard event files in the run folder (the `tracking` extra).
    tensorboard: bool = MISSING
    # A Weights & Biases project that also gets the per-round metrics ("" = none; the `tracking` extra).
    wandb_project: str = MISSING


@dataclass
class AppConfig:
    """Every setting of a run."""

    num_server_rounds: int = MISSING
    model: ModelSettings = field(default_factory=ModelSettings)
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    strategy: StrategySettings = field(default_factory=StrategySettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    privacy: PrivacySettings = field(default_factory=PrivacySettings)
    results: ResultsSettings = field(default_factory=ResultsSettings)


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def _schema_keys(schema: type = AppConfig, prefix: str = "") -> dict[str, type]:
    """Return every run-config key of the schema (kebab-case, dotted) with its Python type."""
    keys: dict[str, type] = {}
    for name, field_type in typing.get_type_hints(schema).items():
        key = prefix + _kebab(name)
        if dataclasses.is_dataclass(field_type):
            keys.update(_schema_keys(field_type, key + "."))
        else:
            keys[key] = field_type
    return keys


CONFIG_KEYS: dict[str, type] = _schema_keys()
_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _check_types(run_config: Mapping[str, Any]) -> list[str]:
    """Return one message per unknown, missing or mistyped key."""
    problems = []
    for key, value in run_config.items():
        if key not in CONFIG_KEYS:
            close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            problems.append(f"Unknown config key '{key}'.{hint} Keys are listed in the README.")
            continue
        expected = CONFIG_KEYS[key]
        # TOML gives int for `1` and float for `1.0`; bool is an int subclass and must not pass.
        accepted = (int, float) if expected is float else (expected,)
        if (isinstance(value, bool) and expected is not bool) or not isinstance(value, accepted):
            problems.append(f"{key} must be {_TYPE_WORDS[expected]}, got {value!r}")
    for key in CONFIG_KEYS:
        if key not in run_config:
            problems.append(f"Missing config key '{key}' (its default is in pyproject.toml).")
    return problems


def _check_values(config: AppConfig) -> list[str]:
    """Return one message per value out of its accepted range, or cross-field conflict."""
    problems: list[str] = []

    def require(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            problems.append(f"{key} must be {accepted}, got {value!r}")

    def finite(value: float) -> bool:
        return math.isfinite(value)

    model, lora, data = config.model, config.model.lora, config.dataset
    train, strategy = config.train, config.strategy
    require(config.num_server_rounds >= 1, "num-server-rounds", config.num_server_rounds, ">= 1")
    require(bool(model.name.strip()), "model.name", model.name, f"a hub id, a local folder or '{BUILTIN_MODEL_NAME}'")
    if model.name.startswith("builtin:"):
        require(model.name in BUILTIN_MODELS, "model.name", model.name,
                "a hub id, a local folder or " + one_of(BUILTIN_MODELS))
    require(model.quantization in QUANTIZATION_BITS, "model.quantization", model.quantization,
            "4 or 8 (or 16 for an unquantized bf16 base)")
    require(lora.r >= 1, "model.lora.r", lora.r, ">= 1")
    require(finite(lora.alpha) and lora.alpha > 0, "model.lora.alpha", lora.alpha, "> 0")
    require(finite(lora.dropout) and 0 <= lora.dropout < 1, "model.lora.dropout", lora.dropout, "in [0, 1)")
    names = lora.target_module_list
    require(names in ("all-linear", None) or (bool(names) and all(_MODULE_NAME.match(n) for n in names)),
            "model.lora.target-modules", lora.target_modules,
            "'all-linear', 'peft-default' or comma-separated module names such as 'q_proj,v_proj'")
    require(bool(data.name.strip()), "dataset.name", data.name,
            "a hub id, a local JSON/JSONL/CSV/Parquet file or folder, or 'builtin:tiny-instructions'")
    require(data.partitioner in PARTITIONERS, "dataset.partitioner", data.partitioner,
            "one of " + ", ".join(PARTITIONERS))
    if data.partitioner in PARTITIONERS_BY_COLUMN:
        require(bool(data.partition_by.strip()), "dataset.partition-by", data.partition_by,
                f"a column name when dataset.partitioner is '{data.partitioner}'")
    for key, value in (("dataset.instruction-column", data.instruction_column),
                       ("dataset.input-column", data.input_column),
                       ("dataset.response-column", data.response_column)):
        require(value == value.strip(), key, value, "a column name without surrounding spaces")
    require(bool(data.instruction_column), "dataset.instruction-column", data.instruction_column,
            "a column name (the instruction of each record)")
    require(finite(data.dirichlet_alpha) and data.dirichlet_alpha > 0, "dataset.dirichlet-alpha",
            data.dirichlet_alpha, "> 0")
    require(finite(data.validation_fraction) and 0 <= data.validation_fraction <= 0.5,
            "dataset.validation-fraction", data.validation_fraction, "in [0, 0.5]")
    require(train.seq_length >= 16, "train.seq-length", train.seq_length, ">= 16")
    require(finite(train.learning_rate_max) and train.learning_rate_max > 0,
            "train.learning-rate-max", train.learning_rate_max, "> 0")
    require(finite(train.learning_rate_min) and 0 <= train.learning_rate_min <= train.learning_rate_max,
            "train.learning-rate-min", train.learning_rate_min,
            f"in [0, train.learning-rate-max={train.learning_rate_max}]")
    require(train.batch_size >= 1, "train.batch-size", train.batch_size, ">= 1")
    problems += _check_num_devices(train.num_devices, train, "train.num-devices")
    require(train.gradient_accumulation_steps >= 1, "train.gradient-accumulation-steps",
            train.gradient_accumulation_steps, ">= 1")
    require(train.max_steps >= 1, "train.max-steps", train.max_steps, ">= 1")
    require(finite(train.max_grad_norm) and train.max_grad_norm > 0, "train.max-grad-norm",
            train.max_grad_norm, "> 0")
    require(bool(train.optimizer.strip()), "train.optimizer", train.optimizer,
            "a transformers optimizer name such as 'adamw_torch' or 'paged_adamw_8bit'")
    require(train.loss_chunk_tokens >= 0, "train.loss-chunk-tokens", train.loss_chunk_tokens,
            ">= 0 (0: trl's fused LM head; N: the loss computed N tokens at a time)")
    require(train.expect_gpu in EXPECT_GPU_MODES, "train.expect-gpu", train.expect_gpu,
            "one of " + ", ".join(EXPECT_GPU_MODES) + " (what a client training on CPU causes)")
    require(train.save_every_round >= 0, "train.save-every-round", train.save_every_round,
            ">= 0 (0 saves only the final adapter)")
    require(finite(strategy.fraction_train) and 0 < strategy.fraction_train <= 1,
            "strategy.fraction-train", strategy.fraction_train, "in (0, 1]")
    require(finite(strategy.fraction_evaluate) and 0 <= strategy.fraction_evaluate <= 1,
            "strategy.fraction-evaluate", strategy.fraction_evaluate, "in [0, 1]")
    if config.evaluate.on_receipt:
        require(strategy.fraction_evaluate > 0, "evaluate.on-receipt", True,
                "false when strategy.fraction-evaluate = 0 (there is no client evaluation to move into "
                "the train messages)")
    if strategy.fraction_evaluate > 0:
        require(data.validation_fraction > 0, "dataset.validation-fraction", data.validation_fraction,
                "> 0 when strategy.fraction-evaluate > 0 (clients evaluate on their held-out share)")
    for key, value in (("strategy.min-train-nodes", strategy.min_train_nodes),
                       ("strategy.min-evaluate-nodes", strategy.min_evaluate_nodes),
                       ("strategy.min-available-nodes", strategy.min_available_nodes),
                       ("strategy.min-train-replies", strategy.min_train_replies)):
        require(value >= 1, key, value, ">= 1")
    require(strategy.min_train_replies <= strategy.min_train_nodes, "strategy.min-train-replies",
            strategy.min_train_replies, f"<= strategy.min-train-nodes={strategy.min_train_nodes}")
    require(re.fullmatch(r"cpu|cuda(:[0-9]+)?", config.evaluate.server_device) is not None,
            "evaluate.server-device", config.evaluate.server_device, "'cpu', 'cuda' or 'cuda:N' (N: a GPU index)")
    require(config.evaluate.server_every >= 1, "evaluate.server-every", config.evaluate.server_every,
            ">= 1 (rounds between server-side evaluations; the last round is always evaluated)")
    require(config.evaluate.exact_match_examples >= 0, "evaluate.exact-match-examples",
            config.evaluate.exact_match_examples, ">= 0 (0 = no exact-match evaluation)")
    require(config.evaluate.max_new_tokens >= 1, "evaluate.max-new-tokens", config.evaluate.max_new_tokens,
            ">= 1 (the longest answer generated, in tokens)")
    require(config.transfer.dtype in TRANSFER_DTYPES, "transfer.dtype", config.transfer.dtype,
            "one of " + ", ".join(TRANSFER_DTYPES))
    require(finite(strategy.round_timeout) and strategy.round_timeout > 0, "strategy.round-timeout",
            strategy.round_timeout, "> 0 seconds")
    require(bool(config.results.dir.strip()), "results.dir", config.results.dir, "a folder path")
    require(config.results.run_name == "" or re.fullmatch(r"[A-Za-z0-9._-]+", config.results.run_name)
            is not None and config.results.run_name not in (".", ".."),
            "results.run-name", config.results.run_name,
            "empty (a name is made from the time and setting) or letters, digits, '.', '_', '-'")
    project = config.results.wandb_project
    # W&B's own rule for project names; checked here so that a bad one stops the run before round 1.
    require(project == project.strip() and len(project) <= 128 and not set(project) & set(WANDB_FORBIDDEN),
            "results.wandb-project", project,
            f"empty (no W&B) or a W&B project name: at most 128 characters, none of {WANDB_FORBIDDEN}, "
            "no surrounding spaces")
    problems += _check_strategy(config)
    problems += _check_privacy(config)
    optimizer_problem = _check_optimizer(train.optimizer)
    if optimizer_problem:
        problems.append(optimizer_problem)
    return problems


def _check_num_devices(num_devices: Any, train: TrainSettings, key: str) -> list[str]:
    """Return the problems with `num_devices` (set by `key`) for the training settings `train`."""
    batch_size = train.batch_size
    divisors = [n for n in range(1, batch_size + 1) if batch_size % n == 0] if batch_size >= 1 else []
    if not (isinstance(num_devices, int) and not isinstance(num_devices, bool) and num_devices in divisors):
        return [f"{key} must be an integer that divides train.batch-size={batch_size} (each device trains "
                f"batch-size / num-devices examples per micro-batch), so one of {', '.join(map(str, divisors))}; "
                f"got {num_devices!r}"]
    # The chunked loss runs the backbone outside the model's forward, which DDP needs to all-reduce.
    if num_devices > 1 and train.loss_chunk_tokens:
        return [f"train.loss-chunk-tokens must be 0 with {key}={num_devices} (the chunked loss bypasses the "
                f"forward pass that data-parallel training synchronises through), got {train.loss_chunk_tokens}"]
    return []


def _check_strategy(config: AppConfig) -> list[str]:
    """Return one message per bad `strategy.name` or strategy parameter."""
    problems: list[str] = []
    strategy = config.strategy

    def require(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            problems.append(f"{key} must be {accepted}, got {value!r}")

    require(strategy.name in STRATEGIES, "strategy.name", strategy.name, one_of(STRATEGIES))
    require(math.isfinite(strategy.proximal_mu) and strategy.proximal_mu >= 0, "strategy.proximal-mu",
            strategy.proximal_mu, ">= 0")
    require(math.isfinite(strategy.server_learning_rate) and strategy.server_learning_rate > 0,
            "strategy.server-learning-rate", strategy.server_learning_rate, "> 0")
    require(math.isfinite(strategy.server_momentum) and 0 <= strategy.server_momentum < 1,
            "strategy.server-momentum", strategy.server_momentum, "in [0, 1)")
    require(math.isfinite(strategy.eta) and strategy.eta > 0, "strategy.eta", strategy.eta, "> 0")
    for key, value in (("strategy.beta-1", strategy.beta_1), ("strategy.beta-2", strategy.beta_2)):
        require(math.isfinite(value) and 0 <= value < 1, key, value, "in [0, 1)")
    require(math.isfinite(strategy.tau) and strategy.tau > 0, "strategy.tau", strategy.tau, "> 0")
    # The checkpoint holds the global adapter only: a server optimiser's moments or momentum would
    # silently restart from zero, which is another algorithm than the one the run started with.
    if config.train.resume_from and strategy.name in STRATEGIES and STRATEGIES[strategy.name].server_optimiser:
        problems.append(
            f"train.resume-from cannot continue a run with strategy.name={strategy.name!r}: its server "
            "optimiser state (moments or momentum) is not checkpointed, so the continued run would not "
            "be the same algorithm. Start the run again without train.resume-from"
        )
    return problems


def _check_privacy(config: AppConfig) -> list[str]:
    """Return one message per bad `privacy.*` value or a setting differential privacy cannot work with."""
    problems: list[str] = []
    privacy, strategy = config.privacy, config.strategy

    def require(ok: bool, key: str, value: Any, accepted: str) -> None:
        if not ok:
            problems.append(f"{key} must be {accepted}, got {value!r}")

    require(privacy.differential_privacy in DP_MODES, "privacy.differential-privacy",
            privacy.differential_privacy, one_of(DP_MODES))
    require(math.isfinite(privacy.noise_multiplier) and privacy.noise_multiplier >= 0,
            "privacy.noise-multiplier", privacy.noise_multiplier, ">= 0")
    require(math.isfinite(privacy.clipping_norm) and privacy.clipping_norm > 0, "privacy.clipping-norm",
            privacy.clipping_norm, "> 0")
    require(math.isfinite(privacy.target_clipped_quantile) and 0 <= privacy.target_clipped_quantile <= 1,
            "privacy.target-clipped-quantile", privacy.target_clipped_quantile, "in [0, 1]")
    require(math.isfinite(privacy.clip_norm_lr) and privacy.clip_norm_lr > 0, "privacy.clip-norm-lr",
            privacy.clip_norm_lr, "> 0")
    require(math.isfinite(privacy.target_delta) and 0 < privacy.target_delta < 1, "privacy.target-delta",
            privacy.target_delta, "in (0, 1)")
    if not privacy.enabled or privacy.differential_privacy not in DP_MODES:
        return problems
    mode = f"privacy.differential-privacy={privacy.differential_privacy!r}"
    # Flower's wrappers add noise to what the inner strategy returns, calibrated to a mean of
    # clipped updates; a server optimiser returns a rescaled step instead, which that noise does not cover.
    plain_means = [name for name, entry in STRATEGIES.items() if not entry.server_optimiser]
    require(strategy.name in plain_means, "strategy.name", strategy.name,
            f"{' or '.join(repr(name) for name in plain_means)} with {mode} "
            "(the noise is calibrated to a plain mean of clipped updates)")
    # Clients clip the update they send; a 16-bit rounding of the clipped adapter afterwards moves it
    # by up to 2^-8 of the adapter's values, which can push the update past the clipping bound.
    if privacy.client_side:
        require(config.transfer.dtype == "float32", "transfer.dtype", config.transfer.dtype,
                f"'float32' with {mode} (a 16-bit rounding after clipping can exceed the bound)")
    if privacy.adaptive and privacy.noise_multiplier > 0:
        # Flower also noises the count of clipped updates (stddev = sampled clients / 20), and needs
        # the update noise to stay below twice that.
        limit = strategy.min_train_nodes / 10
        require(privacy.noise_multiplier < limit, "privacy.noise-multiplier", privacy.noise_multiplier,
                f"< strategy.min-train-nodes / 10 = {limit:g} with adaptive clipping (Flower's clipped-count "
                "noise is min-train-nodes / 20 and must be over half the update noise); sample more clients")
    if config.train.resume_from:
        problems.append(
            f"train.resume-from cannot continue a run with {mode}: the privacy accountant's state and "
            "the adaptive clipping bound are not checkpointed, so the privacy spent would be under-reported. "
            "Start the run again without train.resume-from"
        )
    return problems


def _check_optimizer(name: str) -> str | None:
    from transformers.training_args import OptimizerNames

    accepted = [option.value for option in OptimizerNames]
    if name in accepted:
        return None
    close = difflib.get_close_matches(name, accepted, n=3)
    hint = " (closest: " + ", ".join(close) + ")" if close else ""
    return f"train.optimizer must be a transformers optimizer name{hint}, got {name!r}"


def _nested(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """Turn flat kebab-case dotted keys into the schema's nested snake_case mapping."""
    # Only the names change here: OmegaConf's structured merge turns TOML's `1` into a float field's 1.0.
    return unflatten_dict({key.replace("-", "_"): value for key, value in run_config.items()})


def parse_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Validate a flat run config and return it as one typed `AppConfig`, or raise `ConfigError`.

    A simulated client parses the same run config in every message (twice per train message: the
    handler and the clipping mod), and OmegaConf's structured merge took 0.15-0.2 s a parse there.
    A config parsed before in this process is therefore copied, not parsed again; the copy is the
    caller's to change.
    """
    try:
        # The value's type is part of the key: 1, 1.0 and True are equal in Python, not in a run config.
        key = tuple(sorted((name, type(value).__name__, value) for name, value in run_config.items()))
        hash(key)
    except TypeError:  # a value no run config holds (a list): parsed, to name the problem
        return _parse_config(run_config)
    return copy.deepcopy(_parsed_config(key))


@functools.lru_cache(maxsize=8)
def _parsed_config(key: tuple[tuple[str, str, Any], ...]) -> AppConfig:
    """Return the parsed config of the run config `key` lists (name, type name, value)."""
    return _parse_config({name: value for name, _, value in key})


def _parse_config(run_config: Mapping[str, Any]) -> AppConfig:
    """Check the keys and types, convert with OmegaConf, check the values: `parse_config`'s work."""
    problems = _check_types(run_config)
    if problems:
        raise ConfigError(_one_message(problems))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(AppConfig), _nested(run_config))
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:  # _check_types should make this unreachable
        raise ConfigError(f"Invalid run config: {error}") from error
    assert isinstance(config, AppConfig)
    problems = _check_values(config)
    if problems:
        raise ConfigError(_one_message(problems))
    return config


def to_run_config(config: AppConfig) -> dict[str, Any]:
    """Return the flat kebab-case mapping of a config, as saved with a run's results."""
    return {_kebab(key): value for key, value in flatten_dict(dataclasses.asdict(config)).items()}


def _one_message(problems: list[str]) -> str:
    if len(problems) == 1:
        return problems[0]
    return f"{len(problems)} problems in the run config:\n  - " + "\n  - ".join(problems)


# --- Node config: what a node sets for itself ---------------------------------------------------
# The simulation engine gives every virtual SuperNode `partition-id` and `num-partitions`. A real
# SuperNode is a data owner: it names its own data file, and may name a folder on its disk for the
# quantized-base cache: `flower-supernode --node-config "data-path='...' quantized-cache-dir='...'"`,
# and how many devices it trains on (`num-devices=2`: two GPUs, data-parallel; multi_device.py).

DATA_PATH_KEY = "data-path"
PARTITION_ID_KEY = "partition-id"
NUM_PARTITIONS_KEY = "num-partitions"
QUANTIZED_CACHE_DIR_KEY = "quantized-cache-dir"
NUM_DEVICES_KEY = "num-devices"


@dataclass(frozen=True)
class NodeSettings:
    """What a node's config sets: its own data (`data_path`, else a slice of dataset.name), its cache folder, devices."""

    data_path: str = ""
    partition_id: int = 0
    num_partitions: int = 1
    quantized_cache_dir: str = ""
    # None: the run's train.num-devices.
    num_devices: int | None = None

    @property
    def seed_offset(self) -> int:
        """Return a per-node number for the local training seed, stable across runs."""
        if self.data_path:
            return zlib.crc32(self.data_path.encode()) % 1_000_003
        return self.partition_id


def _node_string(node_config: Mapping[str, Any], key: str) -> str:
    value = node_config.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"node config: {key} must be a string (a path), got {value!r}")
    return value.strip()


def parse_node_config(node_config: Mapping[str, Any]) -> NodeSettings:
    """Return what this node's config sets, or raise `ConfigError`.

    `data-path` gives the node its own local file or folder (deployment); `partition-id` and
    `num-partitions` pick a slice of it, or of `dataset.name` when there is no `data-path` (simulation).
    `quantized-cache-dir` sets `model.quantized-cache-dir` and `num-devices` `train.num-devices` for this
    node only (whether it divides the batch size is checked by `for_node`, which knows it).
    """
    data_path = _node_string(node_config, DATA_PATH_KEY)
    cache_dir = _node_string(node_config, QUANTIZED_CACHE_DIR_KEY)
    num_devices = node_config.get(NUM_DEVICES_KEY)
    if num_devices is not None and (isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1):
        raise ConfigError(
            f"node config: {NUM_DEVICES_KEY} must be an integer >= 1 (the devices this node trains on, one "
            f"process each, e.g. `--node-config \"{NUM_DEVICES_KEY}=2\"`), got {num_devices!r}"
        )
    has_partition = PARTITION_ID_KEY in node_config or NUM_PARTITIONS_KEY in node_config
    if not data_path and not has_partition:
        raise ConfigError(
            f"node config: this SuperNode has no data. Give it its own file with "
            f"`flower-supernode --node-config \"{DATA_PATH_KEY}='/path/to/train.jsonl'\"` (deployment), or "
            f"'{PARTITION_ID_KEY}' and '{NUM_PARTITIONS_KEY}' (the simulation engine sets them); "
            f"got {dict(node_config)}"
        )
    if not has_partition:
        return NodeSettings(data_path=data_path, quantized_cache_dir=cache_dir, num_devices=num_devices)
    try:
        partition_id = node_config[PARTITION_ID_KEY]
        num_partitions = node_config[NUM_PARTITIONS_KEY]
        if isinstance(partition_id, bool) or isinstance(num_partitions, bool):
            raise TypeError
        partition_id, num_partitions = int(partition_id), int(num_partitions)
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(
            f"node config: '{PARTITION_ID_KEY}' and '{NUM_PARTITIONS_KEY}' must both be given, as integers, "
            f"to pick this node's data partition; got {dict(node_config)}"
        ) from error
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(
            f"node config: {PARTITION_ID_KEY} must be in [0, {NUM_PARTITIONS_KEY}={num_partitions}), got {partition_id}"
        )
    return NodeSettings(data_path, partition_id, num_partitions, cache_dir, num_devices)


def for_node(config: AppConfig, node: NodeSettings) -> AppConfig:
    """Return the run's settings as this node applies them: its own data file, cache folder and devices, if set.

    Raises `ConfigError` when the node's `num-devices` does not divide train.batch-size.
    """
    dataset, model, train = config.dataset, config.model, config.train
    if node.data_path:
        dataset = dataclasses.replace(dataset, name=node.data_path)
    if node.quantized_cache_dir:
        model = dataclasses.replace(model, quantized_cache_dir=node.quantized_cache_dir)
    if node.num_devices is not None:
        problems = _check_num_devices(node.num_devices, train, f"node config: {NUM_DEVICES_KEY}")
        if problems:
            raise ConfigError(problems[0])
        train = dataclasses.replace(train, num_devices=node.num_devices)
    return dataclasses.replace(config, dataset=dataset, model=model, train=train)
