// CPU sparse linear: y[t, n] = bias[n] + sum over kept k, in increasing k, of x[t, k] * W_t[k, n].
//
// Why this shape of kernel: every output element is one fused multiply-add chain, started at +0 and run over
// the token's kept inputs in increasing k, then the bias added, all in float32. A dropped input adds nothing to
// that chain, so a token gets the same bits whatever other tokens share its batch and however the loops below
// are blocked: one token streams its kept rows (decode: bytes proportional to the kept rows); a tile of tokens
// reads each row any of them keeps once and masks the FMA off for the tokens that drop it (prefill: register
// blocking at FMA speed). vLLM mixes decode and chunked-prefill tokens in one batch; a dense matmul for some
// batch sizes and a sparse product for others made greedy answers depend on the batch (issue 10).
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

// The kept inputs of a tile of `tokens` tokens in one threshold group: `rows[j]` the j-th input index any of
// them keeps (increasing), `values[j * tokens + r]` token r's value there as float32 (0 where it drops it).
struct Packed {
  std::vector<int32_t> rows;
  std::vector<float> values;
};

// Tokens in tile i of a batch of `tokens`.
int tile_tokens(int64_t tokens, int64_t i) { return static_cast<int>(std::min<int64_t>(kTileTokens, tokens - i * kTileTokens)); }

bool kept(float v, float threshold) { return !(std::fabs(v) <= threshold); }

template <typename T>
Packed pack(const T* x, int64_t ldx, int tokens, int64_t in, float threshold) {
  Packed p;
  p.rows.reserve(in);
  p.values.reserve(in * tokens);
  float v[kTileTokens];
  for (int64_t k = 0; k < in; ++k) {
    bool any = false;
    for (int r = 0; r < tokens; ++r) {
      float value = static_cast<float>(x[r * ldx + k]);
      bool keep = kept(value, threshold);
      v[r] = keep ? value : 0.0f;
      any = any || keep;
    }
    if (any) {
      p.rows.push_back(static_cast<int32_t>(k));
      p.values.insert(p.values.end(), v, v + tokens);
    }
  }
  return p;
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

// One token, columns [c0, c1): the running sums live in y (L1-resident), each kept row's slice streamed once.
template <typename W>
SPON_AVX512 void stream_token(const Packed& p, const W* w, int64_t ldw, const float* bias, int64_t c0, int64_t c1,
                              float* y) {
  for (int64_t c = c0; c < c1; c += 16) _mm512_mask_storeu_ps(y + c, tail_mask(c1 - c), _mm512_setzero_ps());
  const int64_t count = static_cast<int64_t>(p.rows.size());
  for (int64_t j = 0; j < count; ++j) {
    const __m512 xb = _mm512_set1_ps(p.values[j]);
    const W* row = w + p.rows[j] * ldw;
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 m = tail_mask(c1 - c);
      _mm512_mask_storeu_ps(y + c, m, _mm512_fmadd_ps(xb, load16(row + c, m), _mm512_maskz_loadu_ps(m, y + c)));
    }
  }
  if (bias != nullptr) {
    for (int64_t c = c0; c < c1; c += 16) {
      const __mmask16 m = tail_mask(c1 - c);
      _mm512_mask_storeu_ps(y + c, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + c), _mm512_maskz_loadu_ps(m, bias + c)));
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
  const int64_t count = static_cast<int64_t>(p.rows.size());
  const int32_t* rows = p.rows.data();
  const float* values = p.values.data();
  for (int64_t j = 0; j < count; ++j) {
    const W* row = w + rows[j] * ldw + n0;
    __m512 wv[kTileVecs];
#pragma GCC unroll 4
    for (int v = 0; v < kTileVecs; ++v) wv[v] = load16(row + 16 * v, m[v]);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 xb = _mm512_set1_ps(values[j * MR + r]);
      const __mmask16 keep = _mm512_cmp_ps_mask(xb, zero, _CMP_NEQ_UQ);  // 0 = dropped by token r
#pragma GCC unroll 4
      for (int v = 0; v < kTileVecs; ++v) acc[r][v] = _mm512_mask3_fmadd_ps(xb, wv[v], acc[r][v], keep);
    }
  }
#pragma GCC unroll 4
  for (int v = 0; v < kTileVecs; ++v) {
    const __m512 b = bias != nullptr ? _mm512_maskz_loadu_ps(m[v], bias + n0 + 16 * v) : zero;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) _mm512_mask_storeu_ps(y + r * ldy + n0 + 16 * v, m[v], _mm512_add_ps(acc[r][v], b));
  }
}

template <typename W>
void tile_any(int tokens, const Packed& p, const W* w, int64_t ldw, const float* bias, int64_t n0, int64_t columns,
              float* y, int64_t ldy) {
  switch (tokens) {
    case 1: return tile<W, 1>(p, w, ldw, bias, n0, columns, y, ldy);
    case 2: return tile<W, 2>(p, w, ldw, bias, n0, columns, y, ldy);
    case 3: return tile<W, 3>(p, w, ldw, bias, n0, columns, y, ldy);
    case 4: return tile<W, 4>(p, w, ldw, bias, n0, columns, y, ldy);
    case 5: return tile<W, 5>(p, w, ldw, bias, n0, columns, y, ldy);
    default: return tile<W, kTileTokens>(p, w, ldw, bias, n0, columns, y, ldy);
  }
}

#endif  // __x86_64__

// ---- portable (CPUs without AVX-512): the same FMA chains, one output at a time -----------------------------

template <typename W>
void portable(const Packed& p, int tokens, const W* w, int64_t ldw, const float* bias, int64_t n0, int64_t n1,
              float* y, int64_t ldy) {
  for (int r = 0; r < tokens; ++r) {
    for (int64_t n = n0; n < n1; ++n) {
      float acc = 0.0f;
      for (size_t j = 0; j < p.rows.size(); ++j) {
        const float v = p.values[j * tokens + r];
        if (v != 0.0f || std::isnan(v)) acc = std::fma(v, static_cast<float>(w[p.rows[j] * ldw + n]), acc);
      }
      y[r * ldy + n] = bias != nullptr ? acc + bias[n] : acc;
    }
  }
}

// ---- driver ---------------------------------------------------------------------------------------------

#if defined(__x86_64__)
template <typename W>
void vectorized_group(const std::vector<Packed>& packed, int64_t tokens, const W* w, int64_t ldw, const float* bias,
                      int64_t n0, int64_t n1, float* y, int64_t ldy) {
  const int64_t tiles = static_cast<int64_t>(packed.size());
  const int64_t vectors = (n1 - n0 + 15) / 16;
  if (tokens == 1) {  // decode: each thread streams the kept rows' slice of its columns
    at::parallel_for(0, vectors, 16, [&](int64_t begin, int64_t end) {
      stream_token(packed[0], w, ldw, bias, n0 + 16 * begin, std::min(n1, n0 + 16 * end), y);
    });
    return;
  }
  const int64_t blocks = (vectors + kTileVecs - 1) / kTileVecs;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {  // a 64-column block of W stays in L2 across the token tiles
      const int64_t c = n0 + b * 16 * kTileVecs;
      const int64_t columns = std::min<int64_t>(16 * kTileVecs, n1 - c);
      for (int64_t i = 0; i < tiles; ++i)
        tile_any(tile_tokens(tokens, i), packed[i], w, ldw, bias, c, columns, y + i * kTileTokens * ldy, ldy);
    }
  });
}

#endif

template <typename T>
void run_group(const T* x, int64_t tokens, int64_t in, const T* w, int64_t ldw, const float* bias, float threshold,
               int64_t n0, int64_t n1, float* y, int64_t ldy, bool vectorized) {
  const int64_t tiles = (tokens + kTileTokens - 1) / kTileTokens;
  std::vector<Packed> packed(tokens == 1 ? 1 : tiles);
  if (tokens == 1) {
    packed[0] = pack(x, in, 1, in, threshold);
  } else {
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        packed[i] = pack(x + i * kTileTokens * in, in, tile_tokens(tokens, i), in, threshold);
      }
    });
  }
#if defined(__x86_64__)
  if (vectorized) {
    vectorized_group(packed, tokens, w, ldw, bias, n0, n1, y, ldy);
    return;
  }
#endif
  for (int64_t i = 0; i < static_cast<int64_t>(packed.size()); ++i)
    portable(packed[i], tile_tokens(tokens, i), w, ldw, bias, n0, n1, y + i * kTileTokens * ldy, ldy);
}
// Adjacent segments with one threshold form one group: one packing pass over x and one product for all of them.
template <typename T>
void run(const at::Tensor& x, const at::Tensor& weight_t, const float* t, c10::IntArrayRef segment_ends,
         const at::Tensor& b, at::Tensor& y, bool vectorized) {
  const int64_t out = weight_t.size(1);
  int64_t start = 0;
  for (size_t i = 0; i < segment_ends.size();) {
    size_t j = i + 1;
    while (j < segment_ends.size() && t[j] == t[i]) ++j;
    const int64_t end = segment_ends[j - 1];
    run_group(x.data_ptr<T>(), x.size(0), x.size(1), weight_t.data_ptr<T>(), out,
              b.defined() ? b.data_ptr<float>() : nullptr, t[i], start, end, y.data_ptr<float>(), out, vectorized);
    start = end;
    i = j;
  }
}

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight_t, const at::Tensor& thresholds,
                         c10::IntArrayRef segment_ends, const std::optional<at::Tensor>& bias,
                         std::optional<bool> vectorize) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(), "x must be a contiguous 2-D CPU tensor");
  TORCH_CHECK(weight_t.dim() == 2 && weight_t.is_contiguous() && weight_t.scalar_type() == x.scalar_type(),
              "weight_t must be a contiguous [in, out] tensor of x's dtype");
  TORCH_CHECK(weight_t.size(0) == x.size(1), "x has ", x.size(1), " features, weight_t ", weight_t.size(0), " rows");
  const int64_t out = weight_t.size(1);
  TORCH_CHECK(thresholds.scalar_type() == at::kFloat && thresholds.is_contiguous() &&
                  thresholds.numel() == static_cast<int64_t>(segment_ends.size()) && !segment_ends.empty() &&
                  segment_ends.back() == out,
              "thresholds must be float32, one per segment, and the last segment end the output size");
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
  const float* t = thresholds.data_ptr<float>();
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
  m.def("sparse_linear(Tensor x, Tensor weight_t, Tensor thresholds, int[] segment_ends, Tensor? bias, "
        "bool? vectorized=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(spon_cpu, CPU, m) { m.impl("sparse_linear", &sparse_linear); }
