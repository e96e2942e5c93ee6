"""α-β costs of collectives: ring, tree, hierarchical (NVLink inside a node + NICs across), parameter server.

A collective over n ranks moving S bytes costs ``steps·α + volume(S, n) / β`` (Hockney's model;
Thakur, Rabenseifner & Gropp 2005 for the ring/tree forms, Patarasuk & Yuan 2009 for the ring's
bandwidth optimality):

* ring all-gather / reduce-scatter: (n-1)·α + (n-1)/n · S/β
* ring all-reduce: 2(n-1)·α + 2(n-1)/n · S/β
* double binary tree all-reduce (NCCL >= 2.4): 2·log2(n)·α + 2(n-1)/n · S/β (pipelined, same volume)
* hierarchical all-reduce: reduce-scatter inside the node, all-reduce of S/g across nodes on all g NICs
  in parallel, all-gather inside the node.

β for a group spread over several nodes is limited by what each node can inject: a group with g ranks per
node (per NVLink domain, where one spans several nodes) drives g GPUs' share of the NICs while the other groups use
the rest, so β = min(NVLink, NIC bandwidth per GPU · g). NCCL's rings cross each node boundary once per
channel, which is why a group filling its nodes sees the whole node bandwidth, not one NIC's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scalelm.perf.hardware import Hardware


@dataclass(frozen=True)
class Link:
    """Effective α (s) and β (bytes/s) of a process group, and whether it leaves the node.

    `alpha_s` is the latency of a hop across the slowest link; a ring over several nodes pays it only on the hops
    that cross a node boundary and `intra_alpha_s` on the others, as NCCL's own cost model does (src/graph/tuning.cc:
    ring latency = (nsteps - nInterSteps)·intraLat + nInterSteps·interLat, nInterSteps = nodes - 1 per pass)."""

    alpha_s: float
    beta_bytes_s: float
    inter_node: bool
    intra_alpha_s: float = 0.0
    nodes: int | None = None
    """Nodes the group spans; None: every hop is taken to cross one."""

    def ring_latency_s(self, n: int, passes: int = 1) -> float:
        """Latency of `passes` trips around a ring of n ranks (1: all-gather/reduce-scatter, 2: all-reduce)."""
        if not self.inter_node or self.nodes is None:
            return passes * (n - 1) * self.alpha_s
        inter = min(n - 1, self.nodes - 1)
        return passes * ((n - 1 - inter) * self.intra_alpha_s + inter * self.alpha_s)


def group_link(hw: Hardware, size: int, ranks_per_node: int) -> Link:
    """α/β for a group of `size` ranks of which `ranks_per_node` share each node (or NVLink domain)."""
    node = hw.node
    intra_bw = node.intra_node_gb_s * 1e9 * node.intra_node_efficiency
    if size <= 1:
        return Link(0.0, float("inf"), False)
    domain = node.domain
    if size <= ranks_per_node and size <= domain:
        return Link(node.intra_node_latency_us * 1e-6, intra_bw, False)
    # Beyond the NVLink domain every rank of the group there drives its own share of the NICs.
    per_node = max(1, min(ranks_per_node, domain))
    nic_bw = hw.network.node_gb_s * 1e9 / node.gpus_per_node * per_node
    return Link(hw.network.latency_us * 1e-6, min(intra_bw, nic_bw), True, node.intra_node_latency_us * 1e-6,
                math.ceil(size / per_node))


def ring_all_gather_s(size_bytes: float, n: int, link: Link) -> float:
    """Ring all-gather (or reduce-scatter) of a buffer whose *full* size is `size_bytes`."""
    if n <= 1 or size_bytes <= 0:
        return 0.0
    return link.ring_latency_s(n) + (n - 1) / n * size_bytes / link.beta_bytes_s


def ring_all_reduce_s(size_bytes: float, n: int, link: Link) -> float:
    if n <= 1 or size_bytes <= 0:
        return 0.0
    return link.ring_latency_s(n, 2) + 2 * (n - 1) / n * size_bytes / link.beta_bytes_s


def tree_all_reduce_s(size_bytes: float, n: int, link: Link) -> float:
    """Double binary tree (pipelined): log-depth latency, ring-like bandwidth term."""
    if n <= 1 or size_bytes <= 0:
        return 0.0
    return 2 * math.ceil(math.log2(n)) * link.alpha_s + 2 * (n - 1) / n * size_bytes / link.beta_bytes_s


def hierarchical_all_reduce_s(size_bytes: float, n: int, hw: Hardware, ranks_per_node: int) -> float:
    """NVLink reduce-scatter, NIC all-reduce of S/g across nodes (g NICs in parallel), NVLink all-gather."""
    g = max(1, min(ranks_per_node, n))
    nodes = max(1, n // g)
    intra = group_link(hw, g, g)
    inter = group_link(hw, nodes, 1)
    return (2 * ring_all_gather_s(size_bytes, g, intra)
            + min(ring_all_reduce_s(size_bytes / g, nodes, inter), tree_all_reduce_s(size_bytes / g, nodes, inter)))


def all_reduce_s(size_bytes: float, n: int, hw: Hardware, ranks_per_node: int) -> float:
    """The best of ring, tree and hierarchical, as NCCL's tuner picks per size."""
    if n <= 1:
        return 0.0
    link = group_link(hw, n, ranks_per_node)
    best = min(ring_all_reduce_s(size_bytes, n, link), tree_all_reduce_s(size_bytes, n, link))
    if link.inter_node and ranks_per_node > 1:
        best = min(best, hierarchical_all_reduce_s(size_bytes, n, hw, ranks_per_node))
    return best


def all_gather_s(size_bytes: float, n: int, hw: Hardware, ranks_per_node: int) -> float:
    """All-gather (or reduce-scatter) of a buffer of full size `size_bytes`."""
    return ring_all_gather_s(size_bytes, n, group_link(hw, n, ranks_per_node))


def p2p_s(size_bytes: float, hw: Hardware, inter_node: bool) -> float:
    """One point-to-point send between pipeline stages (one NIC, or NVLink inside a node)."""
    if size_bytes <= 0:
        return 0.0
    if inter_node:
        bw = hw.network.node_gb_s * 1e9 / hw.node.gpus_per_node
        return hw.network.latency_us * 1e-6 + size_bytes / bw
    node = hw.node
    return node.intra_node_latency_us * 1e-6 + size_bytes / (node.intra_node_gb_s * 1e9 * node.intra_node_efficiency)


def parameter_server_s(grad_bytes: float, workers: int, servers: int, hw: Hardware) -> float:
    """Push gradients to and pull weights from `servers` sharded parameter servers (Li et al. 2014).

    Every worker sends S and receives S; each server link carries workers·S/servers each way, so the time
    is max(S/β_worker, workers·S/(servers·β_server)) per direction, twice. With one server this grows
    linearly in the worker count, where a ring all-reduce stays ~2S/β: the reason all-reduce won.
    """
    if workers <= 1 or grad_bytes <= 0:
        return 0.0
    beta = hw.network.node_gb_s * 1e9 / hw.node.gpus_per_node
    per_direction = max(grad_bytes / beta, workers * grad_bytes / (max(1, servers) * beta))
    return 2 * (per_direction + hw.network.latency_us * 1e-6)
