"""What a training framework does that the hardware does not decide: kernel fusion, overlap, defaults.

A run's speed depends on software as much as on silicon: whether attention is a fused flash kernel,
how much elementwise traffic a compiler fuses away, whether gradient communication overlaps the
backward, which "selective" recomputation it means. Each profile below states its choices and where
they come from. A run names its software in structured fields (`Features`: the optional CSV columns and `plan`
flags); the free-text `framework` column only fills what they leave empty, and a text naming two systems is reported
(`features_from_text`), not settled by which substring comes first. An empty optional layout column takes the
profile's documented default (`defaults`).
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
    zero3_gathers_per_layer: int = 1
    """ZeRO-3 collectives per block and pass: FSDP gathers a wrapped block as one unit; DeepSpeed ZeRO-3 gathers each
    submodule's parameters as it runs (deepspeed/runtime/zero/partitioned_param_coordinator.py, fetch_sub_module):
    the four linear layers and two norms of a block."""
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
    shards. False for DeepSpeed ZeRO-3, which keeps a 16-bit partition besides the fp32 one (2 + 2 + 12)."""
    grad_bytes: int = 4
    """Bytes per gradient element kept for the optimizer (fp32 accumulation is the common default)."""
    fp16_grad_bytes: int | None = None
    """`grad_bytes` of fp16 runs where the framework keeps them apart: Megatron accumulates and reduces gradients in
    the parameters' dtype unless --accumulate-allreduce-grads-in-fp32, which it forces only for bf16."""
    grad_comm_bytes: int = 2
    """Bytes per element on the wire for gradient reduction (bf16 reduce) -- 4 for fp32 reduce."""
    param_gather_bytes: int = 2
    """Bytes per element ZeRO-3/FSDP all-gathers (bf16 compute copies) -- 4 when the fp32 parameters are
    gathered as they are (FSDP2 without a MixedPrecisionPolicy)."""
    fp8_cast_bytes: float = 5.0
    """Dynamic-scaling FP8: bytes moved per GEMM input element to find amax and cast (read 2+2, write 1)."""
    fp8_weight_cast_per_microbatch: bool = True
    """Dynamic (current) scaling casts the weights to fp8 on every forward (torchao Float8Linear); Transformer
    Engine under Megatron/NeMo keeps the fp8 weights of the first micro-batch for the rest of the step
    (`is_first_microbatch`), so only activations and gradients are cast per micro-batch."""
    activation_offload: bool = False
    """Saved activations go to host memory during the forward and come back for the backward (all but the layer
    being computed), over PCIe, overlapped with compute."""
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
    "megatron": Framework("megatron", elementwise_factor=0.7, fused_cross_entropy=True, fp16_grad_bytes=2,
                          loss_bytes_per_logit=LOSS_BYTES_MEGATRON, dp_overlap=0.9,
                          tp_overlap=0.0, pp_overlap=0.5, defaults=_MEGATRON_DEFAULTS),
    "megatron-2021": Framework("megatron-2021", flash_attention=False, elementwise_factor=0.7, dropout=True,
                               fp16_grad_bytes=2,
                               fused_cross_entropy=True, loss_bytes_per_logit=LOSS_BYTES_MEGATRON, dp_overlap=0.0, pp_overlap=0.0,
                               defaults=dict(_MEGATRON_DEFAULTS, zero=0, recompute="full")),
    # DeepSpeed (ZeRO 1-3), eager PyTorch kernels, communication overlapped by buckets; model states as the ZeRO
    # paper counts them (16-bit weights and gradients, 12 bytes of fp32 optimizer state: accounting.zero_states).
    "deepspeed": Framework("deepspeed", elementwise_factor=0.9, dp_overlap=0.8, fsdp_overlap=0.8,
                           fsdp_fp32_shard=False, zero3_gathers_per_layer=6, grad_bytes=2,
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
    # Generic PyTorch FSDP stacks (HF Accelerate/Trainer, FSDP recipes): models written like HF's (separate q/k/v
    # and gate/up projections, eager RMSNorm), SDPA flash attention, bf16 gradient reduce-scatter.
    "fsdp": Framework("fsdp", elementwise_factor=1.0, fused_norm=False, fused_qkv=False, fused_gate_up=False,
                      defaults=_FSDP_DEFAULTS),
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
ASYNC_TP_OVERLAP = 0.6
"""Share of TP collective time hidden by async TP / TP comm-GEMM overlap (assumed, not fitted: the collective is
split into chunks pipelined with the GEMM pieces, and the first and last chunk stay exposed)."""
FP8_CAST_BYTES = {"current": 5.0, "delayed": 4.0}
"""Bytes per GEMM input element to cast to fp8. Current (dynamic, per-tensor) scaling: an amax pass (read 2) then
the cast (read 2, write 1). Delayed scaling (Transformer Engine's default recipe): the scale comes from the amax
history, and the cast is fused with the transpose Hopper's fp8 wgrad needs (read 2, write 1 + 1)."""
FP8_CAST_BYTES_COMPILED = 3.0
"""Current scaling under torch.compile: the amax reduction and the cast fuse into the producing kernel."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "torchtitan": ("torchtitan",),
    "llm-foundry": ("composer", "llm-foundry", "foundry"),
    "megatron": ("megatron", "nemo", "megascale"),
    "deepspeed": ("deepspeed", "neox"),
    "jax": ("jax", "t5x", "pax", "maxtext", "xla", "palm"),
    "fsdp": ("fsdp", "accelerate"),
    "scalelm": ("scalelm",),
}
"""Substrings of the free-text `framework` column naming each profile family (the fallback when the
`framework_name` column is empty). `fsdp` names the sharding engine of torchtitan, llm-foundry and scalelm too, so it
counts only when no other family matches."""
NAMES = {"megatron-lm": "megatron", "megatron-core": "megatron", "mcore": "megatron", "nemo": "megatron",
         "megascale": "megatron", "megatron-deepspeed": "megatron-deepspeed", "gpt-neox": "deepspeed", "composer": "llm-foundry",
         "maxtext": "jax", "t5x": "jax", "pax": "jax", "pytorch-fsdp": "fsdp", "fsdp2": "fsdp", "hf": "fsdp",
         **{k: k for k in ("megatron", "megatron-2021", "deepspeed", "llm-foundry", "torchtitan", "jax", "fsdp",
                           "scalelm")}}
"""Accepted values of the `framework_name` column / `plan --framework`, mapped to a profile."""
FP8_RECIPES = ("delayed", "current", "tensorwise", "rowwise", "blockwise", "mxfp8")


@dataclass(frozen=True)
class Features:
    """What a run states about its software, from structured columns or flags (None = not stated)."""

    name: str | None = None
    year: int | None = None
    distributed_optimizer: bool | None = None
    zero: int | None = None
    flash_attention: bool | None = None
    compile: bool | None = None
    fp8_recipe: str | None = None
    tp_overlap: bool | None = None
    dp_overlap: bool | None = None
    pp_overlap: bool | None = None
    activation_offload: bool | None = None
    fp32_grad_reduce: bool | None = None
    reshard_after_forward: bool | None = None


def _zero_from_text(t: str) -> int | None:
    m = re.search(r"zero[- _]?(?:stage[- _]?)?([0-3])\b", t)
    if m:
        return int(m.group(1))
    if "full_shard" in t or "fully_shard" in t:
        return 3
    return None


def features_from_text(text: str | None, zero: int | None = None) -> tuple[Features, list[str]]:
    """Features a free-text description implies, and warnings (a text naming two systems). `zero`: the stage the
    run states elsewhere, which settles a text naming both Megatron and DeepSpeed."""
    t = (text or "").lower()
    found = [fam for fam, keys in FAMILIES.items() if any(k in t for k in keys)]
    if len(found) > 1 and "fsdp" in found:
        found.remove("fsdp")
    zero = zero if zero is not None else _zero_from_text(t)
    warnings = []
    name = found[0] if found else None
    if len(found) > 1:
        # Two systems in one text: the one that shards the states runs the communication. Megatron shards at most
        # optimizer states and gradients (its distributed optimizer), so a ZeRO-2/3 run is DeepSpeed's engine.
        if "deepspeed" in found and (zero or 0) >= 2:
            name = "deepspeed"
        elif "megatron" in found:
            name = "megatron"
        warnings.append(f"framework text names {' and '.join(found)}; using the {name} profile "
                        "(set the framework_name column to choose)")
    year = re.search(r"(20[12]\d)", t)
    recipe = None
    if "delayed" in t:
        recipe = "delayed"
    elif "float8" in t or "torchao" in t:
        recipe = "current"
    elif "fp8" in t and name == "megatron":
        recipe = "delayed"  # Transformer Engine's default recipe under Megatron/NeMo
    flash = True if any(k in t for k in ("flashattention", "flash-attn", "flash attention", "flash_attn")) else None
    tp_overlap = True if any(k in t for k in ("asynctp", "async tp", "tp-comm-overlap", "tp_comm_overlap")) else None
    dp_overlap = None
    if "ddp-impl local" in t:
        dp_overlap = False  # Megatron 2021's local DDP reduces gradients after the backward
    elif "ddp-impl torch" in t:
        dp_overlap = True
    feats = Features(name=name, year=int(year.group(1)) if year else None, zero=zero, flash_attention=flash,
                     compile=True if "compile" in t else None, fp8_recipe=recipe, tp_overlap=tp_overlap,
                     dp_overlap=dp_overlap, pp_overlap=None,
                     distributed_optimizer=True if "distributed optimizer" in t or "distributed-optimizer" in t
                     else None, activation_offload=True if "activation offload" in t else None,
                     fp32_grad_reduce=True if "mixed_precision=default" in t else None)
    return feats, warnings


def merge(stated: Features, text: Features) -> Features:
    """Structured values win; the text fills what they leave empty."""
    return Features(**{f: getattr(stated, f) if getattr(stated, f) is not None else getattr(text, f)
                       for f in Features.__dataclass_fields__})


def build_framework(feats: Features, described: bool = False) -> Framework:
    """The profile of `feats.name` (era by `year`) with the stated features applied. Without a name, scalelm's own
    profile, or a generic PyTorch one for a run `described` as some other trainer."""
    key = NAMES.get((feats.name or "").lower())
    if key == "megatron-deepspeed":  # Megatron's kernels; DeepSpeed's engine runs the communication from ZeRO-2 on
        key = "deepspeed" if (feats.zero or 0) >= 2 else "megatron"
    if feats.name and key is None:
        raise ValueError(f"unknown framework {feats.name!r}; use one of {', '.join(sorted(NAMES))}")
    if key is None:
        fw = replace(PROFILES["scalelm"], name="generic", fp32_stream=False, fp32_attention_kernel=False,
                     grad_comm_bytes=2, param_gather_bytes=2) if described else PROFILES["scalelm"]
    else:
        if key == "megatron" and feats.year is not None and feats.year <= 2022:
            key = "megatron-2021"
        fw = PROFILES[key]
    if feats.compile and fw.elementwise_factor > COMPILE_ELEMENTWISE_FACTOR:
        fw = replace(fw, elementwise_factor=COMPILE_ELEMENTWISE_FACTOR, fused_norm=True)
    if feats.flash_attention is not None:
        fw = replace(fw, flash_attention=feats.flash_attention)
    if feats.tp_overlap is not None:
        fw = replace(fw, tp_overlap=ASYNC_TP_OVERLAP if feats.tp_overlap else 0.0)
    default = Framework("default")
    if feats.dp_overlap is not None:  # on: the profile's own share, or the default one where the profile has none
        fw = replace(fw, dp_overlap=(fw.dp_overlap or default.dp_overlap) if feats.dp_overlap else 0.0,
                     fsdp_overlap=(fw.fsdp_overlap or default.fsdp_overlap) if feats.dp_overlap else 0.0)
    if feats.pp_overlap is not None:
        fw = replace(fw, pp_overlap=(fw.pp_overlap or default.pp_overlap) if feats.pp_overlap else 0.0)
    if feats.fp32_grad_reduce:
        fw = replace(fw, grad_comm_bytes=4)
    if feats.activation_offload is not None:
        fw = replace(fw, activation_offload=feats.activation_offload)
    if feats.reshard_after_forward is not None:  # ZeRO-3: free gathered weights after the forward (re-gather them)
        fw = replace(fw, reshard_after_forward=feats.reshard_after_forward)
    recipe = feats.fp8_recipe
    if recipe is not None and recipe not in FP8_RECIPES:
        raise ValueError(f"unknown fp8_recipe {recipe!r}; use one of {', '.join(FP8_RECIPES)}")
    if recipe == "delayed":
        fw = replace(fw, fp8_cast_bytes=FP8_CAST_BYTES["delayed"], fp8_weight_cast_per_microbatch=False)
    elif recipe is not None or key in ("torchtitan", "fsdp"):
        compiled = feats.compile and key in ("torchtitan", "fsdp", "scalelm")
        fw = replace(fw, fp8_cast_bytes=FP8_CAST_BYTES_COMPILED if compiled else FP8_CAST_BYTES["current"])
    return fw


def framework_from(text: str | None, stated: Features | None = None) -> tuple[Framework, Features, list[str]]:
    """Profile, merged features and warnings for a run described by structured fields and/or free text."""
    from_text, warnings = features_from_text(text, stated.zero if stated else None)
    feats = merge(stated or Features(), from_text)
    if stated and stated.name:
        warnings = []  # the structured name settles what the text left ambiguous
    return build_framework(feats, described=bool((text or "").strip())), feats, warnings


def framework_for(text: str | None) -> Framework:
    """A profile from a free-text framework description alone (`framework_from` with no structured fields)."""
    if not (text or "").strip():
        return PROFILES["scalelm"]
    return framework_from(text)[0]
