// The weight gradient of RMSNorm, sum over tokens t of dy[t] * x[t] * rstd[t], as its own pass.
//
// torch.compile fuses this column sum into the kernel that computes the input gradient, and there it walks the
// [tokens, d] tensors one 16-column strip at a time (one cache line per row per strip), slower than the input
// gradient and a row-streaming sum as two separate passes. This pass streams the rows in order instead,
// each chunk of rows summed into its own partial row, and the partials added in chunk order: the same bits on
// any thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

namespace {

at::Tensor rms_norm_weight_grad(const at::Tensor& grad_out, const at::Tensor& input, const at::Tensor& rstd) {
  for (const at::Tensor* t : {&grad_out, &input, &rstd})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat && t->is_contiguous(),
                "rms_norm_weight_grad: expected contiguous fp32 CPU tensors");
  const int64_t d = input.size(-1), rows = d > 0 ? input.numel() / d : 0;
  TORCH_CHECK(grad_out.sizes() == input.sizes() && rstd.numel() == rows,
              "rms_norm_weight_grad: grad_out must match input and rstd hold one value per row");
  constexpr int64_t chunk = 256;  // rows per partial sum: fixed, so the result does not depend on the threads
  const int64_t chunks = std::max<int64_t>((rows + chunk - 1) / chunk, 1);
  at::Tensor partial = at::zeros({chunks, d}, input.options());
  float* part = partial.data_ptr<float>();
  const float *g = grad_out.data_ptr<float>(), *x = input.data_ptr<float>(), *r = rstd.data_ptr<float>();
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      float* acc = part + c * d;
      for (int64_t t = c * chunk; t < std::min(rows, (c + 1) * chunk); ++t) {
        const float* gt = g + t * d;
        const float* xt = x + t * d;
        const float rt = r[t];
#pragma omp simd
        for (int64_t i = 0; i < d; ++i) acc[i] += gt[i] * xt[i] * rt;
      }
    }
  });
  return partial.sum(0);
}

}  // namespace

TORCH_LIBRARY(scalelm_cpu_norm, m) {
  m.def("rms_norm_weight_grad(Tensor grad_out, Tensor input, Tensor rstd) -> Tensor", &rms_norm_weight_grad);
}
