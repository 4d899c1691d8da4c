"""The node's disk cache of quantized bases: same model back, no re-quantization, fresh on change."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from flowertune_llm.client import model as model_module
from flowertune_llm.client.model import load_quantized_base, resolve_model_path
from flowertune_llm.client.quantized_cache import cache_entry, save_entry


@pytest.fixture
def settings(config, tmp_path):
    """Model settings over a private copy of the tiny checkpoint, with a cache in tmp_path."""
    source = tmp_path / "tiny"
    shutil.copytree(resolve_model_path(config.model.name), source)
    return dataclasses.replace(config.model, name=str(source), quantized_cache_dir=str(tmp_path / "cache"))


def _logits(model) -> torch.Tensor:
    # The base lands on the GPU where there is one (device_map); its input goes there too.
    with torch.no_grad():
        return model(torch.tensor([[1, 40, 41, 42, 43, 44]], device=model.device)).logits


@pytest.mark.parametrize("bits", [4, 8])
def test_second_build_loads_the_cached_quantized_weights_and_computes_the_same(settings, bits, monkeypatch):
    settings = dataclasses.replace(settings, quantization=bits)
    fresh = load_quantized_base(settings)
    entry = cache_entry(settings, settings.name)
    assert (entry / "config.json").is_file() and any(entry.glob("*.safetensors"))

    def no_quantizing(_settings):
        raise AssertionError("the cached base was quantized again")

    monkeypatch.setattr(model_module, "quantization_config", no_quantizing)
    cached = load_quantized_base(settings)
    assert torch.equal(_logits(fresh), _logits(cached))
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no staging left behind


def test_a_changed_checkpoint_or_other_bits_get_their_own_entry(settings):
    entry = cache_entry(settings, settings.name)
    assert cache_entry(dataclasses.replace(settings, quantization=8), settings.name) != entry
    weights = next(Path(settings.name).glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes())  # same bytes, new modification time
    assert cache_entry(settings, settings.name) != entry


def test_no_cache_when_off_or_unquantized(settings):
    assert cache_entry(dataclasses.replace(settings, quantized_cache_dir=""), settings.name) is None
    assert cache_entry(dataclasses.replace(settings, quantization=16), settings.name) is None
    assert cache_entry(settings, "some-org/not-downloaded-model") is None


class _SavesOneFile:
    """Stands in for a quantized model: save_pretrained writes one marker file."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def save_pretrained(self, folder: Path, safe_serialization: bool = True) -> None:
        (Path(folder) / "config.json").write_text(self.marker)


def test_an_entry_another_client_saved_first_is_kept(tmp_path):
    entry = tmp_path / "cache" / "tiny-4bit-0123"
    save_entry(_SavesOneFile("theirs"), entry)
    save_entry(_SavesOneFile("ours"), entry)  # the rename fails onto their full folder: no error
    assert (entry / "config.json").read_text() == "theirs"
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]


def test_a_failed_save_leaves_no_entry_and_no_staging(tmp_path):
    class Fails(_SavesOneFile):
        def save_pretrained(self, folder: Path, safe_serialization: bool = True) -> None:
            super().save_pretrained(folder)
            raise OSError("disk full")

    entry = tmp_path / "cache" / "tiny-4bit-0123"
    with pytest.raises(OSError, match="disk full"):
        save_entry(Fails("half"), entry)
    assert list(entry.parent.iterdir()) == []
