"""Merge a saved global adapter into its base model and save a standalone checkpoint.

    flowertune export results/<run>/adapter-final        # -> results/<run>/merged-adapter-final
    flowertune export results/<run>/adapter-final --output results/merged-model

The base is loaded unquantized (`--dtype`, default bfloat16), the LoRA update is added into its
weights (peft's merge_and_unload), and the result is saved with its tokenizer as an ordinary
safetensors checkpoint that `AutoModelForCausalLM.from_pretrained` loads without peft. The
adapter's card (base model, prompt format) is copied along, so the chat command's prompt format
is kept. Merging into a 4/8-bit base would round the update away, hence the unquantized base.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer

from flowertune_llm.client.model import load_inference_base, resolve_model_path
from flowertune_llm.shared.adapter_card import CARD_FILE, AdapterError, base_model_of, read_card

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_merged(adapter: Path, output: Path, base: str, dtype: torch.dtype) -> Path:
    """Write base + adapter, merged, to `output` (config, safetensors weights, tokenizer, card)."""
    model = PeftModel.from_pretrained(load_inference_base(base, 16, dtype=dtype), adapter)
    merged = model.merge_and_unload()
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, safe_serialization=True)
    AutoTokenizer.from_pretrained(resolve_model_path(base)).save_pretrained(output)
    if (adapter / CARD_FILE).is_file():
        shutil.copy2(adapter / CARD_FILE, output / CARD_FILE)
    return output


def default_output(adapter: Path) -> Path:
    """Return the default merged-model folder: beside the adapter, so under results/<run>/."""
    # Not the current folder: `flwr run` bundles every non-ignored file of the app folder into the
    # next run's FAB, and results/ is git-ignored (so left out of it).
    return adapter.parent / f"merged-{adapter.name}"


def main(argv: list[str] | None = None) -> int:
    """Parse and check arguments, then merge and save."""
    parser = argparse.ArgumentParser(prog="flowertune export", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, help="a saved adapter folder, e.g. results/<run>/adapter-final")
    parser.add_argument("--output", type=Path, default=None,
                        help="new folder for the merged model (default: merged-<adapter> beside the adapter, "
                        "i.e. inside its results folder, which no FAB bundles)")
    parser.add_argument("--base", default="", help="base model (hub id or folder); default: the adapter's")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="precision of the saved weights")
    args = parser.parse_args(argv)
    args.output = args.output or default_output(args.adapter)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        parser.error(f"--output: '{args.output}' exists and is not an empty folder; nothing was written")
    try:
        base = args.base or base_model_of(args.adapter, read_card(args.adapter))
    except AdapterError as error:
        parser.error(f"adapter: {error}")
    try:
        folder = export_merged(args.adapter, args.output, base, DTYPES[args.dtype])
    except OSError as error:
        print(f"error: cannot load base model '{base}' ({error}). Pass --base with a local folder.", file=sys.stderr)
        return 1
    print(f"Merged model saved to {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
