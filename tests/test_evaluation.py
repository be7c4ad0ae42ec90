"""One measurement of dense / TEAL / SPON perplexity, always at matched sparsity: calibration's held-out check,
`vllm-spon eval` and its JSON agree, TEAL runs its own thresholds, and the gap recovered is reported only when
both methods ran within 0.01 sparsity of each other."""

import json

import pytest

from tests.checkpoint_edits import claim_calibration
from vllm_spon.calibration.data import DEFAULT_EVAL_DATA
from vllm_spon.calibration.evaluate import MATCH_TOLERANCE, EvalArgs, compare_methods, evaluate
from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model
from vllm_spon.calibration.thresholds import fit_thresholds
from vllm_spon.format.checkpoint import load_checkpoint, read_config
from vllm_spon.format.errors import CheckpointError
from vllm_spon.format.schema import PerplexityReport


def report(teal_sparsity: float, spon_sparsity: float, teal: float = 60.0) -> PerplexityReport:
    return PerplexityReport(data="d", num_windows=1, window=16, dense=40.0, teal=teal, spon=50.0,
                            teal_sparsity=teal_sparsity, spon_sparsity=spon_sparsity)


def test_gap_recovered_only_at_matched_sparsity():
    assert report(0.50, 0.505).gap_recovered == pytest.approx(0.5)
    unmatched = report(0.53, 0.50)
    assert unmatched.gap_recovered is None
    assert "0.530" in unmatched.gap_note() and "0.500" in unmatched.gap_note()
    no_gap = report(0.5, 0.5, teal=39.0)
    assert no_gap.gap_recovered is None and "no gap" in no_gap.gap_note()


def test_gap_against_rescaled_teal_only_where_the_rescale_reached_spons_sparsity():
    rescaled = report(0.49, 0.505).model_copy(update={"teal_rescaled": 70.0, "teal_rescaled_sparsity": 0.506,
                                                       "teal_rescaled_scale": 1.04})
    assert rescaled.gap_recovered == pytest.approx((70 - 50) / (70 - 40))
    assert "times 1.0400, at 0.506" in rescaled.gap_note() and "ran at 0.490" in rescaled.gap_note()
    missed = rescaled.model_copy(update={"teal_rescaled_sparsity": 0.52})
    assert missed.gap_recovered is None and "more than 0.01 apart (TEAL with rescaled" in missed.gap_note()
    # TEAL's own thresholds matched: the rescale is not needed and not used
    assert report(0.50, 0.505).model_copy(update={"teal_rescaled": 99.0}).gap_recovered == pytest.approx(0.5)


def test_compare_methods_rescales_teal_to_spons_sparsity_when_its_own_thresholds_miss(tiny_model):
    """TEAL's thresholds a quarter below SPON's zero visibly less; the report then carries TEAL rescaled to SPON's
    sparsity, within 0.002 (the search's tolerance), and the gap against it. The model keeps SPON's thresholds."""
    import torch

    sparse = SparseModel(load_hf_model(tiny_model))
    windows = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    thresholds = fit_thresholds(sparse, windows, dict.fromkeys(sparse.linears, 0.5), stats="dense")
    teal = {m: 0.75 * t for m, t in thresholds.items()}
    result = compare_methods(sparse, windows, "random ids", teal, thresholds, "teal")
    assert result.spon_sparsity - result.teal_sparsity > 0.05
    assert result.teal_rescaled_sparsity == pytest.approx(result.spon_sparsity, abs=MATCH_TOLERANCE)
    assert result.teal_rescaled_scale == pytest.approx(4 / 3, rel=0.05)
    assert result.teal_rescaled == pytest.approx(result.spon, rel=0.02)  # nearly the same thresholds
    assert result.rescaled_matched and result.gap_recovered is not None
    assert {m: float(t) for m, t in sparse.thresholds.items()} == pytest.approx(thresholds)


def test_teal_thresholds_must_name_the_checkpoint_modules(tiny_llama_dir, tmp_path):
    modules = SparseModel(load_hf_model(tiny_llama_dir)).linears
    checkpoint = write_handmade(tiny_llama_dir, tmp_path / "ckpt", dict.fromkeys(modules, 0.1))
    config_file = checkpoint / "spon" / "config.json"
    config = json.loads(config_file.read_text())
    claim_calibration(config)
    config["teal_thresholds"] = dict.fromkeys(list(modules)[1:], 0.1)
    config_file.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="teal_thresholds and thresholds name different modules"):
        read_config(checkpoint)


@pytest.mark.slow
def test_eval_repeats_calibrations_check_with_teals_own_thresholds(spon_checkpoint_dir):
    """On calibration's own held-out windows, `eval` measures exactly what calibration recorded: TEAL with the
    thresholds fitted for it (at the target sparsity, not SPON's refitted ones), SPON with its own, and the gap
    recovered because both sparsities match."""
    config = load_checkpoint(spon_checkpoint_dir).config
    recorded = config.perplexity
    assert config.teal_thresholds is not None and config.teal_thresholds != config.thresholds
    assert recorded.data == DEFAULT_EVAL_DATA
    measured, result = evaluate(EvalArgs(checkpoint=spon_checkpoint_dir, data=recorded.data,
                                         windows=recorded.num_windows, window=recorded.window))
    for field in ("dense", "teal", "spon", "teal_sparsity", "spon_sparsity"):
        assert getattr(measured, field) == pytest.approx(getattr(recorded, field), rel=1e-5), field
    assert measured.matched, (measured.teal_sparsity, measured.spon_sparsity)
    assert result["gap_recovered"] == pytest.approx(measured.gap_recovered, abs=1e-4)
    assert result["teal_thresholds"].startswith("TEAL's own")
