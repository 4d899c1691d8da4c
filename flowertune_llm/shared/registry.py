"""The app's name lists: strategies, differential-privacy modes and built-in models, one registry each.

Validation (shared/settings.py), the messages that list what is accepted, and construction (the
server's strategy and privacy wrappers, the built-in model builder) all read these tables, so a
name added here is accepted, listed and built everywhere at once. Entries name Flower's classes
and the tiny architectures as strings: this module is imported by the client too, and must not
pull in Flower's server side or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StrategyEntry:
    """One `strategy.name`: the Flower strategy that aggregates and the settings it takes."""

    flower_class: str  # in flwr.serverapp.strategy
    # StrategySettings fields passed to the Flower constructor under the same name.
    parameters: tuple[str, ...]
    # A server optimiser keeps state across rounds (moments, momentum) that a checkpoint does not hold.
    server_optimiser: bool
    summary: str


STRATEGIES: dict[str, StrategyEntry] = {
    "fedavg": StrategyEntry("FedAvg", (), False, "mean of the clients' adapters weighted by examples"),
    "fedprox": StrategyEntry("FedProx", ("proximal_mu",), False,
                             "FedAvg; clients add a proximal term mu/2 * |w - w_global|^2"),
    "fedadam": StrategyEntry("FedAdam", ("eta", "beta_1", "beta_2", "tau"), True,
                             "server-side Adam on the averaged update"),
    "fedyogi": StrategyEntry("FedYogi", ("eta", "beta_1", "beta_2", "tau"), True,
                             "server-side Yogi on the averaged update"),
    "fedadagrad": StrategyEntry("FedAdagrad", ("eta", "tau"), True, "server-side Adagrad on the averaged update"),
    "fedavgm": StrategyEntry("FedAvgM", ("server_learning_rate", "server_momentum"), True,
                             "server-side SGD with momentum on the averaged update"),
}


@dataclass(frozen=True)
class PrivacyMode:
    """One `privacy.differential-privacy` value: which of Flower's central-DP wrappers, if any."""

    flower_class: str | None  # in flwr.serverapp.strategy; None: no differential privacy
    client_side: bool  # clients clip their own update (Flower's clipping mods)
    adaptive: bool  # the clipping bound follows a quantile of the update norms
    summary: str


DP_MODES: dict[str, PrivacyMode] = {
    "off": PrivacyMode(None, False, False, "no clipping, no noise"),
    "server-fixed": PrivacyMode("DifferentialPrivacyServerSideFixedClipping", False, False,
                                "the server clips each update to a fixed bound and noises the mean"),
    "client-fixed": PrivacyMode("DifferentialPrivacyClientSideFixedClipping", True, False,
                                "clients clip their update to a fixed bound; the server noises the mean"),
    "server-adaptive": PrivacyMode("DifferentialPrivacyServerSideAdaptiveClipping", False, True,
                                   "as server-fixed, with a bound that follows a quantile of update norms"),
    "client-adaptive": PrivacyMode("DifferentialPrivacyClientSideAdaptiveClipping", True, True,
                                   "as client-fixed, with that adaptive bound"),
}


@dataclass(frozen=True)
class BuiltinModel:
    """One `builtin:` model name: a tiny checkpoint the app builds locally (builtin/models.py)."""

    architecture: str  # a key of builtin/models.py ARCHITECTURES
    # Pretrained on the built-in world's notes at build time (the default base); otherwise random weights.
    pretrained: bool
    summary: str


BUILTIN_MODEL_NAME = "builtin:tiny-llama"
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    BUILTIN_MODEL_NAME: BuiltinModel("llama", True, "the default base: a tiny Llama that read the world's notes"),
    "builtin:tiny-mistral": BuiltinModel("mistral", False, "random tiny Mistral (sliding-window attention)"),
    "builtin:tiny-qwen2": BuiltinModel("qwen2", False, "random tiny Qwen2 (biases on q/k/v)"),
    "builtin:tiny-phi": BuiltinModel("phi", False, "random tiny Phi (LayerNorm, dense/fc1/fc2 names)"),
}


def one_of(names) -> str:
    """Return 'one of a, b, c': the accepted values of a registry, for a message."""
    return "one of " + ", ".join(names)
