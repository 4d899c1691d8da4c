"""FlowerTune LLM: federated LoRA instruction tuning of quantized causal language models with Flower."""

from flowertune_llm.shared.quiet import silence_library_noise

# The package's first line runs before any library import in every process of the app (ServerApp,
# ClientApp actors, the tools), which is where the libraries' noise starts; the filters are targeted.
silence_library_noise()
