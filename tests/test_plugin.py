"""The plugin's parts without an engine: registration, the custom op, the quantized-weights method's
segment stitching, the compile-cache key."""

import importlib.metadata

import pytest
import torch
from torch import nn

from vllm_spon.kernels.reference import sparse_linear_reference


def test_entry_point_names_register():
    plugins = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert [p.value for p in plugins if p.name == "spon"] == ["vllm_spon:register"]


def test_register_is_idempotent_and_registers_loader_and_op():
    from vllm.config.load import LoadConfig
    from vllm.model_executor.model_loader import get_model_loader

    import vllm_spon
    from vllm_spon.loader import SponModelLoader

    vllm_spon.register()
    vllm_spon.register()
    loader = get_model_loader(LoadConfig(load_format="spon"))
    assert isinstance(loader, SponModelLoader)
    assert type(loader.base_loader).__name__ == "DefaultModelLoader"
    assert hasattr(torch.ops.spon, "sparse_linear")


def test_loader_hands_base_load_format_to_vllm():
    from vllm.config.load import LoadConfig

    from vllm_spon.loader import SponModelLoader

    loader = SponModelLoader(LoadConfig(load_format="spon", model_loader_extra_config={"base_load_format": "dummy"}))
    assert loader.base_weights_are_dummy
    with pytest.raises(ValueError, match="cannot be 'spon'"):
        SponModelLoader(LoadConfig(load_format="spon", model_loader_extra_config={"base_load_format": "spon"}))
    with pytest.raises(ValueError, match="Unexpected extra config keys"):
        SponModelLoader(LoadConfig(load_format="spon", model_loader_extra_config={"typo": 1}))


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("bias", [False, True])
def test_sparse_linear_op_matches_reference(tokens, bias):
    import vllm_spon.ops  # noqa: F401

    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, 64, generator=gen)
    weight_t = torch.randn(64, 48, generator=gen)
    thresholds = torch.tensor([0.3, 0.8, 0.0])
    ends = [16, 40, 48]
    b = torch.randn(48, generator=gen) if bias else None
    expected = sparse_linear_reference(x, weight_t, thresholds, ends, b)
    torch.testing.assert_close(torch.ops.spon.sparse_linear(x, weight_t, thresholds, ends, b), expected)
    torch.library.opcheck(torch.ops.spon.sparse_linear.default, (x, weight_t, thresholds, ends, b))


class _DenseInner:
    """Stands in for a quantized method: `x @ W^T + b` on the layer's weight."""

    def apply(self, layer, x, bias=None):
        y = x @ layer.weight.t()
        return y if bias is None else y + bias


class _Layer(nn.Module):
    def __init__(self, sizes: list[int], thresholds: list[float]):
        super().__init__()
        self.output_partition_sizes = sizes
        self.tp_rank = 0
        gen = torch.Generator().manual_seed(0)
        self.weight = nn.Parameter(torch.randn(sum(sizes), 32, generator=gen), requires_grad=False)
        self.spon_threshold = nn.Parameter(torch.tensor(thresholds), requires_grad=False)
        self.spon_bias = nn.Parameter(torch.randn(sum(sizes), generator=gen), requires_grad=False)


@pytest.mark.parametrize("thresholds", [[0.5, 0.5, 0.5], [0.5, 0.2, 0.5], [0.1, 0.2, 0.3]])
def test_quantized_method_stitches_segments_by_threshold(thresholds):
    """Quantized weights: one inner matmul per distinct threshold, columns taken per segment."""
    from vllm_spon.linear_method import SponQuantizedLinearMethod

    layer = _Layer([24, 8, 8], thresholds)
    method = SponQuantizedLinearMethod(_DenseInner(), layer, has_bias=True)
    method.finalize(layer)
    assert len(method.threshold_rows) == len(set(thresholds))
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(1))
    layer_bias = torch.randn(40)
    expected = sparse_linear_reference(x, layer.weight.t(), layer.spon_threshold, [24, 32, 40],
                                       layer.spon_bias + layer_bias)
    torch.testing.assert_close(method.apply(layer, x, layer_bias), expected)


@pytest.mark.slow
def test_compile_cache_key_differs_between_dense_and_spon(zero_spon_overlay, spon_reference_case):
    """vLLM hashes no load format: the loader's identity record is what separates dense and SPON graphs."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_spon.loader import COMPILE_KEY, record_compile_identity

    def config(model: str, load_format: str):
        return EngineArgs(model=model, load_format=load_format, dtype="float32").create_engine_config()

    cpu = torch.device("cpu")
    dense = config(str(zero_spon_overlay), "auto")
    spon = config(str(zero_spon_overlay), "spon")
    assert dense.compute_hash() == spon.compute_hash()  # the problem
    record_compile_identity(spon, zero_spon_overlay, cpu)
    assert spon.additional_config[COMPILE_KEY]
    assert spon.compute_hash() != dense.compute_hash()
    other = config(str(zero_spon_overlay), "spon")
    record_compile_identity(other, spon_reference_case.checkpoint, cpu)
    assert other.compute_hash() not in (spon.compute_hash(), dense.compute_hash())
    again = config(str(zero_spon_overlay), "spon")
    record_compile_identity(again, zero_spon_overlay, cpu)
    assert again.compute_hash() == spon.compute_hash()


def test_compile_cache_key_follows_the_kernel_table(zero_spon_overlay, tmp_path, monkeypatch):
    """The fp8 layers' path (sparse kernel or vLLM's matmul) is fixed in the traced graph by the kernel table:
    a graph cached under one table made an engine under another fail at its first forward (H200, check-fp8),
    so a different table must give a different compile-cache key, the same table the same key."""
    from vllm.engine.arg_utils import EngineArgs

    from vllm_spon.kernels import configs
    from vllm_spon.kernels.triton_sparse import Config
    from vllm_spon.loader import record_compile_identity

    def key(table_text: str | None) -> str:
        if table_text is None:
            monkeypatch.delenv(configs.TABLE_ENV, raising=False)
        else:
            path = tmp_path / f"tuned_{abs(hash(table_text))}.py"
            path.write_text(table_text)
            monkeypatch.setenv(configs.TABLE_ENV, str(path))
        configs.table_for.cache_clear()
        vllm_config = EngineArgs(model=str(zero_spon_overlay), load_format="spon",
                                 dtype="float32").create_engine_config()  # fmt: skip
        record_compile_identity(vllm_config, zero_spon_overlay, torch.device("cpu"))
        return vllm_config.compute_hash()

    header = "from vllm_spon.kernels.triton_sparse import Config\nTUNED = {}\n"
    on_kernel = f"{header}TUNED_FP8 = {{(256, 1024, 1): {Config('compact', bn=1024, bm=8)!r}}}\n"
    off_kernel = f"{header}TUNED_FP8 = {{(256, 1024, 1): None}}\n"
    try:
        assert key(on_kernel) != key(off_kernel)
        assert key(on_kernel) == key(on_kernel)
        assert key(None) not in (key(on_kernel), key(off_kernel))
    finally:
        monkeypatch.delenv(configs.TABLE_ENV, raising=False)
        configs.table_for.cache_clear()


def test_vllm_refuses_a_broken_overlay_before_reading_its_config(zero_spon_overlay, tmp_path):
    """An overlay of an earlier version links config.json too; with its base moved, vLLM's `EngineArgs` used to
    fail reading that config ("Invalid repository ID or local directory"). The validator's line comes first."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    import vllm_spon
    from vllm_spon.format.errors import CheckpointError

    vllm_spon.register()
    old = tmp_path / "old-overlay"
    old.mkdir()
    for item in zero_spon_overlay.iterdir():
        if item.name == "spon":
            shutil.copytree(item, old / "spon")
        elif item.name == "config.json":
            (old / item.name).symlink_to(tmp_path / "moved" / "config.json")
        else:
            (old / item.name).symlink_to(item.resolve())
    with pytest.raises(CheckpointError, match=r"config\.json points to .*moved/config\.json, which does not exist"):
        EngineArgs(model=str(old), load_format="spon").create_model_config()
    with pytest.raises(CheckpointError, match=r"spon/config\.json does not exist"):
        EngineArgs(model=str(tmp_path), load_format="spon").create_model_config()
    config = EngineArgs(model=str(zero_spon_overlay), load_format="spon").create_model_config()
    assert config.hf_config.model_type == "llama"
