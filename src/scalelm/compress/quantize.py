"""Weight-only quantization of a built GPT: int8 per output channel, int4 per group of input weights.

`quantize_tensors(model, bits, group_size)` computes what a quantized checkpoint stores (integers, scales, zeros,
the float tensors left as they are) and `swap_quantized(model, tensors, spec)` puts modules computing from those
tensors into the model, in place — together `quantize_model`, a conversion of a built model like torchao's
`quantize_`. The same two steps load a checkpoint (compress/checkpoint.py), so a model quantized in memory and one
loaded from disk are the same.

Which code runs each part, and why:
- int8 linear layers: torchao's `Int8WeightOnlyConfig` weight (`Int8Tensor`, per-row scales), which runs on CPU.
- int4 linear layers: torchao 0.18's int4 weight-only layouts do not run on a CPU with fp32 activations (plain
  and preshuffled need the mslk package, plain_int32 has no CPU path, tile_packed_to_4d needs CUDA and bf16), and
  its intx int4 weight keeps one byte per value, so `Int4Linear` is written here: packed nibbles, fp16 scales
  and zeros, dequantized for each call.
- the token embedding (and the head that shares it): int8 rows in `Int8Embedding`/`Int8TiedHead`, written here
  because torchao's int8 tensor dequantizes the whole table for every lookup and has no form shared by a lookup
  and a tied head. Quantizing the table keeps it from dominating a small model's int4 checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4)
GROUP_SIZES = (32, 64, 128)


class QuantizeError(ValueError):
    """A quantization the model or the options do not allow, phrased for people."""


# ---- the numbers ------------------------------------------------------------------------------------------
def quantize_int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8, as torchao's weight-only int8 picks it: q int8 [N, K], scale fp32 [N] with
    w ≈ q · scale, off by at most scale / 2 per entry."""
    from torchao.quantization import Int8Tensor
    from torchao.quantization.granularity import PerRow

    t = Int8Tensor.from_hp(w.detach().float(), PerRow())
    return t.qdata.contiguous(), t.scale.reshape(-1).float().contiguous()


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of `group_size` consecutive input weights: q uint8 [N, K] in 0..15, scale and
    zero (the group's minimum) fp16 [N, K/group_size]; w ≈ q · scale + zero. Scale and zero are rounded to fp16
    before q is chosen, so the stored numbers dequantize to within scale / 2 of w (plus the fp16 rounding of the
    zero)."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=2.0**-14).half()  # fp16's smallest normal: an all-equal group stays exact
    zero = lo.half()
    q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round().clamp(0, 15)
    return q.to(torch.uint8).reshape(n, k), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q · scale + zero in `dtype`: one fused multiply-add over the groups (decode runs it for every layer)."""
    n, k = q.shape
    groups = scale.shape[1]
    w = torch.addcmul(zero[..., None], q.reshape(n, groups, k // groups).to(dtype), scale[..., None])
    return w.reshape(n, k).to(dtype)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] of values 0..15 → uint8 [N, K/2]: column 2j in the low nibble, 2j+1 in the high one."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4, by one broadcast shift and mask (no concatenation: decode unpacks every step)."""
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=packed.device)
    return ((packed[..., None] >> shifts) & 0xF).reshape(packed.shape[0], -1)


# ---- the modules ------------------------------------------------------------------------------------------
class Int4Linear(nn.Module):
    """`nn.Linear` with int4 group-wise weights, held packed (half a byte each) with fp16 scales and zeros, and
    dequantized to the activations' dtype for each call. PyTorch's CPU int4 kernel (`_weight_int4pack_mm_for_cpu`)
    is not used: on AVX2-only CPUs it is several times slower than dequantize + matmul for prefill and evaluation
    batches (bench/compress.py times both), and it wants fp32 scales and zeros, which would grow the weights in
    memory."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.group_size = self.in_features // scale.shape[1]
        self.register_buffer("weight_packed", packed)
        self.register_buffer("scale", scale)
        self.register_buffer("zero", zero)
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = dequantize_int4(unpack_int4(self.weight_packed), self.scale, self.zero, x.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


class Int8Embedding(nn.Module):
    """An embedding table of int8 rows, each with its own fp32 scale; a lookup dequantizes only its rows."""

    def __init__(self, qdata: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = qdata.shape
        self.register_buffer("qdata", qdata)
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qdata[ids].float() * self.scale[ids, None]


class Int8TiedHead(nn.Module):
    """The output head that shares an `Int8Embedding`'s table (tied embeddings): logits = x · (q · scale)ᵀ, the
    table dequantized for each call (PyTorch's `_weight_int8pack_mm` is slower than that for prefill and
    evaluation batches on AVX2-only CPUs)."""

    def __init__(self, embedding: Int8Embedding):
        super().__init__()
        self.embedding = [embedding]  # a list: not a submodule, so its buffers are not counted twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = self.embedding[0]
        return F.linear(x, (table.qdata.to(x.dtype) * table.scale[:, None].to(x.dtype)))


def _int8_linear(qdata: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear whose weight is torchao's Int8Tensor built from stored integers and scales."""
    from torchao.quantization import Int8Tensor

    out_features, in_features = qdata.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    weight = Int8Tensor(qdata, scale.reshape(-1, 1), [1, in_features], torch.float32)
    linear.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


# ---- model conversion -------------------------------------------------------------------------------------
def _targets(model: nn.Module) -> list[str]:
    """The linear layers to quantize: every nn.Linear except a head tied to the embedding."""
    tied = getattr(model, "cfg", None) is not None and model.cfg.tie_embeddings
    return [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and not (tied and name == "output")]


def check_options(bits: int, group_size: int | None) -> int | None:
    """The group size to use (None for int8); raises QuantizeError for anything else than 8 or 4 bits, or an
    int4 group size outside 32/64/128."""
    if bits not in BITS:
        raise QuantizeError(f"--bits {bits} is not supported; choose 8 (per-channel int8) or 4 (group-wise int4)")
    if bits == 8:
        if group_size is not None:
            raise QuantizeError("--group-size applies to --bits 4 only (int8 scales are per output channel)")
        return None
    group_size = 32 if group_size is None else group_size
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"--group-size {group_size} is not supported; choose one of 32, 64, 128")
    return group_size


@torch.no_grad()
def quantize_tensors(model: nn.Module, bits: int, group_size: int | None = None) -> tuple[dict[str, torch.Tensor],
                                                                                            dict[str, Any]]:
    """(tensors, spec) of the quantized `model` (a dense GPT; it is not changed): the linear layers in `bits`,
    the token embedding in int8 rows, everything else as it is. `spec` says which module got which form."""
    group_size = check_options(bits, group_size)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, dict[str, Any]] = {}
    done: set[str] = set()
    for name in _targets(model):
        linear = model.get_submodule(name)
        w = linear.weight.detach().float().cpu()
        if bits == 4 and w.shape[1] % group_size:
            raise QuantizeError(f"{name} has {w.shape[1]} input features, not a multiple of --group-size "
                                f"{group_size}; choose a group size that divides it")
        if bits == 8:
            tensors[f"{name}.qdata"], tensors[f"{name}.scale"] = quantize_int8_rows(w)
            modules[name] = {"kind": "int8"}
        else:
            q, tensors[f"{name}.scale"], tensors[f"{name}.zero"] = quantize_int4_groups(w, group_size)
            tensors[f"{name}.packed"] = pack_int4(q)
            modules[name] = {"kind": "int4", "group_size": group_size}
        if linear.bias is not None:
            tensors[f"{name}.bias"] = linear.bias.detach().float().cpu().contiguous()
        done.update((f"{name}.weight", f"{name}.bias"))
    if getattr(model, "tok_embeddings", None) is not None:
        tensors["tok_embeddings.qdata"], tensors["tok_embeddings.scale"] = \
            quantize_int8_rows(model.tok_embeddings.weight.detach().float().cpu())
        modules["tok_embeddings"] = {"kind": "int8-embedding"}
        done.add("tok_embeddings.weight")
        if model.cfg.tie_embeddings:
            modules["output"] = {"kind": "int8-tied-head"}
            done.add("output.weight")
    for name, tensor in model.state_dict().items():
        if name not in done:
            tensors[name] = tensor.detach().cpu().contiguous()
    spec = {"format": "scalelm-weight-only", "bits": bits, "group_size": group_size, "modules": modules}
    return tensors, spec


def swap_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], spec: dict[str, Any],
                   device: str | torch.device = "cpu") -> nn.Module:
    """Replace `model`'s modules named in `spec` by quantized ones built from `tensors` on `device` (where the
    model's other tensors already are), and load the remaining float tensors; returns the model in eval mode."""
    device = torch.device(device)
    parts = dict(tensors)
    for name, info in spec["modules"].items():
        kind = info["kind"]
        own = {key.rsplit(".", 1)[1]: parts.pop(key).to(device) for key in list(parts)
               if key.rsplit(".", 1)[0] == name}
        bias = own.get("bias")
        if kind == "int8":
            module = _int8_linear(own["qdata"], own["scale"], bias)
        elif kind == "int4":
            module = Int4Linear(own["packed"], own["scale"], own["zero"], bias)
        elif kind == "int8-embedding":
            module = Int8Embedding(own["qdata"], own["scale"])
        elif kind == "int8-tied-head":
            continue  # after the embedding
        else:
            raise QuantizeError(f"unknown quantized module kind {kind!r} for {name}; was this checkpoint written "
                                f"by a newer scalelm?")
        _set_module(model, name, module)
    if spec["modules"].get("output", {}).get("kind") == "int8-tied-head":
        model.output = Int8TiedHead(model.tok_embeddings)
    missing, unexpected = model.load_state_dict({k: v.to(device) for k, v in parts.items()}, strict=False)
    if unexpected or any(not _is_quantized_key(k, spec) for k in missing):
        raise QuantizeError(f"quantized tensors do not match the model (missing {missing[:3]}, unexpected "
                            f"{unexpected[:3]}); was the checkpoint written for another model config?")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _is_quantized_key(key: str, spec: dict[str, Any]) -> bool:
    return key.rsplit(".", 1)[0] in spec["modules"]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def quantize_model(model: nn.Module, bits: int, group_size: int | None = None) -> nn.Module:
    """Quantize a dense GPT in place (weight-only, `bits` 8 or 4) and return it in eval mode."""
    tensors, spec = quantize_tensors(model, bits, group_size)
    return swap_quantized(model, tensors, spec, next(model.parameters()).device)


def model_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and buffer the model holds (shared ones once; the inner tensors of a torchao
    quantized tensor counted by their own sizes)."""
    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        names = getattr(t, "tensor_data_names", None)
        if names is not None:  # a torchao tensor subclass: its plain inner tensors
            for n in (*names, *getattr(t, "optional_tensor_data_names", ())):
                inner = getattr(t, n, None)
                if inner is not None:
                    add(inner)
            return
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()

    for t in (*model.parameters(), *model.buffers()):
        add(t)
    return total
