// Causal fp32 attention for CPUs, for the short sequences (a few hundred positions) of small models.
//
// Why not PyTorch's CPU flash-attention kernel: it tiles queries in blocks of 32–64 rows and calls a GEMM per
// (batch, head, block) pair of tiles, which runs at about a third of a core's fp32 peak on a 64-wide head; the
// whole [T, T] score block of one (batch, head) pair fits in a core's L2 cache when T is a few hundred, and
// single-threaded BLAS GEMMs of that size run at ~95% of peak. So each thread takes whole (batch, head) pairs,
// computes scores and probabilities for a block of query rows against all keys they may see (causal: the
// upper-right blocks are skipped), and keeps only the log-sum-exp per row for the backward, like
// FlashAttention-2 (the backward's row term Σ_j P_ij dP_ij comes from the blocks in cache, so the output is not
// read again). GEMMs go to ATen's BLAS (MKL on x86 wheels); the softmax is a vectorizable loop.
// Rotary position embedding is applied here too, to the pair's q and k rows while they are in cache (and undone
// on their gradients): as separate compiled passes over q and k it cost a quarter as much as flash attention.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX__
#include <immintrin.h>
#endif

namespace {

// The Fortran BLAS entry point (column-major, 32-bit sizes): PyTorch's CPU library exports it from the BLAS it
// is built with (MKL on x86 wheels), while ATen's own C++ GEMM wrapper is not exported to extensions.
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

// Row-major C[M, N] = alpha · op(A) · op(B) + beta · C: the column-major call with A and B swapped.
inline void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                 int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int LDA = static_cast<int>(ldb), LDB = static_cast<int>(lda), LDC = static_cast<int>(ldc);
  sgemm_(&ta, &tb, &M, &N, &K, &alpha, b, &LDA, a, &LDB, &beta, c, &LDC);
}

// The float with these bits. GCC 11+ and clang have the builtin; memcpy is the portable spelling (and may keep
// older compilers from vectorizing the loops that use it).
inline float as_float(int32_t bits) {
#if defined(__has_builtin)
#if __has_builtin(__builtin_bit_cast)
  return __builtin_bit_cast(float, bits);
#endif
#endif
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// exp for x <= 0 (softmax arguments): Cody-Waite range reduction and Cephes' degree-6 polynomial, written so
// that the compiler vectorizes the loops calling it: libm's expf and std::floor keep them scalar (the rounding is
// the add-and-subtract of 1.5 · 2^23), and std::max on references compiles to a branch.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;  // exp(-87) ~ 1.6e-38, the smallest normal float's neighbourhood
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln 2)
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  const float r2 = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r2 + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n
  return p * as_float(bits);
}

struct View {  // a [B, H, T, D] fp32 tensor with unit stride over D
  float* data;
  int64_t sb, sh, st;
  explicit View(const at::Tensor& t)
      : data(t.data_ptr<float>()), sb(t.stride(0)), sh(t.stride(1)), st(t.stride(2)) {}
  float* at(int64_t b, int64_t h) const { return data + b * sb + h * sh; }
};

void check(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4 && t.stride(3) == 1 &&
                  (t.stride(2) >= t.size(3) || t.size(2) == 1),
              name, ": expected a [B, H, T, D] fp32 CPU tensor with unit stride over D and rows at least D apart");
}

// An output laid out [B, T, H, D] in memory and returned as its [B, H, T, D] view: the model's next step
// (merging heads) then needs no copy.
at::Tensor empty_bthd(const at::Tensor& like, int64_t heads) {
  return at::empty({like.size(0), like.size(2), heads, like.size(3)}, like.options()).transpose(1, 2);
}

// Whether rows of `width` floats at dst, ld apart, can be written with 32-byte streaming stores.
bool can_stream(const float* dst, int64_t ld, int64_t width) {
#ifdef __AVX__
  return width % 8 == 0 && reinterpret_cast<uintptr_t>(dst) % 32 == 0 && ld % 8 == 0;
#else
  (void)dst, (void)ld, (void)width;
  return false;
#endif
}

// RoPE on T rows of a head (row stride ld) into dst [T, D]: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), with x1
// and x2 the two halves of a row and cos, sin [T, D/2] (scalelm.model.gpt.apply_rope).
void rotate(const float* src, int64_t ld, float* dst, int64_t T, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  for (int64_t t = 0; t < T; ++t) {
    const float *x = src + t * ld, *c = cos + t * half, *s = sin + t * half;
    float* y = dst + t * D;
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      y[i] = x[i] * c[i] - x[i + half] * s[i];
      y[i + half] = x[i + half] * c[i] + x[i] * s[i];
    }
  }
}

// The transpose of `rotate`, for gradients: g [T, D] (with respect to rotated rows) -> dst rows (stride ld).
// dst is the packed gradient, written once and read only by the next GEMM: with AVX, streaming stores skip
// reading each destination line into cache first (unrotating dq and dk ran at ~3 GB/s without them).
void unrotate(const float* g, float* dst, int64_t ld, int64_t T, int64_t D, const float* cos, const float* sin) {
  const int64_t half = D / 2;
  const bool stream = can_stream(dst, ld, half);
  for (int64_t t = 0; t < T; ++t) {
    const float *x = g + t * D, *c = cos + t * half, *s = sin + t * half;
    float* y = dst + t * ld;
#ifdef __AVX__
    if (stream) {
      for (int64_t i = 0; i < half; i += 8) {
        const __m256 x1 = _mm256_loadu_ps(x + i), x2 = _mm256_loadu_ps(x + i + half);
        const __m256 cv = _mm256_loadu_ps(c + i), sv = _mm256_loadu_ps(s + i);
        _mm256_stream_ps(y + i, _mm256_add_ps(_mm256_mul_ps(x1, cv), _mm256_mul_ps(x2, sv)));
        _mm256_stream_ps(y + i + half, _mm256_sub_ps(_mm256_mul_ps(x2, cv), _mm256_mul_ps(x1, sv)));
      }
      continue;
    }
#endif
#pragma omp simd
    for (int64_t i = 0; i < half; ++i) {
      y[i] = x[i] * c[i] + x[i + half] * s[i];
      y[i + half] = x[i + half] * c[i] - x[i] * s[i];
    }
  }
#ifdef __AVX__
  if (stream) _mm_sfence();  // streaming stores are weakly ordered: complete them before anyone reads dst
#endif
}

// Rows [T, D] of a thread's scratch (contiguous) to their place in an output (row stride ld): streaming stores
// where aligned, as in `unrotate`.
void store_rows(const float* src, float* dst, int64_t ld, int64_t T, int64_t D) {
  const bool stream = can_stream(dst, ld, D);
  for (int64_t t = 0; t < T; ++t) {
    const float* x = src + t * D;
    float* y = dst + t * ld;
#ifdef __AVX__
    if (stream) {
      for (int64_t i = 0; i < D; i += 8) _mm256_stream_ps(y + i, _mm256_loadu_ps(x + i));
      continue;
    }
#endif
    std::copy(x, x + D, y);
  }
#ifdef __AVX__
  if (stream) _mm_sfence();
#endif
}

struct Rope {  // optional cos/sin tables [T, D/2]
  const float *cos = nullptr, *sin = nullptr;
  Rope(const c10::optional<at::Tensor>& c, const c10::optional<at::Tensor>& s, int64_t T, int64_t D) {
    TORCH_CHECK(c.has_value() == s.has_value(), "rope: give both cos and sin, or neither");
    if (!c.has_value()) return;
    for (const at::Tensor* t : {&*c, &*s})
      TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 &&
                      t->size(0) == T && t->size(1) * 2 == D,
                  "rope: cos and sin must be contiguous fp32 CPU tensors [T, D/2]");
    cos = c->data_ptr<float>(), sin = s->data_ptr<float>();
  }
  bool on() const { return cos != nullptr; }
};

// 64-byte-aligned float scratch blocks of a thread (BLAS results may depend on alignment).
int64_t aligned(int64_t n) { return (n + 15) / 16 * 16; }

}  // namespace

// q, k and v as [B, heads, T, D] views of the packed projection qkv [B, T, H + 2·KV, D].
std::vector<at::Tensor> split_heads(const at::Tensor& qkv, int64_t heads) {
  TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 4 && qkv.stride(3) == 1 &&
                  (qkv.stride(1) >= qkv.size(3) || qkv.size(1) == 1) && (qkv.stride(2) >= qkv.size(3)),
              "qkv: expected a [B, T, heads, D] fp32 CPU tensor with unit stride over D and rows at least D apart");
  const int64_t kv = (qkv.size(2) - heads) / 2;
  TORCH_CHECK(heads > 0 && kv > 0 && heads + 2 * kv == qkv.size(2) && heads % kv == 0,
              "qkv: ", qkv.size(2), " heads cannot be split into ", heads, " query heads and two equal k, v groups");
  return {qkv.narrow(2, 0, heads).transpose(1, 2), qkv.narrow(2, heads, kv).transpose(1, 2),
          qkv.narrow(2, heads + kv, kv).transpose(1, 2)};
}

std::vector<at::Tensor> attention_forward(const at::Tensor& qkv, int64_t heads, const c10::optional<at::Tensor>& cos,
                                          const c10::optional<at::Tensor>& sin, double scale, int64_t block) {
  const auto views = split_heads(qkv, heads);
  const at::Tensor &q = views[0], &k = views[1], &v = views[2];
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  const Rope rope(cos, sin, T, D);
  at::Tensor out = empty_bthd(q, H);
  at::Tensor lse = at::empty({B, H, T}, q.options());
  const View Q(q), K(k), V(v), O(out);
  float* L = lse.data_ptr<float>();
  const int64_t group = H / KV, bq = std::min<int64_t>(std::max<int64_t>(block, 1), T);
  const float alpha = static_cast<float>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_s = aligned(bq * T), n_r = aligned(T * D);
    at::Tensor buf = at::empty({n_s + 2 * n_r + aligned(bq)}, q.options());  // S, rotated q and k, 1/row sums
    float *S = buf.data_ptr<float>(), *q_rot = S + n_s, *k_rot = q_rot + n_r, *inv_sum = k_rot + n_r;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const float *q0 = Q.at(b, h), *k0 = K.at(b, h / group), *v0 = V.at(b, h / group);
      int64_t ldq = Q.st, ldk = K.st;
      if (rope.on()) {
        rotate(q0, ldq, q_rot, T, D, rope.cos, rope.sin), rotate(k0, ldk, k_rot, T, D, rope.cos, rope.sin);
        q0 = q_rot, k0 = k_rot, ldq = ldk = D;
      }
      float *o0 = O.at(b, h), *l0 = L + task * T;
      for (int64_t r0 = 0; r0 < T; r0 += bq) {
        const int64_t rows = std::min(bq, T - r0), cols = r0 + rows;  // keys 0..cols-1 are visible
        gemm(false, true, rows, cols, D, alpha, q0 + r0 * ldq, ldq, k0, ldk, 0.0f, S, T);
        for (int64_t i = 0; i < rows; ++i) {
          float* s = S + i * T;
          const int64_t n = r0 + i + 1;
          float m = s[0];
#pragma omp simd reduction(max : m)
          for (int64_t j = 1; j < n; ++j) m = s[j] > m ? s[j] : m;
          float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < n; ++j) {
            s[j] = exp_nonpositive(s[j] - m);
            sum += s[j];
          }
          std::fill(s + n, s + cols, 0.0f);
          inv_sum[i] = 1.0f / sum;
          l0[r0 + i] = m + std::log(sum);
        }
        // O = P V with P unnormalized, then each output row scaled (in cache): D values a row, not up to T.
        // (Through a scratch block and streaming stores instead, the forward was slower: 8.2 against 7.3 ms.)
        float* ob = o0 + r0 * O.st;
        gemm(false, false, rows, D, cols, 1.0f, S, T, v0, V.st, 0.0f, ob, O.st);
        for (int64_t i = 0; i < rows; ++i) {
          float* o = ob + i * O.st;
          const float inv = inv_sum[i];
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) o[d] *= inv;
        }
      }
    }
  });
  return {out, lse};
}

// The gradient with respect to the packed qkv, written in place of the three gradients and their concatenation.
at::Tensor attention_backward(const at::Tensor& grad_out, const at::Tensor& qkv, const at::Tensor& lse, int64_t heads, const c10::optional<at::Tensor>& cos,
                              const c10::optional<at::Tensor>& sin, double scale, int64_t block) {
  check(grad_out, "grad_out");
  const auto views = split_heads(qkv, heads);
  const at::Tensor &q = views[0], &k = views[1], &v = views[2];
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), KV = k.size(1);
  const Rope rope(cos, sin, T, D);
  at::Tensor lse_c = lse.contiguous();
  at::Tensor dqkv = at::empty_like(qkv, at::MemoryFormat::Contiguous);
  const auto grads = split_heads(dqkv, heads);
  const at::Tensor &dq = grads[0], &dk = grads[1], &dv = grads[2];
  const View Q(q), K(k), V(v), dO(grad_out), dQ(dq), dK(dk), dV(dv);
  const float* L = lse_c.data_ptr<float>();
  const int64_t group = H / KV, bq = std::min<int64_t>(std::max<int64_t>(block, 1), T);
  const float alpha = static_cast<float>(scale);
  // One task per (batch, kv head): the query heads that share a kv head add into the same dK and dV.
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    const int64_t n_s = aligned(bq * T), n_r = aligned(T * D);
    // P, dP, rotated q and k, and dq, dk, dv accumulated here and written out once (streaming stores)
    at::Tensor buf = at::empty({2 * n_s + 5 * n_r}, q.options());
    float *P = buf.data_ptr<float>(), *dP = P + n_s, *q_rot = dP + n_s;
    float *k_rot = q_rot + n_r, *dq_acc = k_rot + n_r, *dk_acc = dq_acc + n_r, *dv_acc = dk_acc + n_r;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / KV, hk = task % KV;
      const float *k0 = K.at(b, hk), *v0 = V.at(b, hk);
      int64_t ldk = K.st;
      if (rope.on()) {
        rotate(k0, ldk, k_rot, T, D, rope.cos, rope.sin);
        k0 = k_rot, ldk = D;
      }
      for (int64_t h = hk * group; h < (hk + 1) * group; ++h) {
        const float *q0 = Q.at(b, h), *do0 = dO.at(b, h), *l0 = L + (b * H + h) * T;
        int64_t ldq = Q.st;
        if (rope.on()) {
          rotate(q0, ldq, q_rot, T, D, rope.cos, rope.sin);
          q0 = q_rot, ldq = D;
        }
        // The last row block first: it sees every key, so with beta = 0 it initializes dK and dV (no zero fill).
        for (int64_t r0 = (T - 1) / bq * bq; r0 >= 0; r0 -= bq) {
          const int64_t rows = std::min(bq, T - r0), cols = r0 + rows;
          const float *qb = q0 + r0 * ldq, *dob = do0 + r0 * dO.st;
          const float beta = (h == hk * group && r0 + rows == T) ? 0.0f : 1.0f;
          gemm(false, true, rows, cols, D, alpha, qb, ldq, k0, ldk, 0.0f, P, T);
          for (int64_t i = 0; i < rows; ++i) {  // probabilities again, from the saved log-sum-exp
            float* p = P + i * T;
            const int64_t n = r0 + i + 1;
            const float l = l0[r0 + i];
#pragma omp simd
            for (int64_t j = 0; j < n; ++j) p[j] = exp_nonpositive(p[j] - l);
            std::fill(p + n, p + cols, 0.0f);
          }
          gemm(true, false, cols, D, rows, 1.0f, P, T, dob, dO.st, beta, dv_acc, D);  // dV += Pᵀ dO
          gemm(false, true, rows, cols, D, 1.0f, dob, dO.st, v0, V.st, 0.0f, dP, T);   // dP = dO Vᵀ
          for (int64_t i = 0; i < rows; ++i) {  // dS = P ⊙ (dP − delta), times the score scale
            float *p = P + i * T, *dp = dP + i * T;
            // delta = Σ_j P_ij dP_ij (= dO_i · O_i, FlashAttention's form, which would read O from memory)
            float di = 0.0f;
#pragma omp simd reduction(+ : di)
            for (int64_t j = 0; j < cols; ++j) di += p[j] * dp[j];
#pragma omp simd
            for (int64_t j = 0; j < cols; ++j) dp[j] = p[j] * (dp[j] - di) * alpha;
          }
          gemm(false, false, rows, D, cols, 1.0f, dP, T, k0, ldk, 0.0f, dq_acc + r0 * D, D);  // dQ = dS K
          gemm(true, false, cols, D, rows, 1.0f, dP, T, qb, ldq, beta, dk_acc, D);          // dK += dSᵀ Q
        }
        if (rope.on()) unrotate(dq_acc, dQ.at(b, h), dQ.st, T, D, rope.cos, rope.sin);
        else store_rows(dq_acc, dQ.at(b, h), dQ.st, T, D);
      }
      if (rope.on()) unrotate(dk_acc, dK.at(b, hk), dK.st, T, D, rope.cos, rope.sin);
      else store_rows(dk_acc, dK.at(b, hk), dK.st, T, D);
      store_rows(dv_acc, dV.at(b, hk), dV.st, T, D);
    }
  });
  return dqkv;
}

TORCH_LIBRARY(scalelm_cpu_attention, m) {
  m.def("forward(Tensor qkv, int heads, Tensor? cos, Tensor? sin, float scale, int block) -> Tensor[]",
        &attention_forward);
  m.def("backward(Tensor grad_out, Tensor qkv, Tensor lse, int heads, Tensor? cos, Tensor? sin, "
        "float scale, int block) -> Tensor",
        &attention_backward);
}
