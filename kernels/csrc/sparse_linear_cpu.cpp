// CPU sparse linear: y[t, n] = bias[n] + sum over kept k, in increasing k, of x[t, k] * W_t[k, n].
//
// Why this shape of kernel: every output element is one fused multiply-add chain, started at +0 and run over
// the token's kept inputs in increasing k, then the bias added, all in float32. A dropped input adds nothing to
// that chain, so a token gets the same bits whatever other tokens share its batch and however the loops below
// are blocked. Up to 6 tokens (decode) stream each weight row any of them keeps once, contiguously, the FMA
// masked off for the tokens that drop it: bytes in proportion to the kept rows. More tokens (prefill) run
// 6-token x 64-column register tiles over a float32 copy of a 64-column block of W, at FMA speed. vLLM mixes
// decode and chunked-prefill tokens in one batch; a dense matmul for some batch sizes and a sparse product for
// others made greedy answers depend on the batch (issue 10).
//
// "Kept" is `!(|x| <= t)` in float32: `|x| > t` of kernels/reference.py, except that NaN is kept, so a NaN
// input poisons its outputs as it does in the reference instead of being dropped. Inputs and weights are
// float32, bfloat16 or float16 (the weights in x's dtype); the products and sums are float32.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kTileTokens = 6;  // tokens per register tile: 6 x 4 accumulators + 4 weight vectors in 32 zmm
constexpr int kTileVecs = 4;    // 16-float vectors per register tile (64 columns)
// decode: rows prefetched ahead of the one being read, into L2 (`_MM_HINT_T1`): prefetching into L1 (T0) is
// capped by L1's few outstanding misses, and ran the same loop 1.3-1.6x slower on an AMD EPYC (kernels/NOTES.md)
constexpr int64_t kPrefetchRows = 8;
constexpr int64_t kStreamColumns = 256;   // decode: columns per pass over the kept rows (6 tokens' sums in L1)

// The kept inputs of a tile of `tokens` tokens in one threshold group: `rows[j]` (j < count) the j-th input index
// any of them keeps, increasing; `values[r * stride + j]` token r's value there as float32, 0 where it drops it.
struct Packed {
  std::vector<int32_t> rows;
  std::vector<float> values;
  int64_t stride = 0;
  int64_t count = 0;

  Packed(int tokens, int64_t in) : rows(in + 16), values(tokens * (in + 16)), stride(in + 16) {}
};

// Tokens in tile i of a batch of `tokens`.
int tile_tokens(int64_t tokens, int64_t i) {
  return static_cast<int>(std::min<int64_t>(kTileTokens, tokens - i * kTileTokens));
}

// Portable packing, branch-free (whether an input survives is a coin flip at 50% sparsity): every row is
// written, and the count advances past the rows some token keeps.
template <typename T>
void pack_portable(const T* x, int64_t ldx, int tokens, int64_t in, float threshold, Packed& p) {
  for (int64_t k = 0; k < in; ++k) {
    bool any = false;
    for (int r = 0; r < tokens; ++r) {
      const float value = static_cast<float>(x[r * ldx + k]);
      const bool keep = !(std::fabs(value) <= threshold);
      p.values[r * p.stride + p.count] = keep ? value : 0.0f;
      any |= keep;
    }
    p.rows[p.count] = static_cast<int32_t>(k);
    p.count += any;
  }
}

#if defined(__x86_64__)
// ---- AVX-512 --------------------------------------------------------------------------------------------

#define SPON_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

SPON_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
SPON_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SPON_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

inline __mmask16 tail_mask(int64_t columns_left) {
  if (columns_left >= 16) return 0xFFFF;
  return columns_left <= 0 ? 0 : static_cast<__mmask16>((1u << columns_left) - 1);
}

// The same packing, 16 inputs at a time: keep masks, their union, and compress-stores of rows and values.
template <typename T>
SPON_AVX512 void pack_avx512(const T* x, int64_t ldx, int tokens, int64_t in, float threshold, Packed& p) {
  const __m512 t = _mm512_set1_ps(threshold);
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  __m512 v[kTileTokens];
  for (int64_t k = 0; k < in; k += 16) {
    const __mmask16 m = tail_mask(in - k);
    __mmask16 any = 0;
    for (int r = 0; r < tokens; ++r) {
      v[r] = load16(x + r * ldx + k, m);
      const __mmask16 keep = _mm512_mask_cmp_ps_mask(m, _mm512_abs_ps(v[r]), t, _CMP_NLE_UQ);  // NaN kept
      v[r] = _mm512_maskz_mov_ps(keep, v[r]);
      any |= keep;
    }
    _mm512_mask_compressstoreu_epi32(p.rows.data() + p.count, any,
                                     _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(k))));
    for (int r = 0; r < tokens; ++r)
      _mm512_mask_compressstoreu_ps(p.values.data() + r * p.stride + p.count, any, v[r]);
    p.count += __builtin_popcount(any);
  }
}

// Decode (one tile of MR <= 6 tokens), columns [c0, c1): the running sums live in y (L1-resident), and each row
// any token keeps is streamed once, contiguously, the next rows prefetched (kept rows are scattered: the
// hardware prefetcher does not see them coming; measured 10-15% faster with it, 1.3-1.6x with it into L2).
template <typename W, int MR>
SPON_AVX512 void stream(const Packed& p, const W* w, int64_t ldw, const float* bias, int64_t c0, int64_t c1,
                        float* y, int64_t ldy) {
  const __m512 zero = _mm512_setzero_ps();
  for (int r = 0; r < MR; ++r)
    for (int64_t c = c0; c < c1; c += 16) _mm512_mask_storeu_ps(y + r * ldy + c, tail_mask(c1 - c), zero);
  const int64_t bytes = (c1 - c0) * static_cast<int64_t>(sizeof(W));
  for (int64_t j = 0; j < p.count; ++j) {
    if (j + kPrefetchRows < p.count) {
      const char* next = reinterpret_cast<const char*>(w + p.rows[j + kPrefetchRows] * ldw + c0);
      for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(next + b, _MM_HINT_T1);
    }
    __m512 xb[MR];
    __mmask16 keep[MR];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      xb[r] = _mm512_set1_ps(p.values[r * p.stride + j]);
      keep[r] = MR == 1 ? 0xFFFF : _mm512_cmp_ps_mask(xb[r], zero, _CMP_NEQ_UQ);  // 0 = dropped by token r
    }
    const W* row = w + p.rows[j] * ldw;
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 m = tail_mask(c1 - c);
      const __m512 wv = load16(row + c, m);
#pragma GCC unroll 8
      for (int r = 0; r < MR; ++r) {
        float* yc = y + r * ldy + c;
        _mm512_mask_storeu_ps(yc, m & keep[r], _mm512_fmadd_ps(xb[r], wv, _mm512_maskz_loadu_ps(m, yc)));
      }
    }
  }
  if (bias != nullptr) {
    for (int r = 0; r < MR; ++r)
      for (int64_t c = c0; c < c1; c += 16) {
        const __mmask16 m = tail_mask(c1 - c);
        float* yc = y + r * ldy + c;
        const __m512 sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, yc), _mm512_maskz_loadu_ps(m, bias + c));
        _mm512_mask_storeu_ps(yc, m, sum);
      }
  }
}

// MR tokens x up to 64 columns starting at n0 (`columns` of them), sums in registers; y rows ldy apart.
template <typename W, int MR>
SPON_AVX512 void tile(const Packed& p, const W* w, int64_t ldw, const float* bias, int64_t n0, int64_t columns,
                      float* y, int64_t ldy) {
  // Fully unrolled, so that the 4 * MR sums stay in registers (GCC spills the arrays to the stack otherwise).
  __m512 acc[MR][kTileVecs];
  __mmask16 m[kTileVecs];
#pragma GCC unroll 4
  for (int v = 0; v < kTileVecs; ++v) m[v] = tail_mask(columns - 16 * v);
#pragma GCC unroll 8
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < kTileVecs; ++v) acc[r][v] = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  const int64_t count = p.count;
  const int32_t* rows = p.rows.data();
  const float* values = p.values.data();
  for (int64_t j = 0; j < count; ++j) {
    const W* row = w + rows[j] * ldw + n0;
    __m512 wv[kTileVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kTileVecs; ++v) wv[v] = load16(row + 16 * v, m[v]);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(values[r * p.stride + j]);
      const __mmask16 keep = _mm512_cmp_ps_mask(xb, zero, _CMP_NEQ_UQ);  // 0 = dropped by token r
#pragma GCC unroll 4
      for (int v = 0; v < kTileVecs; ++v) acc[r][v] = _mm512_mask3_fmadd_ps(xb, wv[v], acc[r][v], keep);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < kTileVecs; ++v) {
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(m[v], bias + n0 + 16 * v) : zero;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
      _mm512_mask_storeu_ps(y + r * ldy + n0 + 16 * v, m[v], _mm512_add_ps(acc[r][v], b));
  }
}

// Columns [c, c + columns) of all `in` rows of W as float32, 64 floats a row (zeros past `columns`).
template <typename W>
SPON_AVX512 void pack_panel(const W* w, int64_t ldw, int64_t in, int64_t c, int64_t columns, float* panel) {
  for (int64_t k = 0; k < in; ++k)
    for (int v = 0; v < kTileVecs; ++v)
      _mm512_storeu_ps(panel + (k * kTileVecs + v) * 16, load16(w + k * ldw + c + 16 * v, tail_mask(columns - 16 * v)));
}

// The kernel K<W, MR> for a tile of `tokens` tokens (templates: the per-token loops unroll, sums in registers).
template <template <typename, int> class K, typename W, typename... Args>
void for_tokens(int tokens, Args&&... args) {
  switch (tokens) {
    case 1: return K<W, 1>::run(args...);
    case 2: return K<W, 2>::run(args...);
    case 3: return K<W, 3>::run(args...);
    case 4: return K<W, 4>::run(args...);
    case 5: return K<W, 5>::run(args...);
    default: return K<W, kTileTokens>::run(args...);
  }
}
template <typename W, int MR>
struct Stream {
  template <typename... Args>
  static void run(Args... args) { stream<W, MR>(args...); }
};
template <typename W, int MR>
struct Tile {
  template <typename... Args>
  static void run(Args... args) { tile<W, MR>(args...); }
};

#endif  // __x86_64__

// ---- portable (CPUs without AVX-512): the same FMA chains, one output at a time -----------------------------

template <typename W>
void portable(const Packed& p, int tokens, const W* w, int64_t ldw, const float* bias, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  for (int r = 0; r < tokens; ++r) {
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.0f;
      for (int64_t j = 0; j < p.count; ++j) {
        const float v = p.values[r * p.stride + j];
        if (v != 0.0f || std::isnan(v)) acc = std::fma(v, static_cast<float>(w[p.rows[j] * ldw + n]), acc);
      }
      y[r * ldy + n] = bias != nullptr ? acc + bias[n] : acc;
    }
  }
}

// ---- driver ---------------------------------------------------------------------------------------------

#if defined(__x86_64__)
template <typename W>
void vectorized_group(const std::vector<Packed>& packed, int64_t tokens, int64_t in, const W* w, int64_t ldw,
                      const float* bias, int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t tiles = static_cast<int64_t>(packed.size());
  const int64_t vectors = (n1 - n0 + 15) / 16;
  if (tiles == 1) {  // decode: each thread streams its columns of the kept rows, kStreamColumns at a time
    at::parallel_for(0, vectors, 16, [&](int64_t begin, int64_t end) {
      for (int64_t c = n0 + 16 * begin; c < std::min(n1, n0 + 16 * end); c += kStreamColumns)
        for_tokens<Stream, W>(static_cast<int>(tokens), packed[0], w, ldw, bias, c,
                              std::min({n1, n0 + 16 * end, c + kStreamColumns}), y, ldy);
    });
    return;
  }
  const int64_t blocks = (vectors + kTileVecs - 1) / kTileVecs;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> panel(in * 16 * kTileVecs);
    for (int64_t b = begin; b < end; ++b) {
      // Every tile reads this 64-column block: copied once into a contiguous float32 panel, it stays in L2 across
      // the tiles (rows of a wide layer are a power of two of cache sets apart and would evict each other).
      const int64_t c = n0 + b * 16 * kTileVecs;
      const int64_t columns = std::min<int64_t>(16 * kTileVecs, n1 - c);
      pack_panel(w, ldw, in, c, columns, panel.data());
      for (int64_t i = 0; i < tiles; ++i)
        for_tokens<Tile, float>(tile_tokens(tokens, i), packed[i], panel.data(), int64_t{16 * kTileVecs},
                                bias ? bias + c : nullptr, int64_t{0}, columns, y + i * kTileTokens * ldy + c, ldy);
    }
  });
}
#endif

template <typename T>
void run_group(const T* x, int64_t tokens, int64_t in, const T* w, int64_t ldw, const float* bias, float threshold,
               int64_t n0, int64_t n1, float* y, int64_t ldy, bool vectorized) {
  const int64_t tiles = (tokens + kTileTokens - 1) / kTileTokens;
  std::vector<Packed> packed;
  packed.reserve(tiles);
  for (int64_t i = 0; i < tiles; ++i) packed.emplace_back(tile_tokens(tokens, i), in);
  at::parallel_for(0, tiles, 8, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* xi = x + i * kTileTokens * in;
#if defined(__x86_64__)
      if (vectorized) {
        pack_avx512(xi, in, tile_tokens(tokens, i), in, threshold, packed[i]);
        continue;
      }
#endif
      pack_portable(xi, in, tile_tokens(tokens, i), in, threshold, packed[i]);
    }
  });
#if defined(__x86_64__)
  if (vectorized) {
    vectorized_group(packed, tokens, in, w, ldw, bias, n0, n1, y, ldy);
    return;
  }
#endif
  for (int64_t i = 0; i < static_cast<int64_t>(packed.size()); ++i)
    portable(packed[i], tile_tokens(tokens, i), w, ldw, bias, n0, n1, y + i * kTileTokens * ldy, ldy);
}

// Adjacent segments with one threshold form one group: one packing pass over x and one product for all of them.
// No thresholds: x is already thresholded, its zeros are the dropped inputs (threshold 0 for every segment).
template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight_t, const float* t, c10::IntArrayRef segment_ends,
         const at::Tensor& b, at::Tensor& y, bool vectorized) {
  const int64_t out = weight_t.size(1);
  int64_t start = 0;
  for (size_t i = 0; i < segment_ends.size();) {
    size_t j = t == nullptr ? segment_ends.size() : i + 1;
    while (j < segment_ends.size() && t[j] == t[i]) ++j;
    const int64_t end = segment_ends[j - 1];
    const float* bias = b.defined() ? b.data_ptr<float>() : nullptr;
    run_group(x.data_ptr<T>(), x.size(0), x.size(1), weight_t.data_ptr<T>(), out, bias, t == nullptr ? 0.0f : t[i],
              start, end, y.data_ptr<float>(), out, vectorized);
    start = end;
    i = j;
  }
}

at::Tensor sparse_linear(const at::Tensor& x_in, const at::Tensor& weight_t,
                         const std::optional<at::Tensor>& thresholds, c10::IntArrayRef segment_ends,
                         const std::optional<at::Tensor>& bias, std::optional<bool> vectorize) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.device().is_cpu(), "x must be a 2-D CPU tensor");
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous() && weight_t.scalar_type() == x.scalar_type(),
              "weight_t must be a contiguous [in, out] tensor of x's dtype");
  TORCH_CHECK(weight_t.size(0) == x.size(1), "x has ", x.size(1), " features, weight_t ", weight_t.size(0), " rows");
  const int64_t out = weight_t.size(1);
  TORCH_CHECK(!segment_ends.empty() && segment_ends.back() == out, "the last segment end must be the output size");
  TORCH_CHECK(!thresholds.has_value() ||
                  (thresholds->scalar_type() == at::kFloat && thresholds->is_contiguous() &&
                   thresholds->numel() == static_cast<int64_t>(segment_ends.size())),
              "thresholds must be float32, one per segment");
#if defined(__x86_64__)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#else
  const bool avx512 = false;
#endif
  const bool vectorized = vectorize.value_or(avx512);
  TORCH_CHECK(!vectorized || avx512, "the vectorized CPU kernel needs AVX-512 (F, BW)");
  const at::Tensor b = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
  TORCH_CHECK(!b.defined() || b.numel() == out, "bias must have ", out, " elements");
  at::Tensor y = at::empty({x.size(0), out}, x.options().dtype(at::kFloat));
  if (x.size(0) == 0) return y.to(x.scalar_type());
  const float* t = thresholds.has_value() ? thresholds->data_ptr<float>() : nullptr;
  switch (x.scalar_type()) {
    case at::kFloat: run<float>(x, weight_t, t, segment_ends, b, y, vectorized); break;
    case at::kBFloat16: run<c10::BFloat16>(x, weight_t, t, segment_ends, b, y, vectorized); break;
    case at::kHalf: run<c10::Half>(x, weight_t, t, segment_ends, b, y, vectorized); break;
    default: TORCH_CHECK(false, "x must be float32, bfloat16 or float16, not ", x.scalar_type());
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(spon_cpu, m) {
  m.def("sparse_linear(Tensor x, Tensor weight_t, Tensor? thresholds, int[] segment_ends, Tensor? bias, "
        "bool? vectorized=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(spon_cpu, CPU, m) { m.impl("sparse_linear", &sparse_linear); }
