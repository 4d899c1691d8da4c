"""Ask a trained adapter a question: load the base model, apply the saved global adapter, generate.

    flowertune chat results/<run>/adapter-final --question "Reverse the word 'flower'."

The prompt is built with the tokenizer's chat template where it has one, otherwise with the prompt
format the adapter was trained with (recorded in the adapter's flowertune-adapter.json; Alpaca for
this app). `--prompt-format trained` forces the latter. The base model and its quantization default
to those the adapter was trained on; it runs on a GPU if there is one, else on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from flowertune_llm.client.model import load_inference_base, resolve_model_path
from flowertune_llm.shared.adapter_card import AdapterCard, AdapterError, base_model_of, read_card
from flowertune_llm.shared.prompts import ALPACA_WITH_INPUT, ALPACA_WITHOUT_INPUT

PROMPT_FORMATS = ("auto", "chat-template", "trained")


def uses_chat_template(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> bool:
    """Return whether prompts go through the tokenizer's chat template (else the training format)."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "chat-template" and not has_template:
        raise AdapterError("--prompt-format chat-template: this tokenizer has no chat template")
    return prompt_format == "chat-template" or (prompt_format == "auto" and has_template)


def build_prompt(
    tokenizer: PreTrainedTokenizerBase, card: AdapterCard | None, question: str, context: str, prompt_format: str
) -> str:
    """Return the text the model continues: chat template (where there is one) or the training format."""
    if uses_chat_template(tokenizer, prompt_format):
        content = f"{question}\n\n{context}" if context.strip() else question
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
    trained = card or AdapterCard("", 16, "alpaca", ALPACA_WITH_INPUT, ALPACA_WITHOUT_INPUT)
    return trained.prompt(question, context)


def answer(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    templated: bool = False,
) -> str:
    """Return the model's continuation of the prompt, without the prompt and special tokens."""
    # A chat template writes its own BOS; a training-format prompt is tokenized as in training.
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not templated)
    inputs = {name: tensor.to(model.device) for name, tensor in inputs.items()}
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(
            **inputs, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            **sampling,
        )
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return tokenizer.decode(new_tokens, skip_special_tokens=True).strip()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowertune chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapter", type=Path, help="a saved adapter folder, e.g. results/<run>/adapter-final")
    parser.add_argument("--question", required=True, help="the instruction to answer")
    parser.add_argument("--input", default="", help="optional input/context for the instruction")
    parser.add_argument("--base", default="", help="base model (hub id or folder); default: the adapter's")
    parser.add_argument("--quantization", type=int, choices=(4, 8, 16), default=None,
                        help="load the base in 4 or 8 bits, or 16 (bf16); default: as trained")
    parser.add_argument("--prompt-format", choices=PROMPT_FORMATS, default="auto",
                        help="auto: the tokenizer's chat template if it has one, else the training format")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (reproducible); the reference samples at 0.7")
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, check them, then load, generate and print."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not args.temperature >= 0:
        parser.error(f"--temperature must be >= 0, got {args.temperature}")
    if not args.question.strip():
        parser.error("--question must not be empty")
    try:
        card = read_card(args.adapter)
        base = args.base or base_model_of(args.adapter, card)
    except AdapterError as error:
        parser.error(f"adapter: {error}")
    bits = args.quantization or (card.quantization if card else 16)

    torch.manual_seed(args.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(base))
        model = PeftModel.from_pretrained(load_inference_base(base, bits), args.adapter)
    except OSError as error:
        print(f"error: cannot load base model '{base}' ({error}). Pass --base with a local folder.", file=sys.stderr)
        return 1
    try:
        templated = uses_chat_template(tokenizer, args.prompt_format)
    except AdapterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    prompt = build_prompt(tokenizer, card, args.question, args.input, args.prompt_format)
    print(f">> prompt: {prompt}")
    print(f">> answer: {answer(model, tokenizer, prompt, args.max_new_tokens, args.temperature, templated)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
