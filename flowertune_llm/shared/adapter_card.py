"""What an adapter needs to be used after training: its base model and the prompt format it learned.

peft's `adapter_config.json` names the base by the path it was built from, which for the built-in
model is a cache folder, and says nothing of prompts. Every saved adapter therefore gets a small
`flowertune-adapter.json` beside it, read by the chat and export commands:

    {"base-model": "openlm-research/open_llama_3b_v2", "quantization": 4,
     "prompt-format": {"name": "alpaca", "with-input": "...{instruction}...{input}...",
                       "without-input": "...{instruction}..."}}
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flowertune_llm.shared.prompts import ALPACA_WITH_INPUT, ALPACA_WITHOUT_INPUT
from flowertune_llm.shared.settings import ModelSettings

CARD_FILE = "flowertune-adapter.json"


class AdapterError(ValueError):
    """A folder is not a saved adapter, or its card cannot be read."""


@dataclass(frozen=True)
class AdapterCard:
    """The base model an adapter was trained on and the prompt templates it was trained with."""

    base_model: str
    quantization: int
    prompt_name: str
    with_input: str
    without_input: str

    def prompt(self, instruction: str, context: str = "") -> str:
        """Return the training prompt for an instruction and its optional input."""
        if context.strip():
            return self.with_input.format(instruction=instruction, input=context)
        return self.without_input.format(instruction=instruction)


def card_for(settings: ModelSettings) -> AdapterCard:
    """Return the card of an adapter trained with these model settings (the app trains on Alpaca prompts)."""
    return AdapterCard(settings.name, settings.quantization, "alpaca", ALPACA_WITH_INPUT, ALPACA_WITHOUT_INPUT)


def write_card(folder: Path, card: AdapterCard) -> None:
    """Write the card into an adapter folder."""
    document = {
        "base-model": card.base_model,
        "quantization": card.quantization,
        "prompt-format": {"name": card.prompt_name, "with-input": card.with_input, "without-input": card.without_input},
    }
    (folder / CARD_FILE).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")


def read_card(folder: Path) -> AdapterCard | None:
    """Return the card of a saved adapter folder, or None for an adapter saved without one."""
    if not (folder / "adapter_config.json").is_file():
        raise AdapterError(
            f"'{folder}' is not a saved adapter (it has no adapter_config.json); give a folder such as "
            "results/<run>/adapter-final"
        )
    path = folder / CARD_FILE
    if not path.is_file():
        return None
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        prompt = document["prompt-format"]
        return AdapterCard(
            str(document["base-model"]), int(document["quantization"]),
            str(prompt["name"]), str(prompt["with-input"]), str(prompt["without-input"]),
        )
    except (ValueError, KeyError, TypeError) as error:
        raise AdapterError(f"'{path}' cannot be read: {type(error).__name__}: {error}") from None


def base_model_of(folder: Path, card: AdapterCard | None) -> str:
    """Return the base model an adapter belongs to: the card's, else peft's `base_model_name_or_path`."""
    if card is not None:
        return card.base_model
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    name = config.get("base_model_name_or_path")
    if not name:
        raise AdapterError(f"'{folder}' does not say which base model it belongs to: pass --base")
    return str(name)
