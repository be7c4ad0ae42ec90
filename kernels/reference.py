"""PyTorch reference of the sparse linear: the semantics every kernel and the reference model share.

`S(x) = x * (|x| > t)`, the comparison made in float32 so that bf16/fp16/fp32 paths and the Triton kernels
agree on exactly which inputs survive. A fused linear (q/k/v, gate/up) has one threshold per output
segment: segment `i` covers output columns `[ends[i-1], ends[i])` and reads `S_{t_i}(x)`.
Float8 weights (`sparse_linear_fp8_reference`) are dequantized with their scales in float32 first.
"""

import torch


def sparsify(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """Zero the entries of `x` whose magnitude is not above `threshold` (a scalar or 0-d tensor)."""
    keep = x.float().abs() > threshold
    return x * keep.to(x.dtype)


def sparse_linear_reference(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor,
    segment_ends: list[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y[:, seg_i] = bias[seg_i] + S_{t_i}(x) @ weight_t[:, seg_i]`, accumulated in float32.

    x: [tokens, in]; weight_t: [in, out] (the transposed weight); thresholds: [segments];
    segment_ends: cumulative output sizes, last == out; bias: [out] or None.
    """
    if len(segment_ends) != thresholds.numel() or segment_ends[-1] != weight_t.shape[1]:
        raise ValueError(f"segment_ends {segment_ends} do not match thresholds {list(thresholds.shape)} "
                         f"and weight_t {list(weight_t.shape)}")
    parts = []
    start = 0
    for i, end in enumerate(segment_ends):
        xs = sparsify(x, thresholds[i]).float()
        parts.append(xs @ weight_t[:, start:end].float())
        start = end
    y = torch.cat(parts, dim=-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def sparse_linear_fp8_reference(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    weight_scale: torch.Tensor,
    thresholds: torch.Tensor,
    segment_ends: list[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sparse_linear_reference` on a float8 weight_t `[in, out]` dequantized in float32 with its scale:
    float32 `[1]` (per tensor) or `[out]` (per output channel). x stays in its own dtype (W8A16)."""
    if weight_scale.numel() not in (1, weight_t.shape[1]):
        raise ValueError(f"weight_scale {list(weight_scale.shape)} is neither per tensor nor per output channel "
                         f"of weight_t {list(weight_t.shape)}")
    weight = weight_t.float() * weight_scale.float().reshape(1, -1)
    return sparse_linear_reference(x, weight, thresholds, segment_ends, bias)
