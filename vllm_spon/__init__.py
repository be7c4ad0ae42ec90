"""vllm-spon: activation-sparse decoding for vLLM (TEAL thresholds, SPON biases, Triton sparse kernels)."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (placeholder until the loader lands)."""
