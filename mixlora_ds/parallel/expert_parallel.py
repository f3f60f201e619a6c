"""Expert parallelism: the ranks of an expert-parallel (EP) group share out the MixLoRA experts and
send each token, by all-to-all, to the ranks that own its chosen experts.

Layout (the one DeepSpeed's ``utils/groups.py`` and Megatron use): with world size W and EP size P,
EP groups are runs of P consecutive ranks (inside a node first); EP rank i owns experts
``i*E/P .. (i+1)*E/P - 1`` of every layer. The ranks at the same place in each EP group own the same
experts and form an expert-data-parallel (EDP) group of W/P ranks; expert gradients are reduced
there (``expert_optimizer.py``). Router, attention LoRA and the frozen base stay as without EP.

Dispatch (``AllToAllDispatcher``), per MoE layer, dropless:
1. each token goes once to each rank that owns one of its chosen experts (not once per expert),
   with its slots' local expert ids and weights (weight 0 for slots owned elsewhere);
2. per-destination row counts are exchanged (an equal-split all-to-all), then read on the host
   once: the one synchronisation a variable-size exchange needs;
3. rows and routes move with variable-size ``all_to_all_single`` (differentiable both ways);
4. the owner runs its expert compute: the shared frozen FFN once per received token, its experts'
   LoRA deltas and the W2 fold on the weight-mixed intermediate, one hidden-size row back;
5. a second all-to-all brings the rows home, where each token sums what its owners returned.
Every rank issues the same collectives in the same order whatever the routing, zero rows included.

Shapes: T tokens, K slots per token, P ranks of the EP group, V visits (token, destination rank),
N rows received, D model dim.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as tdist

from mixlora_ds.model.dispatch import RoutedTokens
from mixlora_ds.model.router import Routing


# ------------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class ExpertParallelLayout:
    world_size: int
    ep_size: int
    rank: int

    def __post_init__(self):
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(f"world size {self.world_size} is not a multiple of the expert-parallel size "
                             f"{self.ep_size}")

    @property
    def ep_rank(self) -> int:
        return self.rank % self.ep_size

    def ep_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.ep_size)) for s in range(0, self.world_size, self.ep_size)]

    def edp_groups(self) -> list[list[int]]:
        return [list(range(i, self.world_size, self.ep_size)) for i in range(self.ep_size)]

    def experts_per_rank(self, num_experts: int) -> int:
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts cannot be shared out evenly over {self.ep_size} ranks")
        return num_experts // self.ep_size

    def first_expert(self, num_experts: int, ep_rank: int | None = None) -> int:
        return (self.ep_rank if ep_rank is None else ep_rank) * self.experts_per_rank(num_experts)


# ------------------------------------------------------------------------------------------ visits
@dataclass
class Visits:
    """Where each token goes: one visit per (token, destination rank) that owns one of its experts,
    sorted by destination rank, then token."""

    token_V: torch.Tensor
    rank_V: torch.Tensor
    send_counts_P: torch.Tensor
    expert_VK: torch.Tensor
    """Local expert id at the destination; 0 where the slot is served elsewhere (weight 0 there)."""
    weight_VK: torch.Tensor
    """The slot's weight where the destination serves it, else 0 (keeps autograd to the router)."""


def plan_visits(expert_TK: torch.Tensor, weight_TK: torch.Tensor, ep_size: int, experts_per_rank: int) -> Visits:
    """The visits of every token, on the device, with no host synchronisation. A slot of weight 0
    (top-p's unkept experts, switch tokens over capacity) sends nothing."""
    T = expert_TK.shape[0]
    active_TK = weight_TK.detach() != 0
    dest_TK = expert_TK // experts_per_rank
    hits_TP = torch.zeros(T, ep_size, dtype=torch.int32, device=expert_TK.device)
    hits_TP.scatter_add_(1, dest_TK, active_TK.to(torch.int32))
    visits_PT = (hits_TP > 0).t()
    rank_V, token_V = visits_PT.nonzero(as_tuple=True)  # row-major: by rank, then token
    mine_VK = (dest_TK[token_V] == rank_V.unsqueeze(1)) & active_TK[token_V]
    expert_VK = torch.where(mine_VK, expert_TK[token_V] - rank_V.unsqueeze(1) * experts_per_rank, 0)
    weight_VK = torch.where(mine_VK, weight_TK[token_V], torch.zeros((), dtype=weight_TK.dtype,
                                                                      device=weight_TK.device))
    return Visits(token_V, rank_V, visits_PT.sum(dim=1), expert_VK, weight_VK)


def sum_visits(y_VD: torch.Tensor, token_V: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Rows returned for each visit -> per token, the sum over its visits (0 for unrouted tokens)."""
    return y_VD.new_zeros(num_tokens, y_VD.shape[-1]).index_add(0, token_V, y_VD)


# ---------------------------------------------------------------------------------- the exchange
@dataclass
class DispatchStats:
    """What the exchanges of a model did since the last ``reset``: rows received per layer (forward
    only, recomputed forwards not counted again), bytes sent in every exchange (forward, recomputed
    forward and backward alike), and seconds spent in them (host time; on GPUs CUDA events, read by
    ``exchange_seconds``)."""

    received: list[int] = field(default_factory=list)
    sent_bytes: int = 0
    """Bytes this rank sent to other ranks (rows it keeps for itself cross no link)."""
    seconds: float = 0.0
    events: list = field(default_factory=list)

    def reset(self) -> None:
        self.received = [0] * len(self.received)
        self.sent_bytes = 0
        self.seconds = 0.0
        self.events.clear()

    def exchange_seconds(self) -> float:
        if self.events:
            torch.cuda.synchronize()
            self.seconds += sum(start.elapsed_time(end) for start, end in self.events) / 1000.0
            self.events.clear()
        return self.seconds


class _AllToAllV(torch.autograd.Function):
    """``all_to_all_single`` with per-rank row counts; its backward is the exchange reversed.
    (DeepSpeed's ``_AllToAll`` takes equal splits only.)"""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group, stats: DispatchStats) -> torch.Tensor:
        ctx.send, ctx.recv, ctx.group, ctx.stats = send, recv, group, stats
        return _exchange(x, send, recv, group, stats)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.recv, ctx.send, ctx.group, ctx.stats), None, None, None, None


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group, stats: DispatchStats) -> torch.Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    with _Timer(stats):
        tdist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    remote_rows = sum(send) - send[tdist.get_rank(group)]
    row_elements = x.shape[1:].numel()
    stats.sent_bytes += remote_rows * row_elements * x.element_size()
    return out


def all_to_all_v(x: torch.Tensor, send: list[int], recv: list[int], group, stats: DispatchStats) -> torch.Tensor:
    return _AllToAllV.apply(x, send, recv, group, stats)


class _Timer:
    def __init__(self, stats: DispatchStats):
        self.stats = stats

    def __enter__(self):
        self.start = None
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.start = torch.cuda.Event(enable_timing=True)
            self.start.record()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc):
        if self.start is not None:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.stats.events.append((self.start, end))
        else:
            self.stats.seconds += time.perf_counter() - self.t0


# -------------------------------------------------------------------------------- the dispatcher
@dataclass
class _Handle:
    token_V: torch.Tensor
    send: list[int]
    recv: list[int]
    num_tokens: int


class AllToAllDispatcher:
    """Dispatcher for one MoE layer under expert parallelism (see the module docstring)."""

    def __init__(self, group, ep_size: int, experts_per_rank: int, layer: int, stats: DispatchStats):
        self.group = group
        self.ep_size = ep_size
        self.experts_per_rank = experts_per_rank
        self.layer = layer
        self.stats = stats

    @torch.compiler.disable  # variable shapes and collectives: kept out of compiled graphs
    def dispatch(self, x_TD: torch.Tensor, routing: Routing) -> tuple[RoutedTokens, _Handle]:
        K = routing.expert_TK.shape[1]
        v = plan_visits(routing.expert_TK, routing.weight_TK, self.ep_size, self.experts_per_rank)
        ones = [1] * self.ep_size
        recv_counts_P = _exchange(v.send_counts_P, ones, ones, self.group, self.stats)
        send, recv = torch.stack([v.send_counts_P, recv_counts_P]).tolist()  # the one host sync
        x_ND = all_to_all_v(x_TD[v.token_V], send, recv, self.group, self.stats)
        # Weights (differentiable: the router learns through them) and ids (exact in fp32) together.
        route_VM = torch.cat([v.weight_VK.float(), v.expert_VK.float()], dim=1)
        route_NM = all_to_all_v(route_VM, send, recv, self.group, self.stats)
        if torch._C._current_graph_task_id() == -1:  # not a forward recomputed in backward
            self.stats.received[self.layer] += sum(recv)
        tokens = RoutedTokens(x_ND, route_NM[:, K:].long(), route_NM[:, :K])
        return tokens, _Handle(v.token_V, send, recv, x_TD.shape[0])

    @torch.compiler.disable
    def combine(self, y_ND: torch.Tensor, handle: _Handle) -> torch.Tensor:
        y_VD = all_to_all_v(y_ND, handle.recv, handle.send, self.group, self.stats)
        return sum_visits(y_VD, handle.token_V, handle.num_tokens)


# ------------------------------------------------------------------------------- groups + model
class ExpertParallel:
    """This rank's EP and EDP groups, and expert parallelism installed on a model."""

    def __init__(self, layout: ExpertParallelLayout, ep_group, edp_group):
        self.layout = layout
        self.ep_group = ep_group
        self.edp_group = edp_group
        self.stats = DispatchStats()
        self.num_experts = 0

    @classmethod
    def create(cls, ep_size: int, timeout_minutes: float | None = None) -> ExpertParallel:
        """Collective over all ranks. The groups are the project's own (same layout as DeepSpeed's
        ``groups._create_expert_and_data_parallel``) so they carry the run's collective timeout: a
        dead rank then ends the step with an error instead of a hang."""
        from mixlora_ds.dist import collective_timeout

        layout = ExpertParallelLayout(tdist.get_world_size(), ep_size, tdist.get_rank())
        timeout = collective_timeout(timeout_minutes)
        mine = {}
        for kind, groups in (("ep", layout.ep_groups()), ("edp", layout.edp_groups())):
            for ranks in groups:  # every rank creates every group, in the same order
                group = tdist.new_group(ranks, timeout=timeout)
                if layout.rank in ranks:
                    mine[kind] = group
        return cls(layout, mine["ep"], mine["edp"])

    def shard(self, model: torch.nn.Module) -> None:
        """Keep this rank's experts in every MixLoRA block and install the all-to-all dispatchers."""
        from mixlora_ds.model.moe import moe_blocks

        blocks = moe_blocks(model)
        if not blocks:
            raise ValueError("expert parallelism needs a MixLoRA adapter (the model has no MixLoRA blocks)")
        self.num_experts = blocks[0].config.num_experts
        per_rank = self.layout.experts_per_rank(self.num_experts)
        self.stats.received = [0] * len(blocks)
        for layer, block in enumerate(blocks):
            block.keep_experts(self.layout.first_expert(self.num_experts), per_rank)
            block.dispatcher = AllToAllDispatcher(self.ep_group, self.layout.ep_size, per_rank, layer, self.stats)

    @property
    def experts_per_rank(self) -> int:
        return self.layout.experts_per_rank(self.num_experts)

    def gather_experts(self, local: torch.Tensor) -> torch.Tensor:
        """Collective over the EP group: every expert of a stacked expert tensor, in expert order."""
        parts = [torch.empty_like(local) for _ in range(self.layout.ep_size)]
        tdist.all_gather(parts, local.contiguous(), group=self.ep_group)
        return torch.cat(parts, dim=0)
