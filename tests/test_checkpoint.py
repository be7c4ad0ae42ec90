"""The SPON checkpoint format: round trip, overlay links, atomic writes, and every rejection."""

import json
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from tests.checkpoint_edits import edit_config, edit_tensors
from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.calibration.sparse_model import sparsifiable_linears
from vllm_spon.format.architectures import FAMILIES, SUPPORTED_ARCHITECTURES
from vllm_spon.format.atomic import OutputError, atomic_directory
from vllm_spon.format.checkpoint import load_checkpoint, read_config
from vllm_spon.format.errors import CheckpointError
from vllm_spon.format.identity import check_base_model


@pytest.fixture()
def tiny_modules(tiny_llama_dir):
    return sparsifiable_linears(AutoModelForCausalLM.from_pretrained(tiny_llama_dir))


def _write(tiny_llama_dir, tmp_path, tiny_modules, layout="full", name="ckpt"):
    thresholds = {m: 0.01 * (i + 1) for i, m in enumerate(tiny_modules)}
    biases = {m: torch.randn(lin.out_features) for m, lin in tiny_modules.items()}
    return write_handmade(tiny_llama_dir, tmp_path / name, thresholds, biases, layout=layout), thresholds, biases


def test_round_trip_full(tiny_llama_dir, tmp_path, tiny_modules):
    path, thresholds, biases = _write(tiny_llama_dir, tmp_path, tiny_modules)
    ckpt = load_checkpoint(path)
    assert ckpt.modules == sorted(thresholds)
    for m, t in thresholds.items():
        assert ckpt.threshold(m) == pytest.approx(t)
        torch.testing.assert_close(ckpt.biases[m], biases[m])
    assert (path / "model.safetensors").is_file() and not (path / "model.safetensors").is_symlink()
    check_base_model(ckpt.config.base_model, path, path / "spon" / "config.json")  # a full copy is its own base model
    assert "14 linears" in ckpt.summary()


def test_overlay_links_base_files(tiny_llama_dir, tmp_path, tiny_modules):
    path, _, _ = _write(tiny_llama_dir, tmp_path, tiny_modules, layout="overlay")
    link = path / "model.safetensors"
    assert link.is_symlink() and link.resolve() == (tiny_llama_dir / "model.safetensors").resolve()
    # Small files are copied: vLLM parses config.json before the loader could say the base model moved.
    assert (path / "config.json").is_file() and not (path / "config.json").is_symlink()
    config = read_config(path)
    assert config.layout == "overlay" and config.base_model.path == str(tiny_llama_dir.resolve())
    check_base_model(config.base_model, path, path / "spon" / "config.json")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half-written").write_text("x")
        raise RuntimeError("interrupted")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tiny_llama_dir, tmp_path, tiny_modules):
    path, _, _ = _write(tiny_llama_dir, tmp_path, tiny_modules)
    with pytest.raises(OutputError, match="already exists"), atomic_directory(path):
        pass
    before = load_checkpoint(path).thresholds
    with atomic_directory(path, overwrite=True) as tmp:
        shutil.copytree(path, tmp, dirs_exist_ok=True)
    assert load_checkpoint(path).thresholds.keys() == before.keys()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no .old or .tmp leftovers


def test_not_a_checkpoint(tiny_llama_dir):
    with pytest.raises(CheckpointError, match=r"spon/config.json does not exist"):
        load_checkpoint(tiny_llama_dir)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p, m: edit_config(p, lambda c: c.update(format_version=99)), "unknown format_version 99"),
        (lambda p, m: edit_config(p, lambda c: c.update(projections=["x_proj"])), "projections must be"),
        (lambda p, m: edit_config(p, lambda c: c.update(method="teal")), "bias_space is required"),
        (lambda p, m: (p / "spon" / "spon.safetensors").unlink(), "spon.safetensors is missing"),
        (lambda p, m: edit_tensors(p, lambda t: t.pop(f"{m}.threshold")), "thresholds do not match"),
        (lambda p, m: edit_tensors(p, lambda t: t.update({f"{m}.threshold": torch.tensor(float("nan"))})),
         "tensor {m}.threshold is nan"),
        (lambda p, m: edit_tensors(p, lambda t: t.update({f"{m}.threshold": torch.tensor(-1.0)})),
         "tensor {m}.threshold is -1.0"),
        (lambda p, m: edit_tensors(p, lambda t: t.update({f"{m}.threshold": torch.zeros(2)})),
         "tensor {m}.threshold must be a 0-d float"),
        (lambda p, m: edit_tensors(p, lambda t: t.update({f"{m}.spon_bias": torch.zeros(2, 2)})),
         r"tensor {m}.spon_bias has shape \[2, 2\], but the model's {m} has 64 outputs"),
        (lambda p, m: edit_tensors(p, lambda t: t.update({f"{m}.spon_bias": t[f"{m}.spon_bias"] * float("inf")})),
         "tensor {m}.spon_bias holds NaN or Inf"),
        (lambda p, m: edit_tensors(p, lambda t: t.update({"stray.weight": torch.zeros(1)})),
         "unexpected tensor 'stray.weight'"),
    ],
)
def test_rejections_name_file_and_tensor(tiny_llama_dir, tmp_path, tiny_modules, corrupt, message):
    path, _, _ = _write(tiny_llama_dir, tmp_path, tiny_modules)
    module = sorted(tiny_modules)[0]
    corrupt(path, module)
    with pytest.raises(CheckpointError, match=message.format(m=re.escape(module))) as info:
        load_checkpoint(path)
    assert str(path / "spon") in str(info.value)


def test_rejects_checkpoint_of_another_base_model(tiny_llama_dir, tmp_path, tiny_modules):
    path, _, _ = _write(tiny_llama_dir, tmp_path, tiny_modules)
    config = read_config(path)
    other = tmp_path / "other"
    shutil.copytree(tiny_llama_dir, other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.layers.0.self_attn.q_proj.weight"] += 1e-3
    save_file(tensors, other / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="are not those the checkpoint was calibrated on"):
        check_base_model(config.base_model, other, path / "spon" / "config.json")
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="calibrated for LlamaForCausalLM"):
        check_base_model(config.base_model, other, path / "spon" / "config.json")


@pytest.mark.parametrize("architecture", ["MixtralForCausalLM", "GPT2LMHeadModel"])
def test_a_checkpoint_whose_model_is_not_a_supported_family_is_refused_in_one_line(
        tiny_llama_dir, tmp_path, tiny_modules, architecture):
    """What the vLLM loader, `inspect` and `eval` call: the architecture found and the supported list."""
    path, _, _ = _write(tiny_llama_dir, tmp_path, tiny_modules)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": [architecture]}))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and f"architecture {architecture} is not supported" in message
    assert all(a in message for a in SUPPORTED_ARCHITECTURES) and str(path / "config.json") in message


def test_family_table_parses_only_its_own_module_names():
    llama = FAMILIES[0]
    assert llama.parse("model.layers.12.mlp.down_proj")[0] == 12
    assert llama.site("model.layers.3.self_attn.k_proj") == llama.site("model.layers.3.self_attn.v_proj")
    assert llama.vllm_layers() == {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                                   "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    for foreign in ("model.layers.x.mlp.down_proj", "model.layers.1.mlp.q_proj", "transformer.h.0.attn.c_attn"):
        with pytest.raises(CheckpointError, match="is not a sparsifiable module"):
            llama.parse(foreign)
