"""The benchmark scripts' own logic that runs without a GPU."""

import pytest

from tests.conftest import load_benchmark


def test_profile_diff_matches_one_kernel_across_two_builds():
    """cutlass with another epilogue and an Inductor kernel with other fused ops are the same family, so the
    difference lands on them; the largest difference comes first."""
    bench = load_benchmark("bench_gpu_e2e")
    gemm = "void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8<cutlass::float_e4m3_t, {}>>(Params)"
    attention = "void cutlass::device_kernel<flash::enable_sm90_or_later<flash::FlashAttnFwdSm90<2>>>(Params)"
    a = {"step_us": 200.0, "batch": 8, "kernels": [
        {"name": gemm.format("ScaledEpilogue"), "us_per_step": 100.0, "launches_per_step": 4},
        {"name": attention, "us_per_step": 50.0, "launches_per_step": 2},
        {"name": "triton_red_fused_add_rms_norm_1", "us_per_step": 50.0, "launches_per_step": 2}]}
    b = {"step_us": 230.0, "batch": 8, "kernels": [
        {"name": gemm.format("ScaledEpilogueColumnBias"), "us_per_step": 90.0, "launches_per_step": 3},
        {"name": gemm.format("ScaledEpilogue"), "us_per_step": 30.0, "launches_per_step": 1},
        {"name": attention, "us_per_step": 50.0, "launches_per_step": 2},
        {"name": "triton_red_fused_abs_add_gt_rms_norm_select_1", "us_per_step": 60.0, "launches_per_step": 2}]}
    lines = bench.profile_diff(a, b).splitlines()
    assert lines[0] == "step: 200 -> 230 us (+30) at batch 8 / 8"
    assert lines[3] == "| void cutlass::device_kernel<vllm::cutlass_3x_gemm_sm90_fp8 | 100.0 (4) | 120.0 (4) | +20.0 |"
    assert lines[4] == "| triton_red_..._1 | 50.0 (2) | 60.0 (2) | +10.0 |"
    assert lines[5] == "| void cutlass::device_kernel<flash::enable_sm90_or_later | 50.0 (2) | 50.0 (2) | +0.0 |"
    assert len(lines) == 6


def test_calibration_rows_resume_only_under_their_own_settings(tmp_path):
    """A rerun in the same work directory reuses a row only if the same overrides made it: seed 1 must never
    report seed 0's numbers; a new evaluation setting needs --reevaluate, and a row without settings is refused."""
    check = load_benchmark("bench_calibration").check_resumable
    row = tmp_path / "spon50.json"
    seed0 = {"calibrate": {"seed": 0}, "teal_from": None, "eval_windows": 32}
    check(row, seed0, dict(seed0), reevaluate=False)  # the same run resumed
    with pytest.raises(SystemExit, match="was calibrated with"):
        check(row, seed0, {**seed0, "calibrate": {"seed": 1}}, reevaluate=True)
    more_windows = {**seed0, "eval_windows": 64}
    with pytest.raises(SystemExit, match="--reevaluate"):
        check(row, seed0, more_windows, reevaluate=False)
    check(row, seed0, more_windows, reevaluate=True)
    with pytest.raises(SystemExit, match="none recorded"):
        check(row, None, seed0, reevaluate=True)
