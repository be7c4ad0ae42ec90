"""Triton kernels of the sparse linear: decode-sized products over `W^T [in, out]` that read only the weight
rows whose input survives, plus the fused thresholding that feeds the dense path.

One launch computes `y = bias + S(x) @ W^T` for all segments of a fused layer (q/k/v, gate/up): a column tile
never straddles a segment, so it reads one threshold. Kernels (kernels/NOTES.md has the measurements):

- `_kept_rows_kernel` (one token): work in proportion to the kept rows. Each program takes one column tile
  and one block of inputs, forms the block's keep mask and its prefix sum, and multiplies only the kept
  rows, bm at a time, found by a binary search of the prefix sum; a program with no kept rows does no work.
  The compaction is recomputed by every program from x (a few hundred bytes, in L2) instead of a second
  launch. Each program stores its fp32 partial sums in a slot of its own (in L2); the last program of a
  column tile adds the slots in a fixed order, adds the bias and writes `y` (`_finish`): the same bits on
  every run, which float atomics, adding in arrival order, did not give.
- `_compact_kernel` (1-4 tokens, kinds "compact" and "compact_mma"): the same work in proportion to the kept
  rows, but each program compacts its block once by a scatter - kept row indices and values at their
  prefix-sum ranks into a per-device scratch (L2), then one barrier - instead of searching the prefix sum
  for every group, and loads a group's rows with one gather. Several tokens: the rows any token keeps, each
  read once, every token's sums from them. "compact" sums with FMAs, "compact_mma" on the tensor cores
  (wgmma: W^T's rows transposed in registers as the A operand, the tokens as a 16-wide B).
- `_gemv_kernel` (one token): TEAL's grid of one-tile programs, masked loads of every row of the tile,
  the same slots and finalisation.
- `_sparse_matmul_kernel` (any token count, kind "dot"): tokens padded to 16 on tensor cores, every row
  tile visited, a row's bytes read once if any token keeps it; split-K partials reduced in a fixed order by
  the last program of a column tile.

The one-token kernels also take float8 weights (vLLM's fp8 quantization, W8A16: x stays 16-bit) with a
per-tensor or per-output-channel scale, applied once to the fp32 sums by the program that finalises a tile.

All keep per-device state (the arrival counters, the compaction scratch) that each launch leaves as it found
it, so launches must be ordered: one stream, as in decode. Importing this module needs Triton but not a GPU.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import triton
import triton.language as tl

MAX_SEGMENTS = 4  # segments one launch handles; more take one launch per segment
MAX_COMPACT_TOKENS = 4  # tokens the compacting kernels take in one launch
_MAX_TILES = 1 << 16  # arrival counters per device: column tiles of one launch (and as many group counters)


@dataclass(frozen=True)
class Config:
    """A launch configuration.

    kind "rows" (one token): `splits` programs per (column tile of bn, block of bm * groups inputs), each
    looping over every splits-th group of bm kept rows of its block (one group when splits == groups)
    (`_kept_rows_kernel`).
    kind "gemv" (one token): one [bm, bn] tile of W^T per program, a partial-sum slot each (`_gemv_kernel`).
    kind "dot" (any token count): tokens padded to 16 on tensor cores, `split_k` programs along the input
    dimension, each looping over its share in bm-row steps (`_sparse_matmul_kernel`).

    kind "compact" / "compact_mma" (1 to MAX_COMPACT_TOKENS tokens): as "rows" (bn, bm, groups, splits), but the
    block is compacted once per program by a scatter (several tokens: the rows any of them keeps, each read
    once) and the groups are summed with FMAs / on the tensor cores (`_compact_kernel`; float32 activations
    take the FMA form); num_stages > 1 pipelines the group loop. More tokens take "dot".
    kind "full_k" (one token): one program per column tile of bn over all of K, groups of bm kept rows,
    blocks of bm * groups inputs compacted at a time, num_stages deep (`_full_k_kernel`): no partial sums.

    fanin (the kinds with partial-sum slots but "dot"): 0, the last program of a column tile adds every
    slot; otherwise the slots are added in groups of `fanin` first (`_finish`).
    """

    kind: Literal["rows", "compact", "compact_mma", "full_k", "gemv", "dot"]  # one-token kinds take "dot" beyond
    bn: int
    bm: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 1
    groups: int = 1
    splits: int = 1
    fanin: int = 0

    def __post_init__(self) -> None:
        """Refuse what no kernel can launch (a hand-edited table, `VLLM_SPON_KERNEL_TABLE`), naming the field."""
        powers = {"bn": self.bn, "bm": self.bm, "num_warps": self.num_warps}
        counts = {"split_k": self.split_k, "num_stages": self.num_stages, "groups": self.groups, "splits": self.splits}
        bad = [f"{k}={v} (a power of two)" for k, v in powers.items() if v < 1 or v & (v - 1)]
        bad += [f"{k}={v} (at least 1)" for k, v in counts.items() if v < 1]
        bad += [f"fanin={self.fanin} (0, or at least 2)"] if self.fanin < 0 or self.fanin == 1 else []
        if bad:
            raise ValueError(f"kernel config {self.kind}: {', '.join(bad)}")


@triton.jit
def _segment_index(n0, end1, end2, end3):
    """The segment that column `n0` belongs to."""
    return (n0 >= end1).to(tl.int32) + (n0 >= end2).to(tl.int32) + (n0 >= end3).to(tl.int32)


@triton.jit
def _segment_threshold(thr_ptr, n0, end1, end2, end3):
    """The threshold of the segment that column `n0` belongs to."""
    return tl.load(thr_ptr + _segment_index(n0, end1, end2, end3))


@triton.jit
def _load_rows(w_ptr, offs_k, offs_n, mask_n, stride_w, keep):
    """Rows `offs_k` of W^T where `keep`; a dropped row is never read (each row is read once: evict first)."""
    return tl.load(
        w_ptr + offs_k[:, None] * stride_w + offs_n[None, :],
        mask=keep[:, None] & mask_n[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )


@triton.jit
def _kept_positions(csum, ranks, CB: tl.constexpr, BM: tl.constexpr):
    """Where in its block the kept input of each rank lies, `#{i : csum[i] <= rank}` for the inclusive prefix
    sum `csum` of the keep mask (CB a power of two): a bitwise binary search, log2(CB) register gathers.
    (A [BM, CB] comparison instead measured slower: kernels/NOTES.md.)"""
    pos = tl.zeros([BM], dtype=tl.int32)
    for s in tl.static_range(1, 20):
        if (CB >> s) > 0:
            below = tl.gather(csum, pos + ((CB >> s) - 1), axis=0) <= ranks
            pos = tl.where(below, pos + (CB >> s), pos)
    return pos


@triton.jit
def _sum_slots(part_ptr, first, count, N, offs_n, mask_n, STRIDE: tl.constexpr, MAX: tl.constexpr):
    """Slots `first, first + STRIDE, ...` of `part [SLOTS, N]`, `count <= MAX` of them, added in that order;
    unrolled up to 64 slots, so that their loads are in flight together."""
    total = tl.zeros([offs_n.shape[0]], dtype=tl.float32)
    if MAX <= 64:
        for s in tl.static_range(MAX):
            total += tl.load(part_ptr + (first + s * STRIDE) * N + offs_n, mask=mask_n & (s < count + offs_n * 0),
                             other=0.0, cache_modifier=".cg")  # fmt: skip
    else:
        for s in range(count):
            total += tl.load(part_ptr + (first + s * STRIDE) * N + offs_n, mask=mask_n, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def _finish(part_ptr, cnt_ptr, grp_ptr, bias_ptr, scale_ptr, y_ptr, acc, slot, pid_n, offs_n, mask_n, N,
            SLOTS: tl.constexpr, FANIN: tl.constexpr, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr):  # fmt: skip
    """Store this program's fp32 partial sums `acc` in its `slot` of `part [SLOTS, N]`, and let the last of the
    SLOTS programs of column tile `pid_n` add the slots in a fixed order (the same bits on every run: float
    atomics add in arrival order, which changes from run to run, and a last-bit change can flip a threshold
    and a greedy token), apply the weight scale (fp8 weights: after accumulation, so the loop multiplies raw
    fp8 values; SCALE 0 none, 1 per tensor, 2 per output channel), add the bias and write y.

    FANIN 0 (or >= SLOTS): one level, the last program reads every slot. Otherwise two levels: the last
    program of each group of FANIN consecutive slots adds them into the group's first slot, and the last
    group adds the groups' sums: with many slots, one program reading them all is a long chain of L2 round
    trips at the end of the launch (kernels/NOTES.md run 12: the fp8 GEMV's 448 slots 129 -> 24 us; the tuned
    configs, 8-56 slots, gain 0-5%). Arrival counters (`cnt_ptr [tiles]`, `grp_ptr [tiles, groups]`) are
    re-zeroed by their last reader for the next launch."""
    tl.store(part_ptr + slot * N + offs_n, acc, mask=mask_n)
    tl.debug_barrier()  # every thread's partial is stored before the release below
    if FANIN == 0 or FANIN >= SLOTS:
        if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == SLOTS - 1:
            total = _sum_slots(part_ptr, 0, SLOTS, N, offs_n, mask_n, 1, SLOTS)
            _store_output(total, bias_ptr, scale_ptr, y_ptr, offs_n, mask_n, HAS_BIAS, SCALE)
            tl.store(cnt_ptr + pid_n, 0)
    else:
        NGROUPS: tl.constexpr = (SLOTS + FANIN - 1) // FANIN
        first = slot // FANIN * FANIN
        size = tl.minimum(FANIN, SLOTS - first)  # the last group may be short
        group_cnt = grp_ptr + pid_n * NGROUPS + slot // FANIN
        if tl.atomic_add(group_cnt, 1, sem="acq_rel") == size - 1:
            group = _sum_slots(part_ptr, first, size, N, offs_n, mask_n, 1, FANIN)
            tl.store(part_ptr + first * N + offs_n, group, mask=mask_n)
            tl.store(group_cnt, 0)
            tl.debug_barrier()  # the group's sum is stored before the release below
            if tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel") == NGROUPS - 1:
                total = _sum_slots(part_ptr, 0, NGROUPS, N, offs_n, mask_n, FANIN, NGROUPS)
                _store_output(total, bias_ptr, scale_ptr, y_ptr, offs_n, mask_n, HAS_BIAS, SCALE)
                tl.store(cnt_ptr + pid_n, 0)


@triton.jit
def _store_output(total, bias_ptr, scale_ptr, y_ptr, offs_n, mask_n, HAS_BIAS: tl.constexpr, SCALE: tl.constexpr):
    """y for a column tile from its fp32 sums: the weight scale (SCALE 0 none, 1 per tensor, 2 per output
    channel), the bias, the cast to y's dtype."""
    if SCALE == 1:
        total *= tl.load(scale_ptr)
    elif SCALE == 2:
        total *= tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    if HAS_BIAS:
        total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_n, total.to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def _kept_rows_kernel(
    x_ptr, w_ptr, thr_ptr, bias_ptr, scale_ptr, y_ptr, part_ptr, cnt_ptr, grp_ptr,
    K, N, stride_w, end1, end2, end3,
    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUPS: tl.constexpr, SPLITS: tl.constexpr, SLOTS: tl.constexpr,
    FANIN: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    CB: tl.constexpr = BM * GROUPS
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    thr = _segment_threshold(thr_ptr, pid_n * BN, end1, end2, end3)
    # The block's keep mask and its prefix sum: the same in every program of the block, recomputed from x
    # (a few hundred bytes, in L2) instead of a second launch.
    k0 = pid_k * CB
    offs_c = k0 + tl.arange(0, CB)
    keep = (tl.abs(tl.load(x_ptr + offs_c, mask=offs_c < K, other=0.0).to(tl.float32)) > thr).to(tl.int32)
    csum = tl.cumsum(keep, axis=0)
    count = tl.sum(keep, axis=0)
    acc = tl.zeros([BN], dtype=tl.float32)
    # This program's groups of BM kept rows: every SPLITS-th one (one group when SPLITS == GROUPS).
    for r0 in range(pid_s * BM, count, SPLITS * BM):
        ranks = r0 + tl.arange(0, BM)
        valid = ranks < count
        offs_k = k0 + _kept_positions(csum, ranks, CB, BM)
        xv = tl.load(x_ptr + offs_k, mask=valid, other=0.0).to(tl.float32)
        w = _load_rows(w_ptr, offs_k, offs_n, mask_n, stride_w, valid)
        acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
    _finish(part_ptr, cnt_ptr, grp_ptr, bias_ptr, scale_ptr, y_ptr, acc, pid_k * SPLITS + pid_s, pid_n, offs_n,
            mask_n, N, SLOTS, FANIN, HAS_BIAS, SCALE)  # fmt: skip


@triton.jit
def _compact(x_ptr, stride_x, T, thr, k0, K, idx_ptr, xs_ptr, xs_stride, base,
             BT: tl.constexpr, CB: tl.constexpr, F16_RANGE: tl.constexpr):  # fmt: skip
    """Scatter the kept inputs of block `x[:, k0 : k0 + CB]` to `idx/xs[base + rank]` (rank: the order among
    the block's kept inputs; row index and value in fp32) and return (count, unscale). BT > 1 tokens (T of
    them real): a row is kept if any token keeps it (the union: each row is read once), and token t's value
    goes to `xs[t * xs_stride + base + rank]`, zero where that token drops the row. Every program of the
    block writes the same values, and reads them back after the barrier (its own writes, or equal ones).
    F16_RANGE: values multiplied by the power of two that puts the block's largest kept |x| in [2^14, 2^15),
    so that they convert to float16 exactly (bf16 inputs of a float16 tensor-core product); `unscale` undoes
    it on the sums (1 otherwise)."""
    offs = k0 + tl.arange(0, CB)
    if BT == 1:
        xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        keep = tl.abs(xv) > thr
    else:
        offs_t = tl.arange(0, BT)
        xv = tl.load(x_ptr + offs_t[:, None] * stride_x + offs[None, :],
                     mask=(offs_t[:, None] < T) & (offs[None, :] < K), other=0.0).to(tl.float32)  # fmt: skip
        xv = tl.where(tl.abs(xv) > thr, xv, 0.0)
        keep = tl.max(tl.abs(xv), axis=0) > 0
    csum = tl.cumsum(keep.to(tl.int32), axis=0)
    unscale = 1.0
    if F16_RANGE:
        amax = tl.max(tl.where(keep, tl.abs(xv), 0.0)) if BT == 1 else tl.max(tl.max(tl.abs(xv), axis=0))
        e = tl.maximum((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF, 15)  # biased exponent of amax
        xv = xv * ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(141 - e)
        unscale = ((e - 14) << 23).to(tl.float32, bitcast=True)  # 2^(e - 141)
    dst = base + csum - 1
    tl.store(idx_ptr + dst, offs, mask=keep)
    if BT == 1:
        tl.store(xs_ptr + dst, xv, mask=keep)
    else:
        tl.store(xs_ptr + offs_t[:, None] * xs_stride + dst[None, :], xv, mask=keep[None, :] & (offs_t[:, None] < T))
    tl.debug_barrier()  # the block's scatter is complete before any thread reads it back
    return tl.sum(keep.to(tl.int32), axis=0), unscale


@triton.jit
def _fp8_to_f16(w):
    """float8_e4m3 to float16 (exact), four at a time with the hardware conversion (sm_89+)."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=True, pack=4,
    )  # fmt: skip


@triton.jit
def _compact_kernel(
    x_ptr, w_ptr, thr_ptr, bias_ptr, scale_ptr, y_ptr, part_ptr, cnt_ptr, grp_ptr, idx_ptr, xs_ptr,
    K, N, stride_w, end1, end2, end3, T, stride_x, stride_y, xs_stride,
    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, GROUPS: tl.constexpr, SPLITS: tl.constexpr, SLOTS: tl.constexpr,
    FANIN: tl.constexpr,
    MMA: tl.constexpr, F16_RANGE: tl.constexpr, INTERPRET: tl.constexpr, STAGES: tl.constexpr, BT: tl.constexpr,
):  # fmt: skip
    """T <= BT tokens: program (column tile, block of CB = BM * GROUPS inputs, split) compacts its block
    (`_compact`: the rows any token keeps) and sums every SPLITS-th group of BM kept rows with FMAs (MMA 0)
    or on the tensor cores (MMA 1: acc^T [BN, 16] += W_rows^T [BN, BM] @ [x_rows of each token, 0, ...]
    [BM, 16], the weight rows as the register operand; float8 weights converted to float16, bf16/fp16 ones as
    they are). STAGES > 1: Triton's pipeliner keeps the next groups' index and row loads in flight (through
    shared memory) while a group is summed. Partial sums and the end as `_kept_rows_kernel`, each token with
    its own slots and arrival counters."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    CB: tl.constexpr = BM * GROUPS
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    seg = _segment_index(pid_n * BN, end1, end2, end3)
    k0 = pid_k * CB
    base = seg * K + k0  # this block's slots in the scratch (one region per segment: own thresholds)
    count, unscale = _compact(x_ptr, stride_x, T, tl.load(thr_ptr + seg), k0, K, idx_ptr, xs_ptr, xs_stride, base,
                              BT, CB, F16_RANGE)  # fmt: skip
    offs_t = tl.arange(0, BT)
    if MMA:
        acc2 = tl.zeros([BN, 16], dtype=tl.float32)
        col = tl.arange(0, 16)[None, :]
    elif BT == 1:
        acc = tl.zeros([BN], dtype=tl.float32)
    else:
        acc = tl.zeros([BT, BN], dtype=tl.float32)
    for r0 in tl.range(pid_s * BM, count, SPLITS * BM, num_stages=STAGES):
        ranks = tl.multiple_of(r0, BM) + tl.arange(0, BM)
        valid = ranks < count
        rows = tl.load(idx_ptr + base + ranks)  # unmasked (stale past count: the weight load is masked)
        if BT == 1:
            xv = tl.where(valid, tl.load(xs_ptr + base + ranks), 0.0)
        else:  # [BT, BM]; padded tokens read token 0's values and are never written out
            xv = tl.load(xs_ptr + (offs_t[:, None] % T) * xs_stride + base + ranks[None, :])
            xv = tl.where(valid[None, :], xv, 0.0)
        w = _load_rows(w_ptr, rows, offs_n, mask_n, stride_w, valid)
        if MMA:
            if w.dtype == tl.float8e4nv:
                w = w.to(tl.float16) if INTERPRET else _fp8_to_f16(w)
            if BT == 1:
                xcol = tl.where(col == 0, xv[:, None], 0.0).to(w.dtype)
            else:
                xcol = tl.sum(tl.where(col[None, :, :] == offs_t[:, None, None], xv[:, :, None], 0.0), axis=0)
                xcol = xcol.to(w.dtype)
            if INTERPRET:  # the CPU interpreter multiplies the raw bits of 16-bit dot operands
                acc2 = tl.dot(tl.trans(w.to(tl.float32)), xcol.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc2 = tl.dot(tl.trans(w), xcol, acc2)
        elif BT == 1:
            acc += tl.sum(w.to(tl.float32) * xv[:, None], axis=0)
        else:
            acc += tl.sum(w.to(tl.float32)[None, :, :] * xv[:, :, None], axis=1)
    slot = pid_k * SPLITS + pid_s
    if BT == 1:
        if MMA:
            acc = tl.sum(tl.where(col == 0, acc2, 0.0), axis=1)
        _finish(part_ptr, cnt_ptr, grp_ptr, bias_ptr, scale_ptr, y_ptr, acc * unscale, slot, pid_n, offs_n, mask_n,
                N, SLOTS, FANIN, HAS_BIAS, SCALE)  # fmt: skip
    else:
        n_tiles = tl.num_programs(0)
        for t in tl.static_range(BT):
            if t < T:
                if MMA:
                    acc_t = tl.sum(tl.where(col == t, acc2, 0.0), axis=1)
                else:
                    acc_t = tl.sum(tl.where(offs_t[:, None] == t, acc, 0.0), axis=0)
                _finish(part_ptr + t * SLOTS * N, cnt_ptr + t * n_tiles, grp_ptr + t * n_tiles * SLOTS, bias_ptr,
                        scale_ptr, y_ptr + t * stride_y, acc_t * unscale, slot, pid_n, offs_n, mask_n, N, SLOTS, FANIN,
                        HAS_BIAS, SCALE)  # fmt: skip


@triton.jit
def _full_k_kernel(
    x_ptr, w_ptr, thr_ptr, bias_ptr, scale_ptr, y_ptr, idx_ptr, xs_ptr,
    K, N, stride_w, end1, end2, end3,
    HAS_BIAS: tl.constexpr, SCALE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, CB: tl.constexpr, STAGES: tl.constexpr,
):  # fmt: skip
    """One token, one program per column tile over all of K: no partial sums, so no slots, no arrival
    counter and no finishing program. The program compacts all of x (CB at a time, ranks running on) into
    its segment's scratch region, then sums the kept rows BM at a time into a [BM, BN] accumulator
    (each thread keeps its own rows; one reduction at the end), the loop pipelined STAGES deep."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    seg = _segment_index(pid_n * BN, end1, end2, end3)
    thr = tl.load(thr_ptr + seg)
    base = seg * K
    total = 0
    for k0 in range(0, K, CB):
        offs = k0 + tl.arange(0, CB)
        xv = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        keep = tl.abs(xv) > thr
        dst = base + total + tl.cumsum(keep.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + dst, offs, mask=keep)
        tl.store(xs_ptr + dst, xv, mask=keep)
        total += tl.sum(keep.to(tl.int32), axis=0)
    tl.debug_barrier()  # the scatter is complete before any thread reads it back
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for r0 in tl.range(0, total, BM, num_stages=STAGES):
        ranks = r0 + tl.arange(0, BM)
        valid = ranks < total
        rows = tl.load(idx_ptr + base + ranks)
        xv = tl.where(valid, tl.load(xs_ptr + base + ranks), 0.0)
        w = _load_rows(w_ptr, rows, offs_n, mask_n, stride_w, valid)
        acc += w.to(tl.float32) * xv[:, None]
    _store_output(tl.sum(acc, axis=0), bias_ptr, scale_ptr, y_ptr, offs_n, mask_n, HAS_BIAS, SCALE)


@triton.jit
def _gemv_kernel(
    x_ptr,
    w_ptr,
    thr_ptr,
    bias_ptr,
    scale_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    grp_ptr,
    K,
    N,
    stride_w,
    end1,
    end2,
    end3,
    HAS_BIAS: tl.constexpr,
    SCALE: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SLOTS: tl.constexpr,
    FANIN: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    thr = _segment_threshold(thr_ptr, pid_n * BN, end1, end2, end3)
    offs_k = pid_k * BM + tl.arange(0, BM)
    x = tl.load(x_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    w = _load_rows(w_ptr, offs_k, offs_n, mask_n, stride_w, tl.abs(x) > thr)
    _finish(part_ptr, cnt_ptr, grp_ptr, bias_ptr, scale_ptr, y_ptr, tl.sum(w.to(tl.float32) * x[:, None], axis=0),
            pid_k, pid_n, offs_n, mask_n, N, SLOTS, FANIN, HAS_BIAS, SCALE)  # fmt: skip


@triton.jit
def _sparse_matmul_kernel(
    x_ptr,
    w_ptr,
    thr_ptr,
    bias_ptr,
    y_ptr,
    part_ptr,
    cnt_ptr,
    T,
    K,
    N,
    stride_x,
    stride_w,
    stride_y,
    k_per_split,
    end1,
    end2,
    end3,
    HAS_BIAS: tl.constexpr,
    BT: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    mask_n = offs_n < N
    thr = _segment_threshold(thr_ptr, pid_n * BN, end1, end2, end3)
    k_lo = pid_k * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    offs_t = tl.arange(0, BT)
    mask_t = offs_t < T
    acc = tl.zeros([BT, BN], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BM):  # a row is read once if any token keeps it (union mask)
        offs_k = k0 + tl.arange(0, BM)
        in_k = offs_k < k_hi
        xm = tl.load(
            x_ptr + offs_t[:, None] * stride_x + offs_k[None, :], mask=mask_t[:, None] & in_k[None, :], other=0.0
        )
        keep = (tl.abs(xm.to(tl.float32)) > thr) & mask_t[:, None] & in_k[None, :]
        rows = tl.max(keep.to(tl.int32), axis=0) > 0
        w = _load_rows(w_ptr, offs_k, offs_n, mask_n, stride_w, rows)
        xs = tl.where(keep, xm, 0.0)
        if UPCAST_DOT:  # Triton's CPU interpreter multiplies the raw bits of bf16 operands
            acc = tl.dot(xs.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(xs, w, acc, input_precision=PRECISION)
    offs_y = offs_t[:, None] * stride_y + offs_n[None, :]
    mask_y = mask_t[:, None] & mask_n[None, :]
    offs_p = offs_t[:, None] * N + offs_n[None, :]

    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += bias
        tl.store(y_ptr + offs_y, acc.to(y_ptr.dtype.element_ty), mask=mask_y)
    else:
        tl.store(part_ptr + pid_k * T * N + offs_p, acc, mask=mask_y)
        tl.debug_barrier()  # every thread's partial is stored before the release below
        arrived = tl.atomic_add(cnt_ptr + pid_n, 1, sem="acq_rel")
        if arrived == SPLIT_K - 1:  # the last program of this column tile reduces, in split order
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLIT_K):
                total += tl.load(part_ptr + s * T * N + offs_p, mask=mask_y, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += bias
            tl.store(y_ptr + offs_y, total.to(y_ptr.dtype.element_ty), mask=mask_y)
            tl.store(cnt_ptr + pid_n, 0)


@triton.jit
def _sparsify_segments_kernel(x_ptr, thr_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    """out[s] = S_{t_s}(x) for every segment s (grid axis 1): one read of x for the dense path."""
    seg = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    thr = tl.load(thr_ptr + seg)
    tl.store(out_ptr + seg * numel + offs, tl.where(tl.abs(x.to(tl.float32)) > thr, x, 0.0), mask=mask)


_counters: dict[torch.device, torch.Tensor] = {}
_scratches: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_SCRATCH_K = 1 << 16  # inputs per segment the compaction scratch holds by default (Llama-3-405B: 53248)


def _arrival_counters(device: torch.device) -> torch.Tensor:
    """Zeroed int32 counters kept zero by the kernels themselves (reset by their last reader): `[:_MAX_TILES]`
    one per column tile, `[_MAX_TILES:]` one per group of slots of `_finish`'s first level."""
    cnt = _counters.get(device)
    if cnt is None:
        cnt = _counters[device] = torch.zeros(2 * _MAX_TILES, dtype=torch.int32, device=device)
    return cnt


def compaction_scratch(device: torch.device, k: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The compacted row indices (int32 `[R]`) and values (fp32 `[MAX_COMPACT_TOKENS, R]`, a region per token)
    of `_compact_kernel` on `device`: R holds MAX_SEGMENTS regions of at least `k` inputs, plus slack for a
    block's unmasked reads past its count. Written before it is read in every launch (no zeroing needed);
    allocated by `kernels.prepare` before graph capture."""
    need = MAX_SEGMENTS * max(k, _SCRATCH_K) + 8192
    scratch = _scratches.get(device)
    if scratch is None or scratch[0].numel() < need:
        values = torch.zeros(MAX_COMPACT_TOKENS, need, dtype=torch.float32, device=device)
        scratch = _scratches[device] = (torch.zeros(need, dtype=torch.int32, device=device), values)
    return scratch


def _blocks_and_splits(config: Config, k: int) -> tuple[int, int]:
    """Input blocks and programs per block of a one-token kind with partial-sum slots on `k` inputs."""
    blocks = triton.cdiv(k, config.bm * (1 if config.kind == "gemv" else config.groups))
    return blocks, 1 if config.kind == "gemv" else min(config.splits, config.groups)


def partial_slots(config: Config, k: int) -> int:
    """Partial-sum slots per column tile of `config` on `k` inputs (`_finish`'s SLOTS; 0: a kind without)."""
    if config.kind not in ("rows", "compact", "compact_mma", "gemv"):
        return 0
    blocks, splits = _blocks_and_splits(config, k)
    return blocks * splits


def tile_n(bn: int, segment_ends: Sequence[int]) -> int:
    """The column tile a launch uses: at most `bn`, and dividing every segment's size, so that a column tile
    never straddles two segments (it reads one threshold)."""
    starts = [0, *segment_ends[:-1]]
    return min(bn, *((e - s) & (s - e) for s, e in zip(starts, segment_ends, strict=True)))


def launch(
    x: torch.Tensor,
    weight_t: torch.Tensor,
    thresholds: torch.Tensor,
    segment_ends: Sequence[int],
    bias: torch.Tensor | None,
    config: Config,
    out: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """`y = bias + S(x) @ weight_t` per segment, with the sparse kernel under `config` (no host sync).

    weight_scale: float32 `[1]` (per tensor) or `[out]` (per output channel) for a float8 weight_t, applied
    to the fp32 sums (`y = bias + scale * (S(x) @ weight_t)`); one token and the one-token kinds only.
    """
    T, N = x.shape[0], weight_t.shape[1]
    if weight_scale is not None and (T != 1 or config.kind == "dot"):
        raise ValueError(f"scaled (fp8) weights take the one-token kernels only, not {T} tokens under {config}")
    y = torch.empty((T, N), dtype=x.dtype, device=x.device) if out is None else out
    ends = list(segment_ends)
    starts = [0, *ends[:-1]]
    # One launch takes at most MAX_SEGMENTS segments whose sizes a column tile of 16 or more divides.
    # Otherwise launch per segment on column slices (strided views).
    bn = tile_n(config.bn, ends)
    if bn < 16 or len(ends) > MAX_SEGMENTS:
        per_channel = weight_scale is not None and weight_scale.numel() > 1
        for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
            b = None if bias is None else bias[s:e]
            scale = weight_scale[s:e] if per_channel else weight_scale
            _launch_one(x, weight_t[:, s:e], thresholds[i : i + 1], [e - s], b, scale, config, config.bn, y[:, s:e])
        return y
    _launch_one(x, weight_t, thresholds, ends, bias, weight_scale, config, bn, y)
    return y


def _launch_one(x, w, thresholds, ends, bias, scale, config: Config, bn: int, y) -> None:
    T, K = x.shape
    N = w.shape[1]
    inner = [*ends[:-1], N, N, N][:3]
    n_tiles = triton.cdiv(N, bn)
    cnt = _arrival_counters(x.device)
    assert n_tiles <= _MAX_TILES, f"{n_tiles} column tiles exceed the {_MAX_TILES} arrival counters"
    if config.kind == "full_k" and T == 1:
        idx, xs = compaction_scratch(x.device, K)
        _full_k_kernel[(n_tiles,)](
            x, w, thresholds, y if bias is None else bias, y if scale is None else scale, y, idx, xs, K, N,
            w.stride(0), *inner, HAS_BIAS=bias is not None,
            SCALE=0 if scale is None else 1 if scale.numel() == 1 else 2, BM=config.bm, BN=bn,
            CB=config.bm * config.groups, STAGES=config.num_stages, num_warps=config.num_warps,
        )  # fmt: skip
        return
    compact = config.kind in ("compact", "compact_mma") and T <= MAX_COMPACT_TOKENS
    if compact or (config.kind in ("rows", "gemv") and T == 1):
        blocks, splits = _blocks_and_splits(config, K)
        slots = blocks * splits
        part = torch.empty((T, slots, N), dtype=torch.float32, device=x.device)  # every slot written
        assert T * n_tiles <= _MAX_TILES, f"{T} x {n_tiles} column tiles exceed the {_MAX_TILES} arrival counters"
        assert config.fanin == 0 or T * n_tiles * slots <= _MAX_TILES, f"{T} x {n_tiles} x {slots} group counters"
        # unused pointers take y: a kernel never reads them
        common = (x, w, thresholds, y if bias is None else bias, y if scale is None else scale, y, part, cnt,
                  cnt[_MAX_TILES:], K, N, w.stride(0), *inner)  # fmt: skip
        flags = dict(HAS_BIAS=bias is not None, SCALE=0 if scale is None else 1 if scale.numel() == 1 else 2,
                     BM=config.bm, BN=bn, SLOTS=slots, FANIN=config.fanin, num_warps=config.num_warps)  # fmt: skip
        if compact:
            idx, xs = compaction_scratch(x.device, K)
            mma = config.kind == "compact_mma" and x.dtype != torch.float32  # fp32: the FMA form
            _compact_kernel[(n_tiles, blocks, splits)](
                *common[:9], idx, xs, *common[9:], T, x.stride(0), y.stride(0), xs.stride(0), **flags,
                GROUPS=config.groups, SPLITS=splits, MMA=mma,
                F16_RANGE=mma and w.dtype == torch.float8_e4m3fn and x.dtype == torch.bfloat16,
                INTERPRET=x.device.type == "cpu", STAGES=config.num_stages, BT=triton.next_power_of_2(T),
            )  # fmt: skip
        elif config.kind == "rows":
            _kept_rows_kernel[(n_tiles, blocks, splits)](*common, **flags, GROUPS=config.groups, SPLITS=splits)
        else:
            _gemv_kernel[(n_tiles, blocks)](*common, **flags)
        return
    bt = max(16, triton.next_power_of_2(T))
    bm = max(config.bm, 16)
    split_k = max(1, min(config.split_k, triton.cdiv(K, bm)))
    k_per_split = triton.cdiv(triton.cdiv(K, split_k), bm) * bm
    split_k = triton.cdiv(K, k_per_split)
    part = y if split_k == 1 else torch.empty((split_k, T, N), dtype=torch.float32, device=x.device)
    _sparse_matmul_kernel[(n_tiles, split_k)](
        x, w, thresholds, y if bias is None else bias, y, part, cnt, T, K, N,
        x.stride(0), w.stride(0), y.stride(0), k_per_split, *inner,
        HAS_BIAS=bias is not None, BT=bt, BM=bm, BN=bn, SPLIT_K=split_k,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32", UPCAST_DOT=x.device.type == "cpu",
        num_warps=config.num_warps, num_stages=config.num_stages,
    )  # fmt: skip


def sparsify_segments(x: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """`[n_seg, *x.shape]`: S_{t_s}(x) for each threshold, in one launch (x contiguous)."""
    out = torch.empty((thresholds.numel(), *x.shape), dtype=x.dtype, device=x.device)
    block = 2048
    _sparsify_segments_kernel[(triton.cdiv(x.numel(), block), thresholds.numel())](
        x, thresholds, out, x.numel(), BLOCK=block
    )
    return out
