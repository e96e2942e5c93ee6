"""Hardware as data: accelerators, nodes, networks, storage and datacenters read from TOML files.

Adding a GPU is adding a file (the Calculon habit): `src/scalelm/perf/hardware/<key>.toml` holds the
accelerator facts (peak FLOP/s per dtype, HBM, TDP, price), its documented efficiencies and its usual node;
`networks.toml` holds the inter-node fabrics keyed as in the published-run data; a cluster file
(`dgx-superpod-h100.toml`) names an accelerator and adds nodes, storage and a datacenter. Users pass their
own file with `--hardware FILE`; `--hardware local` is the file `scalelm calibrate` wrote.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

HARDWARE_DIR = Path(__file__).with_name("hardware")

# A per-device MTBF when a file gives none: Llama 3 (Dubey et al. 2024, sec. 3.3.4) saw 419 unexpected
# interruptions in 54 days on 16,384 H100s, i.e. 16384 * 54 * 24 / 419 ~ 50,700 device-hours between failures.
DEFAULT_MTBF_HOURS = 50_700.0


class HardwareError(ValueError):
    """A hardware name or file that cannot be used; the message says what to pass instead."""


@dataclass(frozen=True)
class Accelerator:
    key: str
    name: str
    peak_tflops: dict[str, float]
    """Dense peak per dtype (fp32, tf32, bf16, fp16, fp8), TFLOP/s, vendor figures."""
    hbm_gib: float
    hbm_tb_s: float
    tdp_w: float
    compute_units: int = 108
    price_per_hour_usd: float = 2.0
    source: str = ""
    notes: str = ""

    def peak_flops(self, dtype: str) -> float:
        """FLOP/s for matmuls in `dtype`; fp8 falls back to an error, fp16/bf16 to each other."""
        order = {"bf16": ("bf16", "fp16"), "fp16": ("fp16", "bf16"), "fp8": ("fp8",),
                 "fp32": ("fp32", "tf32"), "tf32": ("tf32", "fp32")}.get(dtype, (dtype,))
        for name in order:
            if self.peak_tflops.get(name):
                return self.peak_tflops[name] * 1e12
        have = ", ".join(k for k, v in self.peak_tflops.items() if v)
        raise HardwareError(f"{self.key} has no {dtype} peak; use --precision one of: {have}")


@dataclass(frozen=True)
class Efficiency:
    """Shares of the peaks that real kernels reach (sources in each hardware file)."""

    matmul: float = 0.75
    """Large-GEMM FLOP efficiency (cuBLAS-class)."""
    matmul_fp32_fast: float | None = None
    """`matmul` for fp32 GEMMs outside tensor parallelism, where the framework runs them on a faster kernel than
    the one the curve was measured with (scalelm on CPUs: oneDNN instead of BLAS, scalelm.kernels.cpu.linear; under
    tensor parallelism and in bf16 the matmuls stay PyTorch's own), as a factor on the same curve (may exceed 1).
    None: `matmul`."""
    matmul_bf16: float | None = None
    """`matmul` for bf16/fp16 GEMMs where it was measured apart (scalelm calibrate on CPUs: linear layers under
    bf16 autocast against the bf16 curve, weight casts included), as a factor on that curve. None: `matmul`."""
    matmul_k_overhead: float = 128.0
    """Tile prologue/epilogue cost in units of the inner dimension: a GEMM with inner size k runs at
    k / (k + this) of `matmul` (fixed per-tile cost amortized over the main loop)."""
    matmul_n_overhead: float = 0.0
    """The same for the output width n: n / (n + this). CPU BLAS kernels lose much of their speed on narrow
    outputs such as a TP-split q, k or v projection, which the 128-wide tiles of `_wave_efficiency` do not
    describe; fitted by `scalelm calibrate` on CPUs, 0 for GPUs, whose narrow-output loss the wave model covers."""
    matmul_k_overhead_bf16: float | None = None
    matmul_n_overhead_bf16: float | None = None
    """k0 and n0 of 16-bit GEMMs where they differ (None: the fp32 ones). On CPUs bf16 GEMMs run on other
    kernels (oneDNN) than fp32 ones (BLAS), with a curve of their own, so `scalelm calibrate` fits each dtype's."""
    memory_bw: float = 0.8
    """Share of HBM bandwidth reached by elementwise/normalization kernels."""
    attention: float = 0.6
    """Fused (flash) attention fwd+bwd efficiency for head_dim -> infinity; head_dim d gets d/(d+32) of it."""
    attention_bf16: float | None = None
    """The same for 16-bit inputs, where it differs from `attention` (calibrated on CPUs). A share of the bf16
    matmul peak, so it may exceed 1 on a CPU whose flash kernel computes bf16 attention in fp32 at a higher rate
    than its bf16 GEMMs reach (a CPU whose bf16 matmuls are slower than its fp32 ones)."""
    clock_derate: float = 1.0
    """Sustained clock under the configured power cap relative to the vendor peak."""
    kernel_overhead_us: float = 4.0
    """Launch + ramp time added to each kernel."""
    attention_tile_us: float = 0.0
    """Fixed cost per (sequence, head, 64-query-row block) of fused attention forward+backward: buffer setup and
    softmax bookkeeping that small heads and short sequences cannot amortize (measured on CPUs; on GPUs it is
    part of `attention`)."""
    attention_tile_us_bf16: float | None = None
    """The same for 16-bit inputs where it differs (CPU bf16 attention kernels convert every tile)."""
    comm_overlap: float = 1.0
    """Share of the framework's compute/communication overlap this device can realize. 0 where collectives run
    synchronously on the compute cores (gloo on a CPU: nothing hides behind compute)."""
    fsdp_unit_us: float = 0.0
    """Host time per FSDP unit (a block) and micro-batch sync beyond its collectives' transfer: copy-in/out,
    hooks, waiting for the slower rank. 0 on accelerators, where it runs ahead of the device."""
    tp_pair_us: float = 0.0
    """The same per tensor-parallel column/row pair (an attention or MLP sub-layer) and micro-batch: DTensor
    dispatch and the wait at its all-reduces (a fixed cost; `scalelm calibrate` measures the slowdown below)."""
    tp_comm_slowdown: float = 1.0
    """Tensor-parallel all-reduces inside a step take this many times the isolated all-reduce time. 1 on GPUs (NCCL
    on its own SMs); on a CPU, gloo's thread shares the cores with compute and the ranks arrive unevenly, so
    `scalelm calibrate` (scalelm.calibrate.parallel) measures it inside a TP stack of a real step's size."""
    matmul_kernel: float | None = None
    """Large-GEMM share of the peak that the vendor BLAS reaches alone (a published microbenchmark). Where given,
    `matmul` = this x the fitted in-step factor `gemm` (fit.toml), the share a GEMM keeps inside a training step."""
    attention_kernel: float | None = None
    """Fused-attention fwd+bwd share (head_dim -> infinity) from a kernel benchmark; `attention` = this x `attention`
    of fit.toml."""
    memory_bw_kernel: float | None = None
    """Share of HBM bandwidth a copy/stream kernel reaches; `memory_bw` = this x `memory` of fit.toml."""
    host_op_us: float = 0.0
    """Host time per eager operator (dispatch + autograd) that the device cannot hide. 0 on accelerators: the
    host enqueues kernels asynchronously and runs ahead of them. On a CPU the host *is* the device, so every
    operator's dispatch adds to the step (`scalelm calibrate` measures it)."""
    source: str = ""


@dataclass(frozen=True)
class Node:
    gpus_per_node: int = 8
    nvlink_domain: int = 8
    """GPUs that reach each other over the scale-up fabric (NVL72: 72)."""
    intra_node_gb_s: float = 300.0
    """Per-GPU, one-direction scale-up bandwidth (NVLink/xGMI/ICI), GB/s."""
    intra_node_fabric: str = ""
    intra_node_efficiency: float = 0.78
    intra_node_latency_us: float = 3.0
    inter_node: str = "ib-hdr-8x200"
    pcie_gb_s: float = 25.0
    """Host link per GPU for offload (PCIe 4 x16 ~ 25 GB/s usable)."""

    @property
    def domain(self) -> int:
        """GPUs on one scale-up fabric: the node, or the NVLink domain where it spans several (GB200 NVL72: 72 GPUs
        over 18 trays of 4). Collectives inside it run on NVLink; beyond it on the NICs."""
        return max(self.gpus_per_node, self.nvlink_domain)


@dataclass(frozen=True)
class Network:
    key: str
    name: str
    per_port_gbps: float
    ports_per_node: int
    node_total_gbps: float
    latency_us: float = 6.0
    efficiency: float = 0.85
    topology: str = ""
    oversubscription: float = 1.0
    source: str = ""

    @property
    def node_gb_s(self) -> float:
        """Usable node injection bandwidth, GB/s (bits -> bytes, times collective efficiency)."""
        return self.node_total_gbps / 8.0 * self.efficiency


@dataclass(frozen=True)
class Storage:
    name: str = "parallel file system (assumed)"
    read_gb_s: float = 100.0
    write_gb_s: float = 50.0
    source: str = "assumption: a mid-size Lustre/GPFS tier; edit in your hardware file"


@dataclass(frozen=True)
class Datacenter:
    pue: float = 1.2
    carbon_kg_per_kwh: float = 0.39
    price_per_kwh_usd: float = 0.10
    source: str = "assumption: modern GPU hall PUE 1.2; US grid average 0.39 kg CO2e/kWh (EIA 2023)"


@dataclass(frozen=True)
class Hardware:
    """Everything the step model needs about one cluster of identical accelerators."""

    accelerator: Accelerator
    efficiency: Efficiency
    node: Node
    network: Network
    storage: Storage = field(default_factory=Storage)
    datacenter: Datacenter = field(default_factory=Datacenter)
    mtbf_hours: float = DEFAULT_MTBF_HOURS
    nodes: int | None = None
    """Cluster size in nodes when the file states it (the planner then refuses larger jobs)."""
    name: str = ""
    path: str = ""

    @property
    def key(self) -> str:
        return self.accelerator.key

    def refit(self, knobs: dict[str, float]) -> Hardware:
        """The same hardware with the in-step efficiencies recomputed from its kernel benchmarks and `knobs`
        (FIT_KNOBS). Efficiencies stated directly (calibrated or hand-written files) stay as they are."""
        return replace(self, efficiency=apply_knobs(self.efficiency, knobs))

    def with_network(self, inter_node: str | None = None, gpus_per_node: int | None = None) -> Hardware:
        """The same hardware with another inter-node fabric or node size (used per row by `plan evaluate`)."""
        hw = self
        if inter_node:
            hw = replace(hw, network=load_network(inter_node))
        node = hw.node
        if gpus_per_node and node.nvlink_domain > node.gpus_per_node and gpus_per_node > node.gpus_per_node:
            # A run that counts the NVLink rack as its node (GB200 NVL72 as "72 GPUs per node"): the NICs stay the
            # tray's, one share per GPU, and the rack is the NVLink domain.
            hw = replace(hw, node=replace(node, nvlink_domain=max(node.nvlink_domain, gpus_per_node)))
        elif gpus_per_node:
            domain = max(gpus_per_node, node.nvlink_domain if node.nvlink_domain > node.gpus_per_node else 0)
            hw = replace(hw, node=replace(node, gpus_per_node=gpus_per_node, nvlink_domain=domain))
        return hw


FIT_PATH = Path(__file__).with_name("fit.toml")
FIT_KNOBS = {"gemm": "matmul", "attention": "attention", "memory": "memory_bw"}
"""The model's only fitted numbers: one in-step factor per kernel class, shared by every device (fit.toml)."""
_KNOBS: dict[str, float] | None = None


def fitted_knobs() -> dict[str, float]:
    """The knobs fitted on the development runs (`scalelm plan evaluate RUNS --cv source --write-fit` writes them)."""
    global _KNOBS
    if _KNOBS is None:
        with open(FIT_PATH, "rb") as f:
            _KNOBS = {k: float(v) for k, v in tomllib.load(f)["knobs"].items() if k in FIT_KNOBS}
    return dict(_KNOBS)


def apply_knobs(eff: Efficiency, knobs: dict[str, float]) -> Efficiency:
    """In-step efficiency = kernel benchmark share x fitted factor, for each kernel class the file benchmarks."""
    over = {}
    for knob, name in FIT_KNOBS.items():
        kernel = getattr(eff, f"{name}_kernel")
        if kernel is not None and knob in knobs:
            over[name] = kernel * knobs[knob]
    return replace(eff, **over) if over else eff


def _pick(cls, data: dict[str, Any]):
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in known})


_NETWORKS: dict[str, dict[str, Any]] | None = None


def networks() -> dict[str, dict[str, Any]]:
    global _NETWORKS
    if _NETWORKS is None:
        with open(HARDWARE_DIR / "networks.toml", "rb") as f:
            _NETWORKS = tomllib.load(f)
    return _NETWORKS


def load_network(key: str) -> Network:
    nets = networks()
    if key not in nets:
        raise HardwareError(f"unknown inter-node fabric {key!r}; choose one of: {', '.join(sorted(nets))}")
    return _pick(Network, dict(nets[key], key=key))


def catalog() -> dict[str, Path]:
    """Built-in hardware names -> files (accelerators and clusters)."""
    return {p.stem: p for p in sorted(HARDWARE_DIR.glob("*.toml")) if p.stem != "networks"}


def local_hardware_path() -> Path:
    """Where `scalelm calibrate` writes by default: $XDG_CACHE_HOME/scalelm/hardware/local.toml."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scalelm" / "hardware" / "local.toml"


def _resolve(name: str) -> Path:
    if name == "local":
        path = local_hardware_path()
        if not path.exists():
            raise HardwareError(f"no calibrated hardware at {path}; run `scalelm calibrate` first "
                                "(or pass --hardware FILE)")
        return path
    path = Path(name)
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise HardwareError(f"hardware file {name} does not exist")
        return path
    cat = catalog()
    if name not in cat:
        import difflib

        close = difflib.get_close_matches(name, cat, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise HardwareError(f"unknown hardware {name!r}; {hint}choose one of: {', '.join(cat)} "
                            "(or pass a TOML file)")
    return cat[name]


def parse_hardware(data: dict[str, Any], origin: str = "") -> Hardware:
    """Build Hardware from a parsed TOML table (accelerator file, cluster file, or calibrated file)."""
    cluster = data.get("cluster", {})
    if "accelerator" not in data:
        if "accelerator" not in cluster:
            raise HardwareError(f"{origin}: needs an [accelerator] table or [cluster] accelerator = KEY")
        base = load_hardware(cluster["accelerator"])
        acc, eff, node = base.accelerator, base.efficiency, base.node
    else:
        a = dict(data["accelerator"])
        try:
            acc = _pick(Accelerator, a)
        except TypeError as exc:
            raise HardwareError(f"{origin}: [accelerator] is missing a field ({exc})") from None
        eff = apply_knobs(_pick(Efficiency, data.get("efficiency", {})), fitted_knobs())
        node = _pick(Node, data.get("node", {}))
    if "inter_node" in cluster:
        node = replace(node, inter_node=cluster["inter_node"])
    if "network" in data:
        net = _pick(Network, dict({"key": "custom", "name": "custom"}, **data["network"]))
    else:
        net = load_network(node.inter_node)
    storage = _pick(Storage, data["storage"]) if "storage" in data else Storage()
    dc = _pick(Datacenter, data["datacenter"]) if "datacenter" in data else Datacenter()
    mtbf = float(data.get("reliability", {}).get("mtbf_hours_per_device", DEFAULT_MTBF_HOURS))
    return Hardware(acc, eff, node, net, storage, dc, mtbf, cluster.get("nodes"),
                    cluster.get("name", acc.name), origin)


_CACHE: dict[str, Hardware] = {}


def load_hardware(name: str) -> Hardware:
    """A built-in name (`a100-80gb`, `dgx-superpod-h100`), a TOML path, or `local`."""
    path = _resolve(name)
    key = str(path.resolve())
    if key not in _CACHE:
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except tomllib.TOMLDecodeError as exc:
            raise HardwareError(f"{path} is not valid TOML: {exc}") from None
        _CACHE[key] = parse_hardware(data, str(path))
    return _CACHE[key]
