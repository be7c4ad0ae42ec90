"""The SPON checkpoint format: the layer calibration writes through and the vLLM plugin reads through.

    architectures  what each supported model family looks like (the one table of module names)
    schema         `spon/config.json`, validated (pydantic), and the option types it records
    identity       which base model a checkpoint belongs to (architecture, shapes, a probe weight)
    checkpoint     reading, validating (`load_checkpoint`, the one validator) and writing checkpoints
    atomic         output directories that appear whole or not at all

It imports neither `vllm_spon.calibration` nor the plugin modules, and needs no vLLM.
"""
