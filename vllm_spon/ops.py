"""`torch.ops.spon.sparse_linear`: the sparse linear as a custom op, opaque to torch.compile and CUDA graphs.

vLLM compiles the model once with a symbolic token count and drops shape guards, so a Python branch on the
number of tokens inside a linear method would be frozen at the first traced size. The choice between the
sparse decode kernel and a dense matmul on the thresholded input is therefore made inside this op, from the
input's shape, each time it runs (each CUDA graph is captured at one padded size, so each graph takes the
right branch).

No `from __future__ import annotations` here: the op schema is inferred from the type hints.
"""

import torch
from vllm.utils.torch_utils import direct_register_custom_op

from vllm_spon import kernels

_LIBRARY = torch.library.Library("spon", "FRAGMENT")  # kept alive for as long as the op is used


def sparse_linear(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor | None,
    segment_ends: list[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y[:, seg_i] = S_{t_i}(x) @ weight_t[:, seg_i] + bias[seg_i]` for x `[T, in]`, weight_t `[in, out]`.

    thresholds None: x is already thresholded (see `vllm_spon.kernels.sparse_linear`).
    """
    return kernels.sparse_linear(x, weight_t, thresholds, segment_ends, bias)


def _sparse_linear_fake(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor | None,
    segment_ends: list[int],
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    return x.new_empty((x.shape[0], weight_t.shape[1]))


def _register() -> None:
    if hasattr(torch.ops.spon, "sparse_linear"):
        return
    direct_register_custom_op(
        op_name="sparse_linear",
        op_func=sparse_linear,
        fake_impl=_sparse_linear_fake,
        target_lib=_LIBRARY,
    )


_register()
