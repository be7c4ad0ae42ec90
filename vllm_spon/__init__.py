"""vllm-spon: activation-sparse decoding for vLLM (TEAL thresholds, SPON biases, Triton sparse kernels)."""

__version__ = "0.1.0"

_registered = False


def register() -> None:
    """vLLM general-plugin entry point: `--load-format spon`, `torch.ops.spon.sparse_linear`, and the
    checkpoint's own check before vLLM reads the model's config (`loader.check_spon_model_first`).

    vLLM calls this in every process it starts (API server, engine core, each worker), possibly more than
    once: it registers once per process, imports vLLM's loader machinery only when called (not when
    `vllm_spon` is imported, so the calibration module works without vLLM), and touches no GPU.
    """
    global _registered
    if _registered:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import register_model_loader

    from vllm_spon import ops  # noqa: F401  (registers the custom op)
    from vllm_spon.loader import LOAD_FORMAT, SponModelLoader, check_spon_model_first

    register_model_loader(LOAD_FORMAT)(SponModelLoader)
    check_spon_model_first(EngineArgs)
    _registered = True
