"""The step model: time and memory of one optimizer step for a model, a layout and a cluster.

`predict_step` is a pure function; the planner, `plan evaluate` and the trainer call it. The step of the
busiest pipeline stage is the sum of what cannot overlap:

    step = m·(t_f + t_b)                     compute of m micro-batches (GEMMs, attention, elementwise,
                                             recompute, exposed TP/CP collectives)
         + bubble(schedule, p, m, v)·m·(t_f + t_b)                  (pipeline.py)
         + exposed p2p + exposed DP/FSDP collectives + optimizer step

Time components carry their names into `time_s`; the largest one names the bottleneck.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from scalelm.model.config import ModelConfig
from scalelm.model.counting import block_params, embedding_params, flops_per_token, num_params
from scalelm.perf import comm, compute
from scalelm.perf.flops import (
    attention_core_flops,
    block_matrices,
    causal_fraction,
    elementwise_bytes_per_token,
    head_gemm,
    layer_gemms,
    logits_bytes_per_token,
    newton_schulz_gemms,
    replicated_elementwise_bytes_per_token,
    softmax_bytes_per_token,
)
from scalelm.perf.frameworks import PROFILES, Framework
from scalelm.perf.hardware import Hardware
from scalelm.perf.layout import Layout, check_layout
from scalelm.perf.memory import (
    ALLOCATOR_MARGIN,
    MemoryBreakdown,
    layer_activation_bytes,
    zero_model_state_bytes,
)
from scalelm.perf.pipeline import bubble_fraction, in_flight_microbatches

GIB = 2.0**30
OPTIMIZER_BYTES_PER_PARAM = 34.0
"""Adam step + grad-norm clipping, per parameter: read fp32 weight, grad, m, v (16), write weight, m, v
(12), write the bf16 copy (2), read the grad again for the norm (4)."""
COMM_BUFFER_BYTES = 0.5 * GIB
"""NCCL channels, cuBLAS workspaces and DDP buckets, per process (order of 0.3-1 GiB in practice)."""
NCCL_BUFFER_BYTES = 0.375 * GIB
"""The NCCL share of COMM_BUFFER_BYTES, outside PyTorch's allocator: per peer connection NCCL allocates NCCL_BUFFSIZE
(4 MiB default) for each of the Simple/LL/LL128 protocols and channels (NCCL environment-variable docs), a few hundred
MiB for a process with several communicators; cuBLAS workspaces and bucket views stay inside the allocator."""


@dataclass
class StepResult:
    step_time_s: float
    tokens_per_s_per_device: float
    mfu: float
    hfu: float
    peak_mem_gib: float
    fits: bool
    bottleneck: str
    """`memory capacity` when the step does not fit, else `time_bottleneck`."""
    time_s: dict[str, float] = field(default_factory=dict)
    """Exposed seconds per component; they sum to step_time_s."""
    hidden_s: dict[str, float] = field(default_factory=dict)
    """Communication seconds hidden behind compute."""
    memory: MemoryBreakdown | None = None
    layout: Layout | None = None
    microbatches: int = 1
    time_bottleneck: str = ""
    """The largest component of the step time, whether or not the memory fits."""
    sensitivity_s: dict[str, float] = field(default_factory=dict)
    """Seconds of the step that scale as 1/efficiency of each fitted kernel class (gemm, attention, memory),
    bubble included: what `fit.py` needs to refit the knobs without re-predicting every run."""

    def memory_gib(self) -> dict[str, float]:
        return self.memory.gib() if self.memory else {}


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def _stage_times(cfg: ModelConfig, hw: Hardware, lo: Layout, fw: Framework, seq: int) -> dict[str, float]:
    """Forward/backward seconds of one layer and of the head for one micro-batch on one device."""
    tp, cp, mb = lo.tp, lo.cp, lo.micro_batch
    s_loc = seq // cp
    tokens = mb * s_loc
    dtype = lo.precision
    act = _act_bytes(dtype)
    gemm_dtype = "fp8" if dtype == "fp8" else ("fp32" if dtype == "fp32" else "bf16")
    f_g = b_g = cast_f = cast_b = 0.0
    fused_qkv = fw.fused_qkv and (tp == 1 or fw.fused_qkv_under_tp)
    for g in layer_gemms(cfg, tokens, tp, fused_qkv, fw.fused_gate_up):
        f, b = compute.gemm_fwd_bwd_s(g, hw, gemm_dtype)
        f_g, b_g = f_g + f, b_g + b
        if dtype == "fp8":
            cast_f += fw.fp8_cast_bytes * (g.m * g.k + g.k * g.n)
            cast_b += fw.fp8_cast_bytes * g.m * g.n
    flash = lo.flash_attention and fw.flash_attention
    square = attention_core_flops(cfg, mb, seq, tp, cp)
    if flash:
        tiles = mb * (cfg.n_head // tp) * math.ceil(s_loc / 64)
        attn_f, attn_b = compute.flash_attention_s(square, causal_fraction(seq), cfg.dim_head, hw, gemm_dtype, tiles)
        scores_f = 0.0
    else:
        heads = mb * cfg.n_head // tp
        qk = compute.gemm_time_s(s_loc * heads, seq, cfg.dim_head, hw, gemm_dtype)
        pv = compute.gemm_time_s(s_loc * heads, cfg.dim_head, seq, hw, gemm_dtype)
        qk_b = compute.gemm_time_s(s_loc * heads, cfg.dim_head, seq, hw, gemm_dtype) * 2
        pv_b = compute.gemm_time_s(s_loc * heads, seq, cfg.dim_head, hw, gemm_dtype) * 2
        scores_f = compute.memory_bound_s(softmax_bytes_per_token(cfg, seq, fw.dropout) * tokens / tp, hw)
        attn_f, attn_b = qk + pv + scores_f, qk_b + pv_b + 1.2 * scores_f
    stream = 4 if fw.fp32_stream and dtype != "fp8" else act
    kernel = fw.fp32_attention_kernel and dtype == "fp32"
    ew = (elementwise_bytes_per_token(cfg, act, fw.fused_norm, stream, fused_qkv, kernel) * tokens
          * fw.elementwise_factor)
    repl = replicated_elementwise_bytes_per_token(cfg, stream, fw.fused_norm, act, fused_qkv) * tokens * fw.elementwise_factor
    ew = ew / tp if lo.sequence_parallel else repl + (ew - repl) / tp
    ew_f = compute.memory_bound_s(ew + cast_f, hw)
    ew_b = compute.memory_bound_s(2 * ew + cast_b, hw)
    # Host dispatch of eager operators (zero on accelerators, see Efficiency.host_op_us).
    op_s = hw.efficiency.host_op_us * 1e-6
    host_f, host_b = op_s * fw.host_ops_per_layer / 3, op_s * fw.host_ops_per_layer * 2 / 3
    layer_f = f_g + attn_f + ew_f + host_f
    layer_b = b_g + attn_b + ew_b + host_b
    # Seconds of one layer's fwd+bwd that scale inversely with each fitted efficiency (fit.py refits from these).
    attn_gemm = 0.0 if flash else attn_f - scores_f + attn_b - 1.2 * scores_f
    sens = {"gemm": f_g + b_g + attn_gemm, "attention": attn_f + attn_b if flash else 0.0,
            "memory": ew_f + ew_b + (0.0 if flash else 2.2 * scores_f)}
    if lo.recompute == "full":
        recompute = layer_f
        rc = {"gemm": f_g + (0.0 if flash else attn_f - scores_f), "attention": attn_f if flash else 0.0,
              "memory": ew_f + (0.0 if flash else scores_f)}
    elif lo.recompute == "selective" and fw.selective_kind == "op":
        recompute = 0.5 * f_g + ew_f
        rc = {"gemm": 0.5 * f_g, "attention": 0.0, "memory": ew_f}
    elif lo.recompute == "selective" and not flash:
        recompute = attn_f
        rc = {"gemm": attn_f - scores_f, "attention": 0.0, "memory": scores_f}
    else:
        recompute = 0.0
        rc = {"gemm": 0.0, "attention": 0.0, "memory": 0.0}
    sens = {k: v + rc[k] for k, v in sens.items()}
    hf, hb = compute.gemm_fwd_bwd_s(head_gemm(cfg, tokens, tp), hw, gemm_dtype)
    loss = compute.memory_bound_s(logits_bytes_per_token(cfg) * tokens / tp * (0.5 if fw.fused_cross_entropy else 1), hw)
    # Tensor-parallel collectives: 2 all-reduces (or all-gather + reduce-scatter with SP) of the
    # activations per layer in the forward, 2 in the backward, 2 more in a full-recompute forward.
    tp_msg = tokens * cfg.d_model * act
    rpn = min(tp, hw.node.domain)
    tp_ar = comm.all_reduce_s(tp_msg, tp, hw, rpn) * hw.efficiency.tp_comm_slowdown if tp > 1 else 0.0
    n_ar = 4 + (2 if lo.recompute == "full" else 0)
    tp_total = n_ar * tp_ar
    if tp > 1:  # host work of the two column/row pairs per layer (forward and backward), see Efficiency
        tp_total += 2 * hw.efficiency.tp_pair_us * 1e-6 * (1.5 if lo.recompute == "full" else 1.0)
    tp_overlap = fw.tp_overlap * hw.efficiency.comm_overlap
    # Context parallel: ring attention passes K and V chunks around the cp ranks, overlapped with attention.
    cp_f = cp_b = 0.0
    if cp > 1:
        kv_bytes = 2 * tokens * cfg.kv_heads * cfg.dim_head * act / max(1, min(tp, cfg.kv_heads))
        link = comm.group_link(hw, cp, max(1, min(cp, hw.node.domain // tp)))
        ring = (cp - 1) * (link.alpha_s + kv_bytes / link.beta_bytes_s)
        cp_f, cp_b = max(0.0, ring - attn_f), max(0.0, 2 * ring - attn_b)
    head_host = op_s * fw.host_ops_fixed
    # Vocabulary-parallel embedding and head: an all-reduce of the embedding output in forward and of the head's
    # input gradient in backward, with the host work of one more column/row pair (loss_parallel's small
    # collectives included).
    head_tp = (2 * tp_ar + hw.efficiency.tp_pair_us * 1e-6) * (1 - tp_overlap) if tp > 1 else 0.0
    return {"layer_f": layer_f, "layer_b": layer_b + recompute, "recompute": recompute, "gemm": f_g + b_g,
                "attn": attn_f + attn_b, "ew": ew_f + ew_b, "host": host_f + host_b, "head_host": head_host,
                "head_f": hf + loss / 3 + head_host / 3 + head_tp / 2,
                "head_b": hb + 2 * loss / 3 + 2 * head_host / 3 + head_tp / 2,
                "tp_exposed": tp_total * (1 - tp_overlap), "tp_hidden": tp_total * tp_overlap,
                "cp": cp_f + cp_b, "tokens": tokens, "act": act, "n_ar": n_ar, "sens": sens,
                "head_sens": {"gemm": hf + hb, "attention": 0.0, "memory": loss}}


def _stage_params(cfg: ModelConfig, lo: Layout) -> tuple[float, float]:
    """(parameters on the busiest stage per TP rank, parameters of one layer per TP rank)."""
    layers = math.ceil(cfg.n_layer / lo.pp)
    per_layer = block_params(cfg) / lo.tp
    emb = embedding_params(cfg) / lo.tp
    if lo.pp > 1 and not cfg.tie_embeddings:
        emb /= 2
    return layers * per_layer + emb, max(per_layer, cfg.vocab_size * cfg.d_model / lo.tp)


def predict_step(cfg: ModelConfig, hw: Hardware, layout: Layout, seq_len: int, global_batch: int,
                 framework: Framework | None = None, strict: bool = True, cache: dict | None = None) -> StepResult:
    """Time, memory, MFU and bottleneck of one training step (global_batch sequences of seq_len tokens).

    `strict=False` lets the micro-batch not divide the per-replica batch (Composer-style: the last
    micro-batch is partial, counted as a full one). `cache` (a dict the caller keeps for one model and
    hardware) reuses per-layer kernel times across layouts that differ only in pp, dp or ZeRO.
    """
    lo = layout
    fw = framework or PROFILES["scalelm"]
    if lo.precision == "fp32" and lo.tp == 1 and hw.efficiency.matmul_fp32_fast is not None:
        hw = replace(hw, efficiency=replace(hw.efficiency, matmul=hw.efficiency.matmul_fp32_fast))
    if strict:
        check_layout(cfg, lo, lo.world, global_batch, seq_len)
    m = max(1, math.ceil(global_batch / (lo.dp * lo.micro_batch)))
    key = (lo.tp, lo.cp, lo.micro_batch, lo.sequence_parallel, lo.recompute, lo.precision, lo.flash_attention)
    if cache is not None and key in cache:
        st = cache[key]
    else:
        st = _stage_times(cfg, hw, lo, fw, seq_len)
        if cache is not None:
            cache[key] = st
    layers = math.ceil(cfg.n_layer / lo.pp)
    tp_fwd_share = 2 / st["n_ar"]
    per_layer_f = st["layer_f"] + st["tp_exposed"] * tp_fwd_share
    per_layer_b = st["layer_b"] + st["tp_exposed"] * (1 - tp_fwd_share) + st["cp"]
    t_f = layers * per_layer_f + st["head_f"]
    t_b = layers * per_layer_b + st["head_b"]
    busy = m * (t_f + t_b)
    schedule = "interleaved" if lo.vpp > 1 and lo.schedule == "1f1b" else lo.schedule
    bubble = bubble_fraction(schedule, lo.pp, m, lo.vpp) * busy
    overlap = hw.efficiency.comm_overlap  # what the device lets the framework's overlap windows hide
    # Pipeline p2p: one activation tensor each way per micro-batch and chunk; scatter-gather over TP.
    p2p = 0.0
    if lo.pp > 1:
        msg = st["tokens"] * cfg.d_model * st["act"] / lo.tp
        inter = lo.tp * lo.cp * lo.dp >= hw.node.domain
        p2p = 2 * (m * lo.vpp + lo.pp - 1) * comm.p2p_s(msg, hw, inter) * (1 - fw.pp_overlap * overlap)
    # Data-parallel gradient (and ZeRO parameter) traffic over dp x cp replicas of this stage.
    psi_stage, psi_layer = _stage_params(cfg, lo)
    n_rep = lo.dp * lo.cp
    rpn = max(1, min(n_rep, hw.node.domain // lo.tp))
    shard = lo.shard if lo.zero >= 1 else 1
    dp_exposed = dp_hidden = 0.0
    if n_rep > 1:
        grad_wire = psi_stage * fw.grad_comm_bytes
        gather_rpn = min(rpn, shard)
        if lo.zero == 3:
            # Collectives per unit as the framework issues them (one per FSDP block, one per submodule under
            # DeepSpeed), each paying its own ring latency; the embedding and head are one more unit.
            block = block_params(cfg) / lo.tp
            k = fw.zero3_gathers_per_layer

            def per_unit(bytes_per_param: float) -> float:
                one = k * comm.all_gather_s(block * bytes_per_param / k, shard, hw, gather_rpn)
                rest = comm.all_gather_s(max(0.0, psi_stage - layers * block) * bytes_per_param, shard, hw, gather_rpn)
                return layers * one + rest

            ag, rs = per_unit(fw.param_gather_bytes), per_unit(fw.grad_comm_bytes)
            regather = fw.reshard_after_forward and lo.pp == 1
            per_sync = ag * (2 if regather else 1) + rs
            syncs = m if (fw.fsdp_comm_per_microbatch and lo.pp == 1) else 1
            total = syncs * (per_sync + (layers + 1) * hw.efficiency.fsdp_unit_us * 1e-6)
            if shard < n_rep:
                total += comm.all_reduce_s(grad_wire / shard, n_rep // shard, hw, 1)
            window = busy * fw.fsdp_overlap * overlap
            dp_exposed = max(0.0, total - window) + ag / max(1, layers)
        elif lo.zero == 2 and m > 1:
            # Only the gradient shard is kept, so every micro-batch's gradients are reduce-scattered behind its own
            # backward; the updated weights are all-gathered once per step, before the next forward.
            rs = comm.all_gather_s(grad_wire, shard, hw, gather_rpn)
            ag = comm.all_gather_s(psi_stage * fw.param_gather_bytes, shard, hw, gather_rpn)
            host = (layers + 1) * hw.efficiency.fsdp_unit_us * 1e-6
            total = m * (rs + host) + ag
            window = t_b * fw.dp_overlap * overlap
            dp_exposed = m * max(0.0, rs + host - window) + max(0.0, ag - t_f * fw.dp_overlap * overlap)
        else:
            total = comm.all_reduce_s(grad_wire, n_rep, hw, rpn)
            if lo.zero == 2:  # FSDP without resharding: the same per-unit host work as ZeRO-3
                total += (layers + 1) * hw.efficiency.fsdp_unit_us * 1e-6
            window = t_b * fw.dp_overlap * overlap
            dp_exposed = max(0.0, total - window)
        dp_hidden = max(0.0, total - dp_exposed)  # the first gather is exposed on top of total
    opt_params = psi_stage / shard
    if lo.offload:
        optimizer = opt_params * 2 * 4 / (hw.node.pcie_gb_s * 1e9) + opt_params * OPTIMIZER_BYTES_PER_PARAM / 50e9
    else:
        optimizer = compute.memory_bound_s(opt_params * OPTIMIZER_BYTES_PER_PARAM, hw)
    if lo.optimizer == "muon":
        # scalelm's Muon (train/muon.py): Newton-Schulz on every block matrix the rank updates (ZeRO-1 splits
        # them) in bf16, or in fp32 on a device whose fp32 GEMMs are the faster (some CPUs), plus the eager ops
        # around each matrix (cast, norm, 3 per iteration, momentum, update).
        fp32_flops = hw.accelerator.peak_tflops.get("fp32", 0.0) * 1e12
        ns_dtype = "fp32" if fp32_flops > hw.accelerator.peak_flops("bf16") else "bf16"
        mats = len(block_matrices(cfg)) * layers / shard
        ns = sum(compute.gemm_time_s(g.m, g.n, g.k, hw, ns_dtype) for g in newton_schulz_gemms(cfg)) * layers / shard
        optimizer += ns + mats * (3 * 5 + 10) * hw.efficiency.host_op_us * 1e-6
    offload = 0.0
    if fw.activation_offload:
        # Every saved activation goes to the host in the forward and back for the backward, over PCIe, behind compute.
        per_layer_act = layer_activation_bytes(cfg, seq_len // lo.cp, lo.micro_batch, lo.tp, lo.sequence_parallel,
                                               lo.recompute, lo.flash_attention and fw.flash_attention, fw.dropout,
                                               fw.selective_kind)
        offload = max(0.0, 2 * m * layers * per_layer_act / (hw.node.pcie_gb_s * 1e9) - busy)
    step = busy + bubble + p2p + dp_exposed + optimizer + fw.step_overhead_s + offload

    # ---- breakdown and bottleneck -----------------------------------------------------------------------
    scale = m * layers
    tp_exp = scale * st["tp_exposed"]
    host = scale * st["host"] + m * st["head_host"]
    time_s = {
        "compute": (scale * (st["gemm"] + st["attn"] + st["recompute"]) + m * (st["head_f"] + st["head_b"])
                    - m * st["head_host"]),
        "memory_bw": scale * st["ew"],
        "tp_comm": tp_exp,
        "cp_comm": scale * st["cp"],
        "pp_bubble": bubble,
        "pp_comm": p2p,
        "dp_comm": dp_exposed,
        "optimizer": optimizer,
        "overhead": fw.step_overhead_s + host,
        "offload": offload,
    }
    # The compute/memory split above is an attribution of `busy`; rescale so the parts sum to the step.
    parts = sum(time_s.values())
    if parts > 0:
        time_s = {k: v * step / parts for k, v in time_s.items()}
    hidden = {"tp_comm": scale * st["tp_hidden"], "dp_comm": dp_hidden}

    mem = predict_memory(cfg, hw, lo, fw, seq_len, m, psi_stage, psi_layer, cache)
    hbm = hw.accelerator.hbm_gib * GIB
    fits = mem.total <= hbm
    n_dev = lo.world
    tok_s = global_batch * seq_len / step / n_dev
    peak = hw.accelerator.peak_flops("fp32" if lo.precision == "fp32" else "bf16")
    fpt = flops_per_token(cfg, seq_len)
    mfu = tok_s * fpt / peak
    extra = 1.0 + (1 / 3 if lo.recompute == "full" else 0.0)
    hfu = mfu * extra
    names = {"compute": "compute", "memory_bw": "memory bandwidth", "tp_comm": "TP communication",
             "cp_comm": "CP communication", "pp_bubble": "pipeline bubble", "pp_comm": "PP communication",
             "dp_comm": "DP communication", "optimizer": "memory bandwidth", "overhead": "framework overhead",
             "offload": "host transfers"}
    by_time = names[max(time_s, key=time_s.get)]
    bottleneck = by_time if fits else "memory capacity"
    grow = 1.0 + bubble_fraction(schedule, lo.pp, m, lo.vpp)
    sensitivity = {k: m * (layers * st["sens"][k] + st["head_sens"][k]) * grow for k in st["sens"]}
    if not lo.offload:
        sensitivity["memory"] += optimizer
    return StepResult(step, tok_s, mfu, hfu, mem.total / GIB, fits, bottleneck, time_s, hidden, mem, lo, m, by_time,
                      sensitivity)


def predict_memory(cfg: ModelConfig, hw: Hardware, lo: Layout, fw: Framework, seq_len: int, m: int,
                   psi_stage: float | None = None, psi_layer: float | None = None,
                   cache: dict | None = None) -> MemoryBreakdown:
    """Peak bytes on the busiest device (first pipeline stage holds most activations, last the logits). `cache`: a
    dict the caller keeps for one model and framework (the planner), reusing parameter counts and per-layer
    activations across layouts that share them."""
    cache = {} if cache is None else cache
    if psi_stage is None or psi_layer is None:
        key = ("params", lo.tp, lo.pp)
        if key not in cache:
            cache[key] = _stage_params(cfg, lo)
        psi_stage, psi_layer = cache[key]
    shard = lo.shard if lo.zero >= 1 else 1
    grad_bytes = fw.fp16_grad_bytes if lo.precision == "fp16" and fw.fp16_grad_bytes else fw.grad_bytes
    states = zero_model_state_bytes(psi_stage, lo.zero, shard, k=12, grad_bytes=grad_bytes)
    if lo.zero == 3 and fw.fsdp_fp32_shard:
        # FSDP: the fp32 shard is both the parameter and Adam's master copy; the optimizer adds the moments.
        states["params"], states["optimizer"] = 4.0 * psi_stage / shard, 8.0 * psi_stage / shard
    if lo.offload:
        states["optimizer"] = 0.0
    s_loc = seq_len // lo.cp
    flash = lo.flash_attention and fw.flash_attention
    def acts(recompute: str) -> float:
        key = ("acts", s_loc, lo.micro_batch, lo.tp, lo.sequence_parallel, recompute, flash)
        if key not in cache:
            cache[key] = layer_activation_bytes(cfg, s_loc, lo.micro_batch, lo.tp, lo.sequence_parallel, recompute,
                                                flash, fw.dropout, fw.selective_kind)
        return cache[key]

    per_layer = acts(lo.recompute)
    layers = math.ceil(cfg.n_layer / lo.pp)
    schedule = "interleaved" if lo.vpp > 1 and lo.schedule == "1f1b" else lo.schedule
    in_flight = in_flight_microbatches(schedule, lo.pp, m, lo.vpp)
    # The backward of one layer holds gradients of about half its activations at a time; what the recompute rebuilds
    # for that layer comes on top (all of it for full recompute, the recomputed half for op-level SAC, the attention
    # scores for selective without a fused kernel); with SP the all-gathered layer input and its gradient are full.
    full = acts("none")
    rebuilt = {"full": full, "none": 0.0}.get(lo.recompute, full - per_layer)
    working = 0.5 * full + max(0.0, rebuilt)
    if lo.sequence_parallel:
        working += 2 * 2 * s_loc * lo.micro_batch * cfg.d_model
    if lo.precision == "fp8":
        per_layer *= 0.9  # fp8 copies of saved GEMM inputs replace some bf16 ones (torchao float8)
    if fw.activation_offload:  # the layer at work and the next one prefetched stay; the rest wait in host memory
        layers, in_flight = min(layers, 2), 1.0
    first = per_layer * layers * in_flight + working
    tokens = lo.micro_batch * s_loc
    logits = tokens * cfg.vocab_size / lo.tp * fw.loss_bytes_per_logit
    last_act = per_layer * layers * 1 + working
    if lo.pp == 1:
        acts, logit_bytes, stage = first, logits, "only"
    elif first >= last_act + logits:
        acts, logit_bytes, stage = first, 0.0, "first"
    else:
        acts, logit_bytes, stage = last_act, logits, "last"
    buffers = COMM_BUFFER_BYTES
    if lo.zero == 3:
        if fw.reshard_after_forward and lo.pp == 1:
            buffers += psi_layer * (2 * 2 + 4)  # two unsharded bf16 layers (prefetch) + one fp32 layer gradient
        else:
            # No reshard after forward (torchtitan with PP): the stage's bf16 weights stay gathered, and
            # with gradients reduced once per step the unsharded fp32 gradients accumulate over micro-batches.
            buffers += psi_stage * 2 + (psi_stage * 4 if m > 1 else psi_layer * 4)
    subtotal = states["params"] + states["grads"] + states["optimizer"] + acts + logit_bytes + buffers
    return MemoryBreakdown(states["params"], states["grads"], states["optimizer"], acts, logit_bytes, buffers,
                           ALLOCATOR_MARGIN * subtotal, stage, NCCL_BUFFER_BYTES)


def total_params(cfg: ModelConfig) -> int:
    """The closed-form count the step model uses, identical to the PyTorch model's num_params()."""
    return num_params(cfg)
