"""What GEMMs reach inside a training step on this machine, against the curve `scalelm calibrate` fits.

The fitted curve (calibrate.machine.measure_matmul) times GEMMs alone on ready operands. Inside a step the trainer's
linear layers also allocate, miss caches, and on a CPU may run another kernel than the one the curve measured (fp32
through oneDNN, scalelm.kernels.cpu.linear) or cast their weights on every call (bf16 autocast). These measurements
give the factors the step model multiplies onto the curve: `efficiency.matmul`, `matmul_fp32_fast`, `matmul_bf16`.
"""

from __future__ import annotations

from statistics import median

from scalelm.calibrate.timing import interleaved_s, median_s


def measure_step_matmul_efficiency(quick: bool = False) -> float:
    """Share of their stand-alone speed that GEMMs keep inside a training step: forward and backward of a stack of
    linear layers (fresh activations and gradients: allocation, cache misses) against the same twelve GEMMs run
    back to back on ready operands. The two are timed in alternation and the median ratio kept, so a change of the
    machine's speed during calibration cancels. Returned as the hardware file's `efficiency.matmul`."""
    import torch
    import torch.nn.functional as F

    tokens, d, hidden = (1024 if quick else 2048), 256, 768
    x = torch.randn(tokens, d)
    weights = [torch.randn(hidden, d, requires_grad=True), torch.randn(d, hidden, requires_grad=True)] * 2

    def chain():
        y = x
        for w in weights:
            y = F.linear(y, w)
        y.sum().backward()

    operands = []
    for w in weights:
        n, k = w.shape
        operands += [(torch.randn(tokens, k), torch.randn(k, n)),  # forward
                     (torch.randn(tokens, n), torch.randn(n, k)),  # input gradient
                     (torch.randn(n, tokens), torch.randn(tokens, k))]  # weight gradient

    def alone():
        for a, b in operands:
            torch.mm(a, b)

    t_alone, t_chain = interleaved_s([alone, chain], 3 if quick else 7)
    return max(0.3, min(1.0, median(a / c for a, c in zip(t_alone, t_chain))))


def measure_layer_matmul_factor(peak_tflops: float, k0: float, n0: float, path: str, quick: bool = False) -> float:
    """How much faster than the fitted curve (peak, k0, n0) a training step's linear layers run on `path`, as a
    factor the step model multiplies back onto the same curve. A transformer layer's linear layers (d->3d, d->d,
    d->h twice, h->d) run forward and backward; the factor is the curve's time for their GEMMs over the measured
    time. Measured against the curve itself, not against the same GEMMs run alone at another moment: the BLAS's
    speed at calibration time then cancels out of the prediction, and a ratio of two separate measurements would
    carry the BLAS's minute-to-minute drift (docs/benchmarks.md#calibration).

    Only the GEMMs are timed: each linear layer reads its own input, already in the precision its matmul runs in,
    and takes a ready output gradient, so no sums, casts of activations or gradient accumulation count as matmul
    time -- the step model prices those as elementwise work.

    path "onednn": fp32 through the trainer's oneDNN path (scalelm.kernels.cpu.linear: forward and input gradient on
    oneDNN, weight gradient on the BLAS) against the fp32 curve -> `efficiency.matmul_fp32_fast`.
    path "bf16": F.linear under bf16 autocast on bf16 inputs, as the trainer runs bf16 (fp32 weights cast on every
    call, a cost that belongs to the matmul) against the bf16 curve -> `efficiency.matmul_bf16`."""
    import torch
    import torch.nn.functional as F

    from scalelm.kernels.cpu.linear import onednn_linear
    from scalelm.perf.compute import curve_seconds

    flops_per_s = peak_tflops * 1e12
    tokens, d, hidden = (1024 if quick else 2048), 256, 768
    # A transformer layer's linear layers: fused q/k/v, output projection, the MLP's gate and up, its down.
    shapes = [(d, 3 * d), (d, d), (d, hidden), (d, hidden), (hidden, d)]  # (in, out)
    act = torch.bfloat16 if path == "bf16" else torch.float32
    inputs = [torch.randn(tokens, k, dtype=act, requires_grad=True) for k, _ in shapes]
    weights = [torch.randn(n, k, requires_grad=True) for k, n in shapes]
    out_grads = [torch.randn(tokens, n, dtype=act) for _, n in shapes]
    curve = sum(curve_seconds(tokens, n, k, flops_per_s, k0, n0) + curve_seconds(tokens, k, n, flops_per_s, k0, n0)
                + curve_seconds(k, n, tokens, flops_per_s, k0, n0) for k, n in shapes)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=path == "bf16")
    linear = onednn_linear if path == "onednn" else F.linear

    def chain():
        with amp:
            outputs = [linear(x, w) for x, w in zip(inputs, weights)]
        torch.autograd.backward(outputs, out_grads)
        for t in (*inputs, *weights):
            t.grad = None

    for _ in range(5):  # kernel selection, weight layouts and buffers settle in the first calls
        chain()
    t = median_s(chain, 0.3 if quick else 2.5)
    return max(0.3, min(2.0, curve / t))
