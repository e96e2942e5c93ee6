// A few rows times a weight matrix, out[r, n] = x[r, :] · w[n, :] + bias[n]: a decode step's linear layers.
//
// With one to a few rows the product does two FLOPs per weight element read, so its speed is the speed at which
// the weights stream from memory. Each thread takes a contiguous block of weight rows and walks it front to back,
// four rows at a time (neighbouring sequential streams the hardware prefetcher follows), dotting them with every
// input row while they sit in L1. Every output element is one dot product in a fixed order, so a row's result does
// not depend on the batch it is in or on the thread count. bf16 weights are widened to fp32 as they are loaded
// (AVX2 has no bf16 arithmetic) and the sums rounded to bf16 at the end, as PyTorch's bf16 matmul does.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

namespace {

// Weight rows a thread's task reads at least: 512 KiB (tens of microseconds). A smaller matrix is read by one
// thread, as waking another costs more than the read; every larger one is split, as one core alone streams well
// below the memory's rate.
inline int64_t task_rows(int64_t k, size_t element_size) {
  return std::max<int64_t>(4, (int64_t{512} << 10) / (k * static_cast<int64_t>(element_size)));
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const c10::BFloat16* p) {  // bf16 is the top half of an fp32: widen by a 16-bit shift
  __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float hsum(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}
#endif

// w[0:k] · x[0:k] with four independent accumulators (the FMA latency hidden), in a fixed order.
template <typename W>
inline float dot(const W* w, const float* x, int64_t k) {
  int64_t i = 0;
  float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (; i + 32 <= k; i += 32) {
    a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
    a1 = _mm256_fmadd_ps(load8(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
    a2 = _mm256_fmadd_ps(load8(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
    a3 = _mm256_fmadd_ps(load8(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
  }
  for (; i + 8 <= k; i += 8) a0 = _mm256_fmadd_ps(load8(w + i), _mm256_loadu_ps(x + i), a0);
  s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
  for (; i < k; ++i) s += static_cast<float>(w[i]) * x[i];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
// Four consecutive weight rows (w, w + k, ...) dotted with x at once: each 8-float slice of x is loaded once for
// four rows, and the four rows are four neighbouring streams. Per row the same order as `dot`.
template <typename W>
inline void dot4(const W* w, const float* x, int64_t k, float* out) {
  __m256 a[4][2];
  for (auto& r : a) r[0] = r[1] = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= k; i += 16) {
    const __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
    for (int r = 0; r < 4; ++r) {
      a[r][0] = _mm256_fmadd_ps(load8(w + r * k + i), x0, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(load8(w + r * k + i + 8), x1, a[r][1]);
    }
  }
  for (int r = 0; r < 4; ++r) {
    float s = hsum(_mm256_add_ps(a[r][0], a[r][1]));
    for (int64_t j = i; j < k; ++j) s += static_cast<float>(w[r * k + j]) * x[j];
    out[r] = s;
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// bf16 rows dotted with x split into its even and odd elements (xe[j] = x[2j], xo[j] = x[2j + 1]): 16 bf16 of a
// row are one 256-bit load, whose 32-bit lanes hold an (even, odd) pair; a shift moves the even element into the
// high half, a mask keeps the odd one, and each is an fp32 vector against xe or xo. Two integer operations per 16
// elements instead of two widening shuffles and two shifts: on a CPU without bf16 arithmetic the widening, not the
// memory, limited the stream. k must be a multiple of 16; each row's sum in the same order whatever R.
// The pairs loop does more per byte than the fp32 one and issues its loads more slowly, so the hardware
// prefetcher alone keeps too few lines in flight: each row also asks for the line 8 KiB ahead of it.
constexpr int kPairsPrefetch = 8192;

template <int R>  // rows at once: a compile-time count, so the accumulators stay in registers
inline void dot_pairs(const c10::BFloat16* w, const float* xe, const float* xo, int64_t k, float* out) {
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
  __m256 a[R][2];
  for (auto& r : a) r[0] = r[1] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 16) {
    const __m256 e = _mm256_loadu_ps(xe + i / 2), o = _mm256_loadu_ps(xo + i / 2);
    for (int r = 0; r < R; ++r) {
      _mm_prefetch(reinterpret_cast<const char*>(w + r * k + i) + kPairsPrefetch, _MM_HINT_T0);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + r * k + i));
      a[r][0] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), e, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, high)), o, a[r][1]);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = hsum(_mm256_add_ps(a[r][0], a[r][1]));
}

void gemv_rows_pairs(const c10::BFloat16* x, const c10::BFloat16* w, const c10::BFloat16* bias, c10::BFloat16* out,
                     int64_t rows, int64_t n, int64_t k) {
  std::vector<float> split(rows * k);  // per input row: its k/2 even elements, then its k/2 odd ones
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < k / 2; ++j) {
      split[r * k + j] = static_cast<float>(x[r * k + 2 * j]);
      split[r * k + k / 2 + j] = static_cast<float>(x[r * k + 2 * j + 1]);
    }
  const int64_t grain = task_rows(k, sizeof(c10::BFloat16));
  at::parallel_for(0, (n + 3) / 4, grain / 4, [&](int64_t b0, int64_t b1) {
    float sums[4];
    for (int64_t j = b0 * 4; j < std::min(n, b1 * 4); j += 4) {
      const int count = static_cast<int>(std::min<int64_t>(4, n - j));
      for (int64_t r = 0; r < rows; ++r) {
        const float *xe = split.data() + r * k, *xo = xe + k / 2;
        if (count == 4) {
          dot_pairs<4>(w + j * k, xe, xo, k, sums);
        } else {
          for (int c = 0; c < count; ++c) dot_pairs<1>(w + (j + c) * k, xe, xo, k, sums + c);
        }
        for (int c = 0; c < count; ++c)
          out[r * n + j + c] = static_cast<c10::BFloat16>(sums[c] + (bias ? static_cast<float>(bias[j + c]) : 0.f));
      }
    }
  });
}
#endif

template <typename W>
void gemv_rows(const float* x, const W* w, const W* bias, W* out, int64_t rows, int64_t n, int64_t k) {
  const int64_t grain = task_rows(k, sizeof(W));
  at::parallel_for(0, (n + 3) / 4, grain / 4, [&](int64_t b0, int64_t b1) {
    float sums[4];
    for (int64_t j = b0 * 4; j < std::min(n, b1 * 4); j += 4) {
      const int64_t count = std::min<int64_t>(4, n - j);
      for (int64_t r = 0; r < rows; ++r) {
#if defined(__AVX2__) && defined(__FMA__)
        if (count == 4) {
          dot4(w + j * k, x + r * k, k, sums);
        } else
#endif
          for (int64_t c = 0; c < count; ++c) sums[c] = dot(w + (j + c) * k, x + r * k, k);
        for (int64_t c = 0; c < count; ++c)
          out[r * n + j + c] = static_cast<W>(sums[c] + (bias ? static_cast<float>(bias[j + c]) : 0.f));
      }
    }
  });
}

at::Tensor gemv_2d(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(weight.dim() == 2 && weight.device().is_cpu() && weight.is_contiguous() &&
                  (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kBFloat16),
              "gemv: expected a contiguous 2-D fp32 or bf16 CPU weight");
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK(x.dim() == 2 && x.size(1) == k && x.scalar_type() == weight.scalar_type() && x.device().is_cpu(),
              "gemv: expected x [rows, ", k, "] of the weight's dtype");
  TORCH_CHECK(!bias.has_value() || (bias->numel() == n && bias->scalar_type() == weight.scalar_type() &&
                                    bias->is_contiguous()),
              "gemv: expected a contiguous bias of ", n, " elements of the weight's dtype");
  at::Tensor out = at::empty({x.size(0), n}, weight.options());
  if (weight.scalar_type() == at::kFloat) {
    const at::Tensor xf = x.contiguous();
    gemv_rows<float>(xf.data_ptr<float>(), weight.data_ptr<float>(),
                     bias.has_value() ? bias->data_ptr<float>() : nullptr, out.data_ptr<float>(), x.size(0), n, k);
  } else {
    using bf16 = c10::BFloat16;
#if defined(__AVX2__) && defined(__FMA__)
    if (k % 16 == 0) {  // widened as they are split: no conversion operator before the product
      gemv_rows_pairs(x.contiguous().data_ptr<bf16>(), weight.data_ptr<bf16>(),
                      bias.has_value() ? bias->data_ptr<bf16>() : nullptr, out.data_ptr<bf16>(), x.size(0), n, k);
      return out;
    }
#endif
    const at::Tensor xf = x.to(at::kFloat).contiguous();  // the inputs in fp32 once: a few KB
    gemv_rows<bf16>(xf.data_ptr<float>(), weight.data_ptr<bf16>(),
                    bias.has_value() ? bias->data_ptr<bf16>() : nullptr, out.data_ptr<bf16>(), x.size(0), n, k);
  }
  return out;
}

// x [..., K] → [..., N]: the rows of any leading shape (a decode step's [batch, 1, K]) without a reshape operator
// on the Python side, whose dispatch costs as much as a small product's arithmetic.
at::Tensor gemv(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() >= 1, "gemv: expected x with a last dimension of ", weight.size(-1));
  if (x.dim() == 2) return gemv_2d(x, weight, bias);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = weight.size(0);
  return gemv_2d(x.reshape({-1, x.size(-1)}), weight, bias).view(shape);
}

}  // namespace

TORCH_LIBRARY(scalelm_cpu_gemv, m) { m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor", &gemv); }
