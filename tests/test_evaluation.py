"""One measurement of dense / TEAL / SPON perplexity, always at matched sparsity: calibration's held-out check,
`vllm-spon eval` and its JSON agree, TEAL runs its own thresholds, and the gap recovered is reported only when
both methods ran within 0.01 sparsity of each other."""

import json

import pytest

from tests.checkpoint_edits import claim_calibration
from vllm_spon.calibration.data import DEFAULT_EVAL_DATA
from vllm_spon.calibration.evaluate import EvalArgs, evaluate
from vllm_spon.calibration.handmade import write_handmade
from vllm_spon.calibration.sparse_model import SparseModel, load_hf_model
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
