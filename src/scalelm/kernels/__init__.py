"""Device-specific speedups applied to a built model from the outside, like `apply_tp`: the model file never
learns about them. `scalelm.kernels.cpu`: fp32 CPU training (C++ kernels, oneDNN linear layers)."""
