"""`spon/config.json`: what a checkpoint claims, validated at the edge (pydantic), and the option types that
calibration's arguments and the config share (declared once, here)."""

import math
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .architectures import KNOWN_PROJECTIONS

FORMAT_VERSION = 1

Layout = Literal["full", "overlay"]
Method = Literal["spon", "teal"]
BiasSpace = Literal["input", "output"]
ThresholdStats = Literal["dense", "sequential"]
Allocation = Literal["uniform", "greedy", "greedy-input"]
# vLLM's fp8 weight quantization the model is served with (`vllm serve --quantization ...`), or none.
Quantization = Literal["none", "fp8", "fp8_per_channel"]


def _known_projections(v: tuple[str, ...]) -> tuple[str, ...]:
    unknown = sorted(set(v) - set(KNOWN_PROJECTIONS))
    if unknown or not v:
        raise ValueError(f"projections must be a non-empty subset of {KNOWN_PROJECTIONS}, got {list(v)}")
    return v


# Which linear modules (by leaf name) of every decoder block are sparsified.
Projections = Annotated[tuple[str, ...], AfterValidator(_known_projections)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseModelRef(_Strict):
    """Identity of the base model a checkpoint was calibrated on."""

    path: str = Field(description="base model directory at calibration time (overlays load weights from it)")
    architecture: str
    shape: dict[str, int] = Field(description="the config fields in identity.SHAPE_FIELDS the model has")
    probe_tensor: str = Field(description="the weight whose values identify the model (its family's)")
    probe_sha256: str = Field(description="sha256 of the probe tensor's values as float32")


class CalibrationInfo(_Strict):
    """How the thresholds and biases were made: enough to reproduce them."""

    data: str
    num_tokens: int = Field(gt=0)
    window: int = Field(gt=0)
    threshold_stats: ThresholdStats
    allocation: Allocation
    steps: int = Field(ge=0)
    lr: float = Field(ge=0)
    tokens_per_step: int = Field(ge=0)
    seed: int
    seconds: float = Field(ge=0)
    quantization: Quantization = Field(
        default="none", description="the student's weights were rounded as this vLLM quantization rounds them")


# Sparsities (achieved on the same windows) within which TEAL and SPON are compared: beyond it a method's
# perplexity differs by how much it drops, not by how well it recovers.
MATCHED_SPARSITY = 0.01


class PerplexityReport(_Strict):
    """Dense, TEAL and SPON perplexity on the same held-out windows: TEAL with its own thresholds and no
    biases, SPON with the checkpoint's thresholds and biases (`evaluate.compare_methods` measures it, for
    calibration's check, `eval`, its plot and the benchmarks alike). Where TEAL's own thresholds zero a
    different fraction of these windows than SPON's, TEAL is measured again with its thresholds scaled by one
    common factor until it zeroes what SPON zeroes (`teal_rescaled_*`): a comparison at matched sparsity."""

    data: str
    num_windows: int = Field(gt=0)
    window: int = Field(gt=0)
    dense: float = Field(gt=0)
    teal: float = Field(gt=0)
    spon: float = Field(gt=0)
    teal_sparsity: float = Field(ge=0, le=1)
    spon_sparsity: float = Field(ge=0, le=1)
    quantization: Quantization = Field(default="none", description="the weights of all three, as vLLM rounds them")
    teal_rescaled: float | None = Field(
        default=None, gt=0, description="TEAL's perplexity with its thresholds times teal_rescaled_scale (None: not "
        "needed, its own thresholds matched SPON's sparsity)")
    teal_rescaled_sparsity: float | None = Field(default=None, ge=0, le=1)
    teal_rescaled_scale: float | None = Field(default=None, gt=0)

    @property
    def matched(self) -> bool:
        return abs(self.teal_sparsity - self.spon_sparsity) <= MATCHED_SPARSITY

    @property
    def rescaled_matched(self) -> bool:
        return (not self.matched and self.teal_rescaled_sparsity is not None
                and abs(self.teal_rescaled_sparsity - self.spon_sparsity) <= MATCHED_SPARSITY)

    @property
    def matched_teal(self) -> float | None:
        """TEAL's perplexity at SPON's sparsity: with its own thresholds where they match it, else rescaled ones
        where those do; None when neither does."""
        if self.matched:
            return self.teal
        return self.teal_rescaled if self.rescaled_matched else None

    @property
    def gap_recovered(self) -> float | None:
        """(TEAL - SPON) / (TEAL - dense) against TEAL at SPON's sparsity, only with a gap to recover."""
        teal = self.matched_teal
        return (teal - self.spon) / (teal - self.dense) if teal is not None and teal > self.dense else None

    def gap_note(self) -> str:
        """Why `gap_recovered` is what it is, in words for the user."""
        teal = self.matched_teal
        if teal is None:
            rescaled = ("" if self.teal_rescaled_sparsity is None else
                        f" (TEAL with rescaled thresholds reached only {self.teal_rescaled_sparsity:.3f})")
            return (f"not reported: TEAL ran at sparsity {self.teal_sparsity:.3f} and SPON at "
                    f"{self.spon_sparsity:.3f} on these windows, more than {MATCHED_SPARSITY} apart{rescaled}")
        if teal <= self.dense:
            return "not reported: TEAL is no worse than dense here, there is no gap to recover"
        if self.matched:
            return (f"at matched sparsity (TEAL {self.teal_sparsity:.3f}, SPON {self.spon_sparsity:.3f}): "
                    "(TEAL - SPON) / (TEAL - dense)")
        return (f"at matched sparsity: TEAL's own thresholds ran at {self.teal_sparsity:.3f} (perplexity "
                f"{self.teal:.4g}) and SPON's at {self.spon_sparsity:.3f}, so TEAL is taken with its thresholds "
                f"times {self.teal_rescaled_scale:.4f}, at {self.teal_rescaled_sparsity:.3f} (perplexity "
                f"{self.teal_rescaled:.4g}): (TEAL - SPON) / (TEAL - dense)")


class SponConfig(_Strict):
    """`spon/config.json`."""

    format: Literal["spon"] = "spon"
    format_version: int
    layout: Layout
    base_model: BaseModelRef
    method: Method = Field(description="teal: thresholds only; spon: thresholds + biases")
    bias_space: BiasSpace | None = Field(
        default=None, description="where the SPON vectors were learned before fusion (None for teal)"
    )
    target_sparsity: float = Field(ge=0, lt=1)
    achieved_sparsity: float | None = Field(
        ge=0, le=1, description="parameter-weighted, on calibration tokens (None: hand-made, not measured)")
    projections: Projections = Field(description="which projections of every block are sparsified")
    thresholds: dict[str, float] = Field(description="module name -> threshold (a copy of the tensors)")
    teal_thresholds: dict[str, float] | None = Field(
        default=None,
        description="module name -> TEAL's own threshold, fitted for TEAL before SPON training: the baseline "
        "`eval` compares SPON against at matched sparsity (None in hand-made checkpoints)",
    )
    module_sparsity: dict[str, float] | None = Field(
        description="module name -> sparsity on calibration tokens (None: hand-made, not measured)")
    calibration: CalibrationInfo | None = Field(
        description="how calibration made it; None: thresholds and biases set by hand (tests, synthetic "
        "benchmarks), nothing measured")
    perplexity: PerplexityReport | None = None
    created_at: str
    vllm_spon_version: str

    @property
    def handmade(self) -> bool:
        return self.calibration is None

    @field_validator("format_version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != FORMAT_VERSION:
            raise ValueError(
                f"unknown format_version {v}: this vllm-spon reads version {FORMAT_VERSION}; "
                "re-run `vllm-spon calibrate` or install the vllm-spon release that wrote it"
            )
        return v

    @field_validator("thresholds", "teal_thresholds")
    @classmethod
    def _finite_non_negative(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        bad = {k: t for k, t in (v or {}).items() if not (math.isfinite(t) and t >= 0)}
        if bad:
            raise ValueError(f"thresholds must be finite and >= 0: {bad}")
        return v

    @model_validator(mode="after")
    def _bias_space_matches_method(self) -> "SponConfig":
        if (self.method == "spon") != (self.bias_space is not None):
            raise ValueError("bias_space is required for method 'spon' and must be null for method 'teal'")
        return self

    @model_validator(mode="after")
    def _measured_only_when_calibrated(self) -> "SponConfig":
        measured = (self.achieved_sparsity, self.module_sparsity, self.perplexity, self.teal_thresholds)
        if self.handmade and any(m is not None for m in measured):
            raise ValueError("a hand-made checkpoint (calibration null) records no measurements: achieved_sparsity, "
                             "module_sparsity, perplexity and teal_thresholds must be null")
        if not self.handmade and (self.achieved_sparsity is None or self.module_sparsity is None):
            raise ValueError("a calibrated checkpoint records achieved_sparsity and module_sparsity")
        return self

    @model_validator(mode="after")
    def _teal_thresholds_cover_the_modules(self) -> "SponConfig":
        if self.teal_thresholds is not None and set(self.teal_thresholds) != set(self.thresholds):
            odd = sorted(set(self.teal_thresholds) ^ set(self.thresholds))
            raise ValueError(f"teal_thresholds and thresholds name different modules (e.g. {odd[0]})")
        return self
