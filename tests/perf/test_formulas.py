"""Pinned closed forms: Narayanan 2021 FLOPs, Korthikanti 2022 Table 2, ZeRO model states, collectives,
pipeline bubbles, Young/Daly. Numbers here are the papers' formulas evaluated by hand."""

import math

import pytest

from scalelm.model.config import ModelConfig
from scalelm.model.counting import forward_flops_per_token
from scalelm.perf import comm
from scalelm.perf.flops import (
    Gemm,
    attention_core_flops,
    causal_fraction,
    head_gemm,
    korthikanti_model_flops,
    layer_gemms,
    narayanan_flops_per_iteration,
)
from scalelm.perf.hardware import load_hardware
from scalelm.perf.memory import korthikanti_activation_bytes, layer_activation_bytes, zero_model_state_bytes
from scalelm.perf.pipeline import bubble_fraction, in_flight_microbatches, timeline
from scalelm.perf.run import goodput, young_daly_interval_s


def cpu_hardware(fp32: float = 0.1, bf16: float = 0.2, hbm_tb_s: float = 0.02, **efficiency):
    """A one-device-per-process CPU hardware model for formula tests: these peaks, bandwidth and efficiencies."""
    from scalelm.perf.hardware import parse_hardware

    return parse_hardware({"accelerator": {"key": "cpu", "name": "cpu", "peak_tflops": {"fp32": fp32, "bf16": bf16},
                                           "hbm_gib": 8, "hbm_tb_s": hbm_tb_s, "tdp_w": 65, "compute_units": 1},
                           "efficiency": efficiency, "node": {"gpus_per_node": 2, "inter_node": "ethernet-10g"}})


# ---- FLOPs ------------------------------------------------------------------------------------------------
def test_narayanan_eq3_closed_form():
    b, s, l, h, v = 512, 2048, 24, 2304, 51200
    expected = 96 * b * s * l * h * h * (1 + s / (6 * h) + v / (16 * l * h))
    assert narayanan_flops_per_iteration(b, s, l, h, v) == pytest.approx(expected, rel=1e-12)


def test_narayanan_table1_row1_throughput():
    # Table 1, 1.7B: 137 TFLOP/s per GPU on 32 GPUs, batch 512 -> 9,288 tokens/s per GPU (dev_runs.csv).
    flops = narayanan_flops_per_iteration(512, 2048, 24, 2304, 51200)
    tokens_per_s_per_gpu = 137e12 / (flops / (512 * 2048))
    assert tokens_per_s_per_gpu == pytest.approx(9287.93, rel=1e-4)


def test_korthikanti_model_flops_is_three_passes():
    b, s, l, h, v = 1, 2048, 96, 12288, 51200
    assert korthikanti_model_flops(b, s, l, h, v) == pytest.approx(
        narayanan_flops_per_iteration(b, s, l, h, v, recompute=False), rel=1e-12)
    assert narayanan_flops_per_iteration(b, s, l, h, v) / korthikanti_model_flops(b, s, l, h, v) < 4 / 3


def test_gemm_shapes_add_up_to_counting_forward_flops():
    cfg = ModelConfig(vocab_size=1000, n_layer=3, n_head=8, n_kv_head=2, d_model=256, d_ff=512, mlp="swiglu")
    t, seq = 64, 64
    per_token = sum(g.flops for g in layer_gemms(cfg, t, 1)) / t * cfg.n_layer + head_gemm(cfg, t, 1).flops / t
    per_token += attention_core_flops(cfg, 1, seq) / seq * cfg.n_layer
    assert per_token == pytest.approx(forward_flops_per_token(cfg, seq), rel=1e-12)
    # TP splits every layer GEMM evenly, and running q/k/v or gate/up as separate GEMMs moves no FLOP.
    assert sum(g.flops for g in layer_gemms(cfg, t, 2)) * 2 == sum(g.flops for g in layer_gemms(cfg, t, 1))
    split = layer_gemms(cfg, t, 2, fused_qkv=False, fused_gate_up=False)
    assert [g.name for g in split] == ["q", "k", "v", "attn_out", "mlp_gate", "mlp_up", "mlp_down"]
    assert [g.n for g in split[:3]] == [128, 32, 32]  # 8 heads / 2 kv heads of 64, over 2 ranks
    assert sum(g.flops for g in split) == sum(g.flops for g in layer_gemms(cfg, t, 2))
    assert Gemm("x", 2, 3, 4).flops == 48


def test_causal_fraction():
    assert causal_fraction(128 * 1000) == pytest.approx(0.5005)
    assert causal_fraction(128) == 1.0


# ---- Korthikanti 2022, Table 2 ----------------------------------------------------------------------------
S, B, H, A, T = 2048, 1, 12288, 96, 8


@pytest.mark.parametrize("sp,recompute,expected", [
    (False, "none", S * B * H * (10 + 24 / T + 5 * A * S / (H * T))),
    (True, "none", S * B * H * (34 / T + 5 * A * S / (H * T))),
    (False, "selective", S * B * H * (10 + 24 / T)),
    (True, "selective", S * B * H * 34 / T),
    (False, "full", 2 * S * B * H),
])
def test_korthikanti_table2(sp, recompute, expected):
    assert korthikanti_activation_bytes(S, B, H, A, T, sp, recompute) == pytest.approx(expected)


def test_korthikanti_no_parallelism():
    assert korthikanti_activation_bytes(S, B, H, A) == pytest.approx(S * B * H * (34 + 5 * A * S / H))


@pytest.mark.parametrize("sp,recompute", [(False, "none"), (True, "none"), (False, "selective"), (True, "selective")])
def test_general_activation_model_reduces_to_table2_for_gpt(sp, recompute):
    gpt = ModelConfig(vocab_size=51200, n_layer=96, n_head=A, d_model=H, mlp="gelu", pos="learned", max_seq_len=S)
    ours = layer_activation_bytes(gpt, S, B, T, sp, recompute, flash=False, dropout=True)
    assert ours == pytest.approx(korthikanti_activation_bytes(S, B, H, A, T, sp, recompute))


@pytest.mark.parametrize("name,h,a,layers,b,gb", [
    # Korthikanti Table 3 configurations (t = 8, s = 2048); per-GPU activations of the first pipeline stage
    # (1F1B holds p micro-batches of L/p layers = L layers), tensor + sequence parallel + selective.
    ("22B", 6144, 64, 48, 4, 10.27), ("175B", 12288, 96, 96, 1, 10.27),
    ("530B", 20480, 128, 105, 1, 18.72), ("1T", 25600, 160, 128, 1, 28.52),
])
def test_korthikanti_per_gpu_figures(name, h, a, layers, b, gb):
    sel_sp = layers * korthikanti_activation_bytes(2048, b, h, a, 8, True, "selective") / 1e9
    base = layers * korthikanti_activation_bytes(2048, b, h, a, 8, False, "none") / 1e9
    assert sel_sp == pytest.approx(gb, abs=0.01)
    # The paper's headline: SP + selective cut activation memory ~5x against tensor parallelism alone.
    assert 3.0 < base / sel_sp < 6.5


# ---- ZeRO (Rajbhandari et al. 2020, Fig. 1: Psi = 7.5B, N = 64, K = 12) -----------------------------------
@pytest.mark.parametrize("stage,gb", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_model_states(stage, gb):
    parts = zero_model_state_bytes(7.5e9, stage, 64)
    assert sum(parts.values()) / 1e9 == pytest.approx(gb, abs=0.06)


# ---- collectives --------------------------------------------------------------------------------------------
def test_ring_and_tree_costs():
    link = comm.Link(alpha_s=1e-5, beta_bytes_s=1e11, inter_node=True)
    s, n = 1e9, 16
    assert comm.ring_all_reduce_s(s, n, link) == pytest.approx(2 * 15 * 1e-5 + 2 * 15 / 16 * s / 1e11)
    # NCCL's cost model (src/graph/tuning.cc): only the hops that cross a node boundary pay the network latency.
    spread = comm.Link(alpha_s=1e-5, beta_bytes_s=1e11, inter_node=True, intra_alpha_s=1e-6, nodes=2)
    assert comm.ring_all_gather_s(s, n, spread) == pytest.approx(14 * 1e-6 + 1 * 1e-5 + 15 / 16 * s / 1e11)
    assert comm.ring_all_reduce_s(s, n, spread) == pytest.approx(2 * (14 * 1e-6 + 1e-5) + 2 * 15 / 16 * s / 1e11)
    assert comm.ring_all_gather_s(s, n, link) == pytest.approx(15 * 1e-5 + 15 / 16 * s / 1e11)
    assert comm.tree_all_reduce_s(s, n, link) == pytest.approx(2 * 4 * 1e-5 + 2 * 15 / 16 * s / 1e11)
    # Small messages: the tree's log-depth latency wins; one rank costs nothing.
    assert comm.tree_all_reduce_s(1e3, 1024, link) < comm.ring_all_reduce_s(1e3, 1024, link)
    assert comm.ring_all_reduce_s(s, 1, link) == 0.0


def test_group_link_uses_nvlink_inside_a_node_and_shared_nics_across():
    hw = load_hardware("a100-80gb")
    intra = comm.group_link(hw, 8, 8)
    assert not intra.inter_node and intra.beta_bytes_s == pytest.approx(300e9 * 0.78)
    full_nodes = comm.group_link(hw, 64, 8)  # 8 ranks per node use all 8 NICs
    one_per_node = comm.group_link(hw, 64, 1)  # one rank per node shares with 7 other groups
    assert full_nodes.beta_bytes_s == pytest.approx(200e9 * 0.9)
    assert one_per_node.beta_bytes_s == pytest.approx(200e9 * 0.9 / 8)


def test_parameter_server_loses_to_all_reduce_at_scale():
    hw = load_hardware("a100-80gb")
    grads = 2 * 1.3e9
    ar = comm.all_reduce_s(grads, 64, hw, 1)
    assert comm.parameter_server_s(grads, 64, 1, hw) > 10 * ar
    assert comm.parameter_server_s(grads, 128, 1, hw) == pytest.approx(2 * comm.parameter_server_s(grads, 64, 1, hw), rel=0.01)


# ---- pipeline ------------------------------------------------------------------------------------------------
def test_bubble_fractions():
    assert bubble_fraction("1f1b", 8, 32) == pytest.approx(7 / 32)
    assert bubble_fraction("gpipe", 8, 32) == pytest.approx(7 / 32)
    assert bubble_fraction("interleaved", 8, 32, v=4) == pytest.approx(7 / 128)
    assert bubble_fraction("zb-h1", 8, 32) == pytest.approx(bubble_fraction("1f1b", 8, 32) * 2 / 3)
    assert bubble_fraction("zb-h2", 8, 32) == 0.0
    assert bubble_fraction("1f1b", 1, 4) == 0.0
    assert in_flight_microbatches("gpipe", 4, 16) == 16
    assert in_flight_microbatches("1f1b", 4, 16) == 4
    assert in_flight_microbatches("interleaved", 4, 16, 2) == pytest.approx(4 * (1 + 3 / 8))


def test_timeline_reproduces_the_1f1b_bubble():
    p, m = 4, 8
    blocks = timeline("1f1b", p, m)
    end = max(start + dur for _, start, dur, _, _ in blocks)
    busy = m * 3.0
    assert (end - busy) / busy == pytest.approx(bubble_fraction("1f1b", p, m))


# ---- reliability ---------------------------------------------------------------------------------------------
def test_young_daly():
    d, m = 60.0, 36000.0
    young = math.sqrt(2 * d * m)
    tau = young_daly_interval_s(d, m)
    assert young * 0.97 < tau < young * 1.03
    assert 0.9 < goodput(d, tau, m, restart_s=600) < 1.0


def test_fsdp_zero3_states_are_16_bytes_per_parameter_deepspeed_too():
    """FSDP's fp32 shard is the parameter and Adam's master copy (4 + 4 grad + 8 moments); DeepSpeed ZeRO-3 keeps a
    bf16 partition of weights and gradients besides the fp32 master and moments (2 + 2 + 12, the ZeRO paper's count)."""
    from scalelm.model.presets import get_preset
    from scalelm.perf.frameworks import PROFILES
    from scalelm.perf.hardware import load_hardware
    from scalelm.perf.layout import Layout
    from scalelm.perf.step import _stage_params, predict_memory

    cfg, hw, lo = get_preset("gpt3-1.3b"), load_hardware("a100-80gb"), Layout(dp=8, zero=3)
    psi = _stage_params(cfg, lo)[0]
    for name, per_param in (("llm-foundry", 16), ("torchtitan", 16), ("deepspeed", 16)):
        m = predict_memory(cfg, hw, lo, PROFILES[name], 2048, 1)
        assert m.params + m.grads + m.optimizer == pytest.approx(per_param * psi / 8)


def test_attention_runs_at_the_peak_of_its_precision():
    from scalelm.perf.compute import flash_attention_s

    hw = cpu_hardware(kernel_overhead_us=0.0)
    f32, _ = flash_attention_s(1e12, 0.5, 64, hw, "fp32")
    b16, _ = flash_attention_s(1e12, 0.5, 64, hw, "bf16")
    assert f32 == pytest.approx(2 * b16)


def test_bf16_attention_uses_its_own_measured_efficiency():
    from scalelm.perf.compute import flash_attention_s

    hw = cpu_hardware(kernel_overhead_us=0.0, attention=0.4, attention_bf16=0.1)
    f32, _ = flash_attention_s(1e12, 0.5, 64, hw, "fp32")
    b16, _ = flash_attention_s(1e12, 0.5, 64, hw, "bf16")
    assert b16 == pytest.approx(2 * f32)  # twice the peak at a quarter of the share


def test_newton_schulz_flops_closed_form():
    """Muon on an m×n matrix (m ≤ n): per iteration 2m²n (X·Xᵀ) + 2m³ (A·A) + 2m²n (update)."""
    from scalelm.perf.flops import block_matrices, newton_schulz_gemms

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)  # SwiGLU, hidden 768
    assert sorted(block_matrices(cfg)) == sorted([(256, 256)] * 4 + [(768, 256)] * 2 + [(256, 768)])
    expected = 5 * (4 * (4 * 256**3 + 2 * 256**3) + 3 * (4 * 256**2 * 768 + 2 * 256**3))
    assert sum(g.flops for g in newton_schulz_gemms(cfg, steps=5)) == expected


def test_muon_adds_its_orthogonalization_to_the_optimizer_time():
    from scalelm.perf.layout import Layout, LayoutError, check_layout
    from scalelm.perf.step import predict_step

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)
    hw = load_hardware("a100-80gb")
    adamw = predict_step(cfg, hw, Layout(micro_batch=8), 64, 8)
    muon = predict_step(cfg, hw, Layout(micro_batch=8, optimizer="muon"), 64, 8)
    assert muon.time_s["optimizer"] > adamw.time_s["optimizer"]
    assert muon.step_time_s > adamw.step_time_s
    with pytest.raises(LayoutError, match="whole matrices"):
        check_layout(cfg, Layout(dp=2, zero=3, micro_batch=4, optimizer="muon"), 2, 8, 64)


def test_muon_orthogonalizes_in_the_faster_dtype():
    """As the trainer (train/muon.py): bf16, or fp32 where the fp32 peak is the higher (some CPUs)."""
    from scalelm.perf.compute import gemm_time_s
    from scalelm.perf.flops import newton_schulz_gemms
    from scalelm.perf.layout import Layout
    from scalelm.perf.step import predict_step

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)

    def cpu(fp32, bf16):
        return cpu_hardware(fp32, bf16, kernel_overhead_us=0.0, host_op_us=0.0)

    def ns_seconds(hw):
        lo = Layout(micro_batch=8, optimizer="muon", precision="fp32")
        return (predict_step(cfg, hw, lo, 64, 8).time_s["optimizer"]
                - predict_step(cfg, hw, Layout(micro_batch=8, precision="fp32"), 64, 8).time_s["optimizer"])

    for hw, dtype in ((cpu(0.25, 0.13), "fp32"), (cpu(0.19, 0.44), "bf16")):
        expected = sum(gemm_time_s(g.m, g.n, g.k, hw, dtype) for g in newton_schulz_gemms(cfg)) * cfg.n_layer
        assert ns_seconds(hw) == pytest.approx(expected, rel=1e-9)


def test_parallel_overheads_are_what_compute_and_transfer_leave():
    from scalelm.calibrate.parallel import per_unit_overheads

    m = {"fsdp_extra": 0.080, "tp_extra": 0.040, "units": 4, "unit_param_bytes": 2_000_000, "activation_bytes": 1_000_000}
    fsdp_us, tp_slowdown = per_unit_overheads(m, lambda size: size / 1e9, lambda size: 2 * size / 1e9)
    assert fsdp_us == pytest.approx((0.080 / 4 - 3 * 0.002) * 1e6)  # 2 gathers + 1 reduce-scatter per unit
    assert tp_slowdown == pytest.approx((0.040 / 4) / (2 * 0.002))  # 2 all-reduces per column/row pair
    # Nothing left over: no FSDP host cost, and TP's all-reduces never count as faster than between idle processes.
    assert per_unit_overheads(dict(m, fsdp_extra=0.0, tp_extra=0.0), lambda s: 1.0, lambda s: 1.0) == (0.0, 1.0)


def test_gemm_curve_fit_recovers_inner_and_output_overheads():
    from scalelm.calibrate import fit_gemm_curve

    def rate(n, k, peak=0.1, k0=40.0, n0=30.0):  # first-order form the fit assumes: 1/rate = (1 + k0/k + n0/n)/peak
        return peak / (1 + k0 / k + n0 / n)

    shapes = [{"m": 1024, "n": n, "k": k, "tflops": rate(n, k)} for n, k in
              [(1024, 1024), (4096, 1024), (1024, 64), (1024, 128), (128, 256), (384, 256), (256, 128)]]
    peak, k0, n0 = fit_gemm_curve(shapes)
    assert (peak, k0, n0) == pytest.approx((0.1, 40.0, 30.0), rel=1e-9)
    # Narrow outputs cost nothing here: that overhead is dropped (not fitted negative) and k0 refitted alone.
    flat = [dict(r, tflops=rate(r["n"], r["k"], n0=0.0) * (1.02 if r["n"] < 1024 else 1.0)) for r in shapes]
    peak, k0, n0 = fit_gemm_curve(flat)
    assert n0 == 0.0 and k0 > 0
    # No usable trend at all: the median rate.
    assert fit_gemm_curve([{"m": 1, "n": 64, "k": 64, "tflops": 0.2}, {"m": 1, "n": 1024, "k": 1024, "tflops": 0.1},
                           {"m": 1, "n": 128, "k": 128, "tflops": 0.15}]) == (0.15, 0.0, 0.0)


def test_measured_fsdp_and_tp_host_costs_enter_the_step():
    from scalelm.perf.layout import Layout
    from scalelm.perf.step import predict_step

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)

    def cpu(**eff):
        return cpu_hardware(comm_overlap=0.0, **eff)

    fsdp = Layout(dp=2, zero=3, micro_batch=4, precision="fp32")
    base = predict_step(cfg, cpu(), fsdp, 64, 8)
    slow = predict_step(cfg, cpu(fsdp_unit_us=1000.0), fsdp, 64, 8)
    assert slow.step_time_s - base.step_time_s == pytest.approx(3 * 1e-3)  # 2 layers + the root, one sync
    tp = Layout(tp=2, micro_batch=8, precision="fp32")
    base = predict_step(cfg, cpu(), tp, 64, 8)
    slow = predict_step(cfg, cpu(tp_pair_us=1000.0), tp, 64, 8)
    # 2 pairs in each of 2 layers, and one for the vocabulary-parallel embedding and head
    assert slow.step_time_s - base.step_time_s == pytest.approx((2 * 2 + 1) * 1e-3)
    # The TP all-reduces (4 per layer, 2 for the embedding and head) scale with the measured slowdown.
    slower = predict_step(cfg, cpu(tp_comm_slowdown=3.0), tp, 64, 8)
    assert slower.time_s["tp_comm"] == pytest.approx(3 * base.time_s["tp_comm"], rel=1e-9)


def test_tp_without_sp_replicates_norms_and_residual_adds():
    from scalelm.perf.flops import UNFUSED_RMSNORM_ELEMS, replicated_elementwise_bytes_per_token

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)
    assert replicated_elementwise_bytes_per_token(cfg, 2, fused_norm=True) == 10 * 256 * 2  # 2 norms (2h) + 2 adds (3h)
    assert replicated_elementwise_bytes_per_token(cfg, 4, fused_norm=False) == (2 * UNFUSED_RMSNORM_ELEMS + 6) * 256 * 4


def test_autocast_moves_the_stream_in_fp32_and_the_matmul_outputs_in_bf16():
    from scalelm.perf.flops import elementwise_bytes_per_token, replicated_elementwise_bytes_per_token

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)  # SwiGLU, RoPE, f = 768
    h, f = 256, cfg.ffn_hidden
    matmul_outputs = 3 * f + 2 * 8 * 64 + 2 * 12 * 64 + 2 * h  # SwiGLU, RoPE on q and k, q/k/v/o layout copies
    fp32 = elementwise_bytes_per_token(cfg, 4, fused_norm=False)
    assert fp32 == replicated_elementwise_bytes_per_token(cfg, 4, fused_norm=False) + matmul_outputs * 4
    mixed = elementwise_bytes_per_token(cfg, 2, fused_norm=False, stream_bytes=4)
    # Norms and residual adds in fp32; the norm outputs cast for the fused q/k/v, w1 and w3 (read 4, write 2).
    casts = 3 * h * (4 + 2)
    assert mixed == replicated_elementwise_bytes_per_token(cfg, 4, fused_norm=False) + casts + matmul_outputs * 2
    assert replicated_elementwise_bytes_per_token(cfg, 4, False, 2, fused_qkv=False) - \
        replicated_elementwise_bytes_per_token(cfg, 4, False) == 5 * h * 6  # q, k and v each cast their input
    assert elementwise_bytes_per_token(cfg, 2, stream_bytes=2) == elementwise_bytes_per_token(cfg, 2)


def test_scalelm_fp32_attention_kernel_removes_rope_and_layout_passes():
    from scalelm.perf.flops import elementwise_bytes_per_token, replicated_elementwise_bytes_per_token
    from scalelm.perf.frameworks import PROFILES, framework_for

    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)  # SwiGLU, RoPE, f = 768
    stream = replicated_elementwise_bytes_per_token(cfg, 4, fused_norm=False)
    # Fused q/k/v: only the SwiGLU activation is left of the matmul outputs' passes.
    assert elementwise_bytes_per_token(cfg, 4, False, attention_kernel=True) == stream + 3 * cfg.ffn_hidden * 4
    # Three projections (tensor parallelism): their concatenation into the kernel's input is one more copy.
    assert elementwise_bytes_per_token(cfg, 4, False, fused_qkv=False, attention_kernel=True) == \
        stream + (3 * cfg.ffn_hidden + 2 * 12 * 64) * 4
    assert PROFILES["scalelm"].fp32_attention_kernel and not framework_for("megatron").fp32_attention_kernel
    assert not framework_for("some other trainer").fp32_attention_kernel


def test_narrow_gemm_outputs_and_unfused_projections_cost_what_the_calibration_measured():
    from dataclasses import replace

    from scalelm.perf.compute import gemm_time_s
    from scalelm.perf.frameworks import PROFILES
    from scalelm.perf.layout import Layout
    from scalelm.perf.step import predict_step

    def cpu(**eff):
        return cpu_hardware(hbm_tb_s=1.0, **{"comm_overlap": 0.0, "matmul": 1.0, "matmul_k_overhead": 0.0,
                                             "kernel_overhead_us": 0.0, **eff})

    narrow = cpu(matmul_n_overhead=40.0)
    flops = 2 * 8192 * 128 * 256
    assert gemm_time_s(8192, 128, 256, narrow, "fp32") == pytest.approx(flops / (0.1e12 * 128 / 168), rel=1e-12)
    # bf16 takes its own curve where the calibration measured one, else the fp32 one
    assert gemm_time_s(8192, 128, 256, narrow, "bf16") == pytest.approx(flops / (0.2e12 * 128 / 168), rel=1e-12)
    own = cpu(matmul_n_overhead=40.0, matmul_k_overhead=50.0, matmul_k_overhead_bf16=16.0, matmul_n_overhead_bf16=0.0)
    assert gemm_time_s(8192, 128, 256, own, "bf16") == pytest.approx(flops / (0.2e12 * 256 / 272), rel=1e-12)
    assert gemm_time_s(8192, 128, 256, own, "fp32") == pytest.approx(flops / (0.1e12 * 256 / 306 * 128 / 168), rel=1e-12)
    assert gemm_time_s(8192, 128, 256, cpu(), "fp32") == pytest.approx(flops / 0.1e12, rel=1e-12)
    # scalelm splits q/k/v under TP (apply_tp): with a narrow-output penalty its TP step is slower than the same
    # step with the fusion kept, and without the penalty the split costs nothing.
    cfg = ModelConfig(vocab_size=128, n_layer=2, n_head=4, d_model=256, max_seq_len=64)
    tp = Layout(tp=2, micro_batch=8, precision="fp32")
    fused = replace(PROFILES["scalelm"], fused_qkv_under_tp=True)
    assert (predict_step(cfg, narrow, tp, 64, 8, PROFILES["scalelm"]).step_time_s
            > predict_step(cfg, narrow, tp, 64, 8, fused).step_time_s)
    # (the fp32 attention kernel reads one q/k/v tensor: the split then costs their concatenation, so without it)
    sdpa = replace(PROFILES["scalelm"], fp32_attention_kernel=False)
    assert predict_step(cfg, cpu(), tp, 64, 8, sdpa).step_time_s == pytest.approx(
        predict_step(cfg, cpu(), tp, 64, 8, replace(sdpa, fused_qkv_under_tp=True)).step_time_s, rel=1e-12)


def test_the_calibrations_curve_is_the_step_models():
    """calibrate.matmul.measure_layer_matmul_factor divides compute.curve_seconds by a measured time, and the step
    model multiplies the factor back onto gemm_time_s: at efficiency 1 gemm_time_s must be that curve, for the
    BLAS's speed at calibration time to cancel."""
    from scalelm.perf.compute import curve_seconds, gemm_time_s

    hw = cpu_hardware(0.09, hbm_tb_s=1.0, matmul=1.0, matmul_k_overhead=17.0, matmul_n_overhead=42.0,
                      kernel_overhead_us=0.0)
    for m, n, k in [(2048, 768, 256), (2048, 256, 768), (256, 768, 2048), (2048, 256, 256)]:
        expected = 2 * m * n * k / (0.09e12 * k / (k + 17.0) * n / (n + 42.0))
        assert curve_seconds(m, n, k, 0.09e12, 17.0, 42.0) == pytest.approx(expected, rel=1e-12)
        assert gemm_time_s(m, n, k, hw, "fp32") == pytest.approx(expected, rel=1e-12)


def test_bf16_gemms_take_their_own_in_step_efficiency_where_measured():
    from scalelm.perf.compute import gemm_time_s

    def cpu(**eff):
        return cpu_hardware(hbm_tb_s=1.0, matmul=0.9, matmul_k_overhead=0.0, matmul_n_overhead=0.0,
                            kernel_overhead_us=0.0, **eff)

    flops = 2 * 2048 * 768 * 256
    assert gemm_time_s(2048, 768, 256, cpu(), "bf16") == pytest.approx(flops / (0.2e12 * 0.9), rel=1e-12)
    measured = cpu(matmul_bf16=0.75)
    assert gemm_time_s(2048, 768, 256, measured, "bf16") == pytest.approx(flops / (0.2e12 * 0.75), rel=1e-12)
    assert gemm_time_s(2048, 768, 256, measured, "fp32") == pytest.approx(flops / (0.1e12 * 0.9), rel=1e-12)


def test_nvl72_domain_is_the_scale_up_unit():
    """GB200 NVL72: 4 GPUs per tray, 72 on one NVLink domain. A TP-8 group or a 72-rank DP group stays on NVLink; a
    group over two racks reaches the NICs of all its GPUs in a rack (800 Gb/s each), capped by NVLink."""
    from scalelm.perf.hardware import load_hardware

    hw = load_hardware("gb200")
    assert hw.node.domain == 72
    assert not comm.group_link(hw, 8, 8).inter_node and not comm.group_link(hw, 72, 72).inter_node
    two_racks = comm.group_link(hw, 144, 72)
    per_gpu_nic = hw.network.node_gb_s * 1e9 / hw.node.gpus_per_node
    nvlink = hw.node.intra_node_gb_s * 1e9 * hw.node.intra_node_efficiency
    assert two_racks.inter_node and two_racks.beta_bytes_s == pytest.approx(min(nvlink, 72 * per_gpu_nic))
    dgx = load_hardware("h100-sxm-80gb")
    assert comm.group_link(dgx, 16, 8).beta_bytes_s == pytest.approx(dgx.network.node_gb_s * 1e9)


def test_a_run_counting_the_nvl72_rack_as_its_node_keeps_the_trays_nics():
    from scalelm.perf.hardware import load_hardware

    hw = load_hardware("gb200")
    rack = hw.with_network(None, 72)
    assert (rack.node.gpus_per_node, rack.node.domain) == (4, 72)
    assert hw.with_network(None, 4).node == hw.node
