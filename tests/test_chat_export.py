"""The chat and export commands on the adapter of a finished default run."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from flowertune_llm.client.model import load_inference_base, resolve_model_path
from flowertune_llm.shared.adapter_card import CARD_FILE, read_card
from flowertune_llm.shared.prompts import alpaca_prompt
from flowertune_llm.tools import chat, export

# Every test here reads the adapter of the session's finished 2-round simulation (conftest).
pytestmark = pytest.mark.integration


def test_saved_adapter_records_its_base_and_prompt_format(finished_run):
    card = read_card(finished_run / "adapter-final")
    assert (card.base_model, card.quantization, card.prompt_name) == ("builtin:tiny-llama", 4, "alpaca")
    assert card.prompt("Add 2 and 3.") == alpaca_prompt("Add 2 and 3.")
    assert card.prompt("Reverse the word.", "flower") == alpaca_prompt("Reverse the word.", "flower")


def test_chat_answers_with_the_trained_prompt_format(finished_run, capsys):
    assert chat.main([str(finished_run / "adapter-final"), "--question", "Reverse the word: flower",
                      "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    prompt_line, answer_line = printed.split(">> answer: ")
    assert prompt_line.startswith(">> prompt: " + alpaca_prompt("Reverse the word: flower").rstrip())
    # The answer is the trained adapter's own greedy continuation of that prompt, computed here
    # without the chat code: the 4-bit base the card names, the saved adapter, plain generate.
    adapter = finished_run / "adapter-final"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    model = PeftModel.from_pretrained(load_inference_base("builtin:tiny-llama", 4), adapter).eval()
    inputs = tokenizer(alpaca_prompt("Reverse the word: flower"), return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer_line.strip() == expected and expected


def test_chat_uses_a_chat_template_where_the_tokenizer_has_one(finished_run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin:tiny-llama"))
    card = read_card(finished_run / "adapter-final")
    assert chat.build_prompt(tokenizer, card, "Hi?", "", "auto") == alpaca_prompt("Hi?")
    tokenizer.chat_template = "{% for m in messages %}<|user|>{{ m['content'] }}{% endfor %}<|assistant|>"
    assert chat.build_prompt(tokenizer, card, "Hi?", "", "auto") == "<|user|>Hi?<|assistant|>"
    assert chat.build_prompt(tokenizer, card, "Hi?", "", "trained") == alpaca_prompt("Hi?")


@pytest.mark.parametrize(("argv", "message"), [
    (["{run}/adapter-final", "--question", "x", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["{run}", "--question", "x"], "is not a saved adapter"),
    (["{run}/adapter-final", "--question", "x", "--quantization", "3"], "invalid choice: 3"),
    (["{run}/adapter-final"], "the following arguments are required: --question"),
])
def test_chat_refuses_bad_arguments_with_one_message(finished_run, capsys, argv, message):
    with pytest.raises(SystemExit) as stopped:
        chat.main([a.format(run=finished_run) for a in argv])
    assert stopped.value.code == 2
    assert message in capsys.readouterr().err


def test_export_merges_into_a_standalone_model_that_computes_the_same(finished_run, tmp_path):
    adapter, output = finished_run / "adapter-final", tmp_path / "merged"
    assert export.main([str(adapter), "--output", str(output), "--dtype", "float32"]) == 0
    assert json.loads((output / CARD_FILE).read_text())["prompt-format"]["name"] == "alpaca"
    assert not (output / "adapter_config.json").exists()

    merged = AutoModelForCausalLM.from_pretrained(output)
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("builtin:tiny-llama"), dtype=torch.float32)
    unmerged = PeftModel.from_pretrained(base, adapter).eval()
    tokens = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        assert torch.allclose(merged(tokens).logits, unmerged(tokens).logits, atol=1e-4)


def test_export_refuses_an_occupied_output_folder(finished_run, tmp_path, capsys):
    (tmp_path / "taken.txt").write_text("keep me")
    with pytest.raises(SystemExit):
        export.main([str(finished_run / "adapter-final"), "--output", str(tmp_path)])
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["taken.txt"]
