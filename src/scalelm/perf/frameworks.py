"""What a training framework does that the hardware does not decide: kernel fusion, overlap, defaults.

A run's speed depends on software as much as on silicon: whether attention is a fused flash kernel,
how much elementwise traffic a compiler fuses away, whether gradient communication overlaps the
backward, which "selective" recomputation it means. Each profile below states its choices and where
they come from; `plan evaluate` picks a profile from a run's `framework` text, and an empty optional
column of a run takes that profile's documented default (`defaults`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Framework:
    name: str
    flash_attention: bool = True
    """Fused attention (FlashAttention / cuDNN SDPA): no T×T scores in memory, causal blocks skipped."""
    fused_qkv: bool = True
    """q, k and v projections as one GEMM (Megatron's linear_qkv, MPT's Wqkv) rather than three (torchtitan)."""
    fused_qkv_under_tp: bool = True
    """The fusion is kept under tensor parallelism (scalelm turns it off there: apply_tp splits each by heads)."""
    fused_gate_up: bool = True
    """SwiGLU's gate and up projections as one GEMM (Megatron's linear_fc1) rather than two (torchtitan, scalelm)."""
    elementwise_factor: float = 1.0
    """Share of the unfused elementwise bytes (flops.elementwise_bytes_per_token) that still move:
    1.0 eager PyTorch; lower with fused kernels or a compiler."""
    fused_norm: bool = True
    """RMSNorm as one fused kernel (Apex/TE/compiler) rather than a chain of eager ops."""
    fused_softmax_dropout: bool = True
    dropout: bool = False
    dp_overlap: float = 0.9
    """Share of the last micro-batch's backward that gradient all-reduce/reduce-scatter can hide behind."""
    fsdp_overlap: float = 0.9
    """Share of a micro-batch's compute that ZeRO-3 all-gathers/reduce-scatters can hide behind."""
    fsdp_comm_per_microbatch: bool = True
    """ZeRO-3 re-gathers parameters and reduce-scatters gradients on every micro-batch."""
    reshard_after_forward: bool = True
    tp_overlap: float = 0.0
    """Share of tensor-parallel collective time hidden behind GEMMs (async TP / comm-GEMM overlap)."""
    pp_overlap: float = 0.5
    selective_kind: str = "attention"
    """'attention': recompute the attention core only (Korthikanti 2022). 'op': torchtitan's op-level
    policy -- keep every other matmul output and the attention output, recompute the rest."""
    fused_cross_entropy: bool = False
    """A fused loss kernel (one pass over the logits forward, gradient written in one pass)."""
    loss_bytes_per_logit: float = 10.0
    """Bytes per logit element alive at the loss peak, for one micro-batch (memory.py documents each)."""
    fsdp_fp32_shard: bool = True
    """ZeRO-3 as PyTorch FSDP does it: the sharded parameter *is* the fp32 master copy (bf16 weights exist
    only while a layer is gathered), so the states are 4 + grad_bytes + 8 bytes per parameter over the
    shards. False for DeepSpeed ZeRO-3, which also keeps a bf16 partition (2 + grad_bytes + 12)."""
    grad_bytes: int = 4
    """Bytes per gradient element kept for the optimizer (fp32 accumulation is the common default)."""
    grad_comm_bytes: int = 2
    """Bytes per element on the wire for gradient reduction (bf16 reduce) -- 4 for fp32 reduce."""
    param_gather_bytes: int = 2
    """Bytes per element ZeRO-3/FSDP all-gathers (bf16 compute copies) -- 4 when the fp32 parameters are
    gathered as they are (FSDP2 without a MixedPrecisionPolicy)."""
    fp8_cast_bytes: float = 5.0
    """Dynamic-scaling FP8: bytes moved per GEMM input element to find amax and cast (read 2+2, write 1)."""
    step_overhead_s: float = 0.0
    host_ops_per_layer: int = 200
    """Eager operators one block dispatches per micro-batch, forward + backward (a third forward). scalelm's
    block counted with torch.profiler: 194 (fp32) to 208 (bf16 autocast) top-level aten ops."""
    host_ops_fixed: int = 40
    """Operators outside the blocks per micro-batch (embedding, final norm, head, loss), same count."""
    fp32_stream: bool = False
    """Mixed precision by autocast over fp32 weights (PyTorch AMP): the residual stream, the norms and the
    tensors they produce stay fp32, so that part of the elementwise work moves 4-byte activations even in a bf16
    run, plus a cast before every matmul that reads a norm output; the matmul outputs (q/k/v, the MLP activation,
    the attention output) are bf16. False: the framework keeps activations in bf16 (Megatron, TE, JAX)."""
    fp32_attention_kernel: bool = False
    """fp32 attention by scalelm's CPU kernel (scalelm.kernels.cpu.attention), which applies RoPE itself, reads q, k, v
    where the projection wrote them and writes its output in the layout the output projection reads: no RoPE pass
    and no layout copies (flops.elementwise_bytes_per_token). scalelm's fp32 runs are CPU runs in practice; an fp32
    GPU run would take SDPA and move those few bytes per token after all."""
    defaults: dict = field(default_factory=dict)


# Bytes per logit element alive at the loss peak (logits of one micro-batch, per TP rank):
LOSS_BYTES_EAGER = 10.0
"""`F.cross_entropy(logits.float(), y)`: bf16 logits (2) + their fp32 upcast (4) kept as log-softmax
output, and in the backward the fp32 gradient (4) before it is cast back to bf16."""
LOSS_BYTES_MEGATRON = 6.0
"""Megatron's vocab-parallel cross entropy: fp32 logits (4) turned into softmax in place and reused for the
gradient, which is cast to bf16 (2) for the output-layer backward."""
LOSS_BYTES_XENTROPY = 4.0
"""flash-attn's fused xentropy kernel: saves the bf16 logits (2) and an fp32 log-sum-exp per token, and
writes a bf16 gradient (2) in its backward; nothing is upcast to fp32."""

# Defaults for empty columns of a run, per framework family (SCHEMA.md: empty = not stated).
_MEGATRON_DEFAULTS = {"micro_batch": 1, "vpp": 1, "sequence_parallel": "tp>1", "zero": 1, "recompute": "selective", "cp": 1}
_FSDP_DEFAULTS = {"micro_batch": 1, "vpp": 1, "sequence_parallel": "tp>1", "zero": 3, "recompute": "none", "cp": 1}

PROFILES: dict[str, Framework] = {
    # Megatron-LM / NeMo / Megatron-Core / Megatron-DeepSpeed / MegaScale: fused bias-GeLU, fused
    # layer-norm, fused scale-mask-softmax kernels (Shoeybi 2019; Narayanan 2021 sec. 4.2), vocab-parallel
    # fused cross entropy, bucketed gradient all-reduce overlapped with the backward, FlashAttention from
    # 2023 on. `megatron-2021` is the SC21 code: no flash attention, dropout 0.1, p2p not overlapped.
    "megatron": Framework("megatron", elementwise_factor=0.7, fused_cross_entropy=True,
                          loss_bytes_per_logit=LOSS_BYTES_MEGATRON, dp_overlap=0.9,
                          tp_overlap=0.0, pp_overlap=0.5, defaults=_MEGATRON_DEFAULTS),
    "megatron-2021": Framework("megatron-2021", flash_attention=False, elementwise_factor=0.7, dropout=True,
                               fused_cross_entropy=True, loss_bytes_per_logit=LOSS_BYTES_MEGATRON, dp_overlap=0.0, pp_overlap=0.0,
                               defaults=dict(_MEGATRON_DEFAULTS, zero=0, recompute="full")),
    # DeepSpeed (ZeRO 1-3), eager PyTorch kernels, communication overlapped by buckets.
    "deepspeed": Framework("deepspeed", elementwise_factor=0.9, dp_overlap=0.8, fsdp_overlap=0.8,
                           fsdp_fp32_shard=False,
                           defaults=dict(_FSDP_DEFAULTS, zero=1)),
    # Composer / llm-foundry: PyTorch FSDP (FULL_SHARD), FlashAttention, eager elementwise ops (no
    # compile), FSDP forward/backward prefetch; gradients reduce-scattered every micro-batch. MPT's
    # `loss_fn` defaults to `fused_crossentropy` (flash-attn's xentropy kernel, llmfoundry
    # models/mpt/modeling_mpt.py) and the pretrain/benchmark YAMLs do not override it: bf16 logits in,
    # fp32 log-sum-exp per token, bf16 gradient out.
    "llm-foundry": Framework("llm-foundry", elementwise_factor=1.0, fsdp_comm_per_microbatch=True,
                             fused_cross_entropy=True, loss_bytes_per_logit=LOSS_BYTES_XENTROPY,
                             defaults=_FSDP_DEFAULTS),
    # torchtitan: FSDP2, SDPA flash attention, op-level selective AC, unfused fp32 cross entropy; with PP
    # it does not reshard after forward and syncs gradients once per step. torch.compile fuses most
    # elementwise traffic; AsyncTP overlaps TP collectives with GEMMs (torchtitan docs, 2024-12).
    "torchtitan": Framework("torchtitan", elementwise_factor=1.0, selective_kind="op", fused_norm=False,
                            fused_qkv=False, fused_gate_up=False,
                            reshard_after_forward=True,
                            defaults=dict(_FSDP_DEFAULTS, recompute="selective", sequence_parallel="tp>1")),
    # JAX/XLA (PaLM, T5X, MaxText): the compiler fuses elementwise work into neighbours.
    "jax": Framework("jax", elementwise_factor=0.5, fused_cross_entropy=True,
                     loss_bytes_per_logit=LOSS_BYTES_MEGATRON, dp_overlap=0.9,
                     defaults=dict(_FSDP_DEFAULTS, zero=3, recompute="full")),
    # scalelm's own trainer: plain PyTorch, SDPA, FSDP2/DDP. Its CPU runs use the `local` calibration.
    # FSDP2 without a MixedPrecisionPolicy: fp32 parameters gathered and fp32 gradients reduced. q/k/v run as one
    # matmul except under tensor parallelism; w1 and w3 always as two (scalelm.model.gpt).
    "scalelm": Framework("scalelm", elementwise_factor=1.0, fused_norm=False, fp32_stream=True,
                         fused_qkv_under_tp=False, fused_gate_up=False, fp32_attention_kernel=True,
                         grad_comm_bytes=4, param_gather_bytes=4, defaults=_FSDP_DEFAULTS),
}

COMPILE_ELEMENTWISE_FACTOR = 0.5
"""torch.compile/Inductor fuses pointwise chains into single kernels; about half the eager bytes remain
(norm + residual + activation become one read and one write per tensor)."""


def framework_for(text: str | None) -> Framework:
    """Pick and adjust a profile from a free-text framework description (the runs' `framework` column)."""
    t = (text or "").lower()
    if "torchtitan" in t:
        fw = PROFILES["torchtitan"]
    elif "composer" in t or "llm-foundry" in t or "foundry" in t:
        fw = PROFILES["llm-foundry"]
    elif any(k in t for k in ("megatron", "nemo", "megascale")):
        year = re.search(r"(20[12]\d)", t)
        old = (year and int(year.group(1)) <= 2022) or "ptd-p" in t
        fw = PROFILES["megatron-2021" if old else "megatron"]
        if "ddp-impl torch" in t:
            fw = replace(fw, dp_overlap=0.9)
    elif "deepspeed" in t or "neox" in t:
        fw = PROFILES["deepspeed"]
    elif any(k in t for k in ("jax", "t5x", "pax", "maxtext", "xla", "palm")):
        fw = PROFILES["jax"]
    elif "scalelm" in t or not t:
        fw = PROFILES["scalelm"]
    else:
        fw = replace(PROFILES["scalelm"], name=f"generic ({text})", fp32_stream=False, fp32_attention_kernel=False,
                     grad_comm_bytes=2,
                     param_gather_bytes=2)
    if "compile" in t and fw.elementwise_factor > COMPILE_ELEMENTWISE_FACTOR:
        fw = replace(fw, elementwise_factor=COMPILE_ELEMENTWISE_FACTOR, fused_norm=True)
    if "asynctp" in t or "async tp" in t or "tp-comm-overlap" in t or "tp_comm_overlap" in t:
        fw = replace(fw, tp_overlap=0.6)
    if "flashattention" in t or "flash-attn" in t or "flash attention" in t:
        fw = replace(fw, flash_attention=True)
    if "mixed_precision=default" in t:
        fw = replace(fw, grad_comm_bytes=4)
    if "compile" in t and "torchtitan" in t:
        fw = replace(fw, fp8_cast_bytes=3.0)
    return fw
