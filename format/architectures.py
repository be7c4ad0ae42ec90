"""What each supported model family looks like: the one table that calibration, the checkpoint format, the
vLLM plugin, evaluation and the tests read.

A family says which linear modules of a decoder block are sparsified, which input each reads (modules that
read one input share its statistics, and vLLM fuses them into one layer: `qkv_proj`, `gate_up_proj`), how
vLLM splits each over tensor-parallel ranks, where the decoder layers live, which tensor identifies the
base model, and what it needs beyond Llama. Module paths are the same in the Hugging Face model and in
vLLM's model for every family here (`model.layers.N.self_attn.q_proj` / `...qkv_proj`).

Adding a family: one `Family` entry in `FAMILIES` and its case in tests/test_families.py, nothing else.
"""

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

from .errors import CheckpointError


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only model, from its Hugging Face `config.json`."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str) -> "ModelShape":
        try:
            hidden, heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
            return cls(
                layers=int(cfg["num_hidden_layers"]), hidden=hidden, intermediate=int(cfg["intermediate_size"]),
                heads=heads, kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: a decoder config needs {e} (an integer)") from None


@dataclass(frozen=True)
class Projection:
    """One sparsifiable linear of a decoder block."""

    name: str  # the Hugging Face module's leaf name
    parent: str  # the block's sub-module holding it
    reads: str  # its input: projections that read the same input share a site
    vllm_layer: str  # the vLLM layer holding it; several projections of one layer are its output segments
    parallel: Literal["column", "row"]  # how vLLM splits it over tensor-parallel ranks (outputs or inputs)
    out_features: Callable[[ModelShape], int]
    # vLLM output segments this one module spans: 1, or more where the checkpoint stores a fused module
    # (Phi-3's `qkv_proj`: 3) that vLLM splits like its own fused layer; one threshold covers them all.
    segments: int = 1
    # Each output row belongs to one query position and nothing else reads it (the queries, the attention's
    # output projection): greedy allocation, which measures a block on its last positions, computes only those.
    per_query: bool = False


# The Llama block, which every family below shares (they differ in what surrounds these linears).
LLAMA_BLOCK = (
    Projection("q_proj", "self_attn", "attn_in", "qkv_proj", "column", lambda s: s.heads * s.head_dim,
               per_query=True),
    Projection("k_proj", "self_attn", "attn_in", "qkv_proj", "column", lambda s: s.kv_heads * s.head_dim),
    Projection("v_proj", "self_attn", "attn_in", "qkv_proj", "column", lambda s: s.kv_heads * s.head_dim),
    Projection("o_proj", "self_attn", "attn_out", "o_proj", "row", lambda s: s.hidden, per_query=True),
    Projection("gate_proj", "mlp", "mlp_in", "gate_up_proj", "column", lambda s: s.intermediate),
    Projection("up_proj", "mlp", "mlp_in", "gate_up_proj", "column", lambda s: s.intermediate),
    Projection("down_proj", "mlp", "mlp_out", "down_proj", "row", lambda s: s.hidden),
)

# Phi-3's checkpoints store q/k/v and gate/up already fused (`qkv_proj` rows [q|k|v], `gate_up_proj` [gate|up]).
PHI3_BLOCK = (
    Projection("qkv_proj", "self_attn", "attn_in", "qkv_proj", "column",
               lambda s: (s.heads + 2 * s.kv_heads) * s.head_dim, segments=3),
    Projection("o_proj", "self_attn", "attn_out", "o_proj", "row", lambda s: s.hidden, per_query=True),
    Projection("gate_up_proj", "mlp", "mlp_in", "gate_up_proj", "column", lambda s: 2 * s.intermediate, segments=2),
    Projection("down_proj", "mlp", "mlp_out", "down_proj", "row", lambda s: s.hidden),
)


@dataclass(frozen=True)
class Family:
    """A model family: the architectures (`config.json` `architectures[0]`) it covers and its block."""

    name: str
    architectures: tuple[str, ...]
    beyond_llama: str  # what the family adds around the block (README's table; none of it changes SPON)
    block: tuple[Projection, ...] = LLAMA_BLOCK
    backbone: str = "model"  # the decoder stack without the LM head
    layers_attr: str = "layers"

    @property
    def layers(self) -> str:
        """Module path of the decoder layers' list (`model.layers`)."""
        return f"{self.backbone}.{self.layers_attr}"

    @property
    def projections(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.block)

    @property
    def probe_tensor(self) -> str:
        """A weight that identifies the base model: the first projection of the first layer."""
        first = self.block[0]
        return f"{self.layers}.0.{first.parent}.{first.name}.weight"

    def check_projections(self, projections: Iterable[str] | None) -> tuple[str, ...]:
        """`projections` (None: all of the block's) in block order; a name the block lacks is refused."""
        wanted = self.projections if projections is None else tuple(projections)
        foreign = sorted(set(wanted) - set(self.projections))
        if foreign:
            raise CheckpointError(f"--projections {','.join(foreign)}: not linears of a {self.name} block; its "
                                  f"projections are {','.join(self.projections)}")
        return tuple(p for p in self.projections if p in wanted)

    def projection(self, name: str) -> Projection:
        return next(p for p in self.block if p.name == name)

    def module(self, layer: int, projection: str) -> str:
        """`model.layers.3.self_attn.k_proj`: the Hugging Face name of a projection of a layer."""
        return f"{self.layers}.{layer}.{self.projection(projection).parent}.{projection}"

    def parse(self, module: str) -> tuple[int, Projection]:
        """(layer index, projection) of a module name made by `module`; a foreign name is refused."""
        head, _, rest = module.partition(f"{self.layers}.")
        index, _, path = rest.partition(".")
        projection = next((p for p in self.block if path == f"{p.parent}.{p.name}"), None)
        if head or not index.isdigit() or projection is None:
            raise CheckpointError(f"{module!r} is not a sparsifiable module of a {self.name} model "
                                  f"({self.layers}.N.<{'|'.join(f'{p.parent}.{p.name}' for p in self.block)}>)")
        return int(index), projection

    def layer_index(self, module: str) -> int:
        return self.parse(module)[0]

    def site(self, module: str) -> str:
        """`model.layers.3:attn_in`: the input a module reads, shared with the modules that read it too."""
        index, projection = self.parse(module)
        return f"{self.layers}.{index}:{projection.reads}"

    def modules(self, shape: ModelShape, projections: tuple[str, ...]) -> dict[str, int]:
        """Every module of `projections` in model order, with its output size."""
        return {self.module(i, p.name): p.out_features(shape)
                for i in range(shape.layers) for p in self.block if p.name in projections}

    def vllm_layers(self) -> dict[str, tuple[str, ...]]:
        """vLLM layer leaf name -> the projections it holds, in output order (`qkv_proj`: q, k, v)."""
        layers: dict[str, tuple[str, ...]] = {}
        for p in self.block:
            layers[p.vllm_layer] = (*layers.get(p.vllm_layer, ()), p.name)
        return layers


FAMILIES = (
    Family("llama", ("LlamaForCausalLM",), "the reference block (Llama 2 and 3, SmolLM2)"),
    Family("mistral", ("MistralForCausalLM",), "sliding-window attention where the config sets one"),
    Family("qwen2", ("Qwen2ForCausalLM",), "biases on q/k/v_proj: the fused SPON bias is added on top of them"),
    Family("qwen3", ("Qwen3ForCausalLM",), "per-head RMSNorm of q and k after q/k_proj (the SPON bias is added "
           "before it); head_dim set in the config, not hidden / heads"),
    Family("granite", ("GraniteForCausalLM",), "embedding, residual, attention and logit multipliers"),
    Family("gemma2", ("Gemma2ForCausalLM",), "GELU-tanh MLP, (1 + w) RMSNorms before and after attention and "
           "MLP, embeddings scaled by sqrt(hidden), tied LM head, attention and final-logit soft-capping, "
           "alternating sliding-window layers"),
    Family("gemma3", ("Gemma3ForCausalLM",), "as Gemma 2, plus per-head q/k norms (after q/k_proj, so after the "
           "SPON bias), no attention soft-cap, local and global RoPE per layer type"),
    Family("phi3", ("Phi3ForCausalLM",), "q/k/v and gate/up stored fused in the checkpoint: one threshold and one "
           "bias per fused module, which vLLM splits into its segments", block=PHI3_BLOCK),
)
# Not in the table: mixture-of-experts models (their experts' MLPs are not linears of a block here).
SUPPORTED_ARCHITECTURES = tuple(a for f in FAMILIES for a in f.architectures)
# Every projection name of every family: what `--projections` may name before the model is known.
KNOWN_PROJECTIONS = tuple(dict.fromkeys(p for f in FAMILIES for p in f.projections))


def family_named(architecture: str, source: str) -> Family:
    """The family of an architecture, or one line naming it and the supported list."""
    family = next((f for f in FAMILIES if architecture in f.architectures), None)
    if family is None:
        raise CheckpointError(
            f"{source}: architecture {architecture} is not supported; vllm-spon supports "
            f"{', '.join(SUPPORTED_ARCHITECTURES)} (format/architectures.py says how to add a family)"
        )
    return family


def family_of(hf_config: dict, source: str) -> Family:
    """The family of a Hugging Face `config.json` (as a dict); `source` names the file in errors."""
    architectures = hf_config.get("architectures") or ["(none given)"]
    return family_named(str(architectures[0]), source)
