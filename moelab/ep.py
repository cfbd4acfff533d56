"""Expert parallelism: the EP layout, its collectives and the all-to-all token dispatcher
(GShard / DeepSpeed-MoE style, ``all_to_all_single``). With
``moelab.parallel`` (the world that uses it), the only moelab modules importing
torch.distributed.

Legend: T tokens, D model dim, E experts, El = E/P experts per EP rank, S kept token-slots of
this rank (sorted by expert), R rows received for this rank's experts, W world size, P EP size.

Layout (``Layout``): W ranks; EP groups of P consecutive ranks ([0, P), [P, 2P), ...); rank r
holds experts [(r % P)·El, (r % P + 1)·El). The *expert-DP group* of r is the ranks holding
the same experts {r % P, r % P + P, ...}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moelab import dispatch
from moelab.errors import RunError
from moelab.host import to_cpu


class DistributedError(RunError):
    """A collective failed or timed out; the message names the rank and the operation."""


# ----------------------------------------------------------------------------- layout (pure)


@dataclass(frozen=True)
class Layout:
    """Where rank ``rank`` of ``world_size`` sits in the EP × DP grid (EP size ``ep``)."""

    rank: int
    world_size: int
    ep: int

    @property
    def ep_index(self) -> int:
        """Position inside the EP group = which expert shard this rank holds."""
        return self.rank % self.ep

    @property
    def ep_ranks(self) -> list[int]:
        start = self.rank - self.ep_index
        return list(range(start, start + self.ep))

    @property
    def expert_dp_ranks(self) -> list[int]:
        return list(range(self.ep_index, self.world_size, self.ep))

    def expert_slice(self, num_experts: int) -> slice:
        """The experts of this rank: a contiguous slice of [0, E)."""
        n = num_experts // self.ep
        return slice(self.ep_index * n, (self.ep_index + 1) * n)


@dataclass(frozen=True)
class Exchange:
    """Split sizes and orderings of one all-to-all token exchange (see ``exchange_plan``)."""

    send: list[int]  # (P,) rows sent to each rank of the EP group
    recv: list[int]  # (P,) rows received from each rank of the EP group
    order_R: Tensor  # received rows (grouped by source) -> grouped by local expert
    inverse_R: Tensor  # the inverse permutation
    local_splits: list[int]  # (El,) rows per local expert after regrouping


def exchange_plan(kept_WE: Tensor, layout: Layout) -> Exchange:
    """Split sizes of the token exchange from every rank's kept slots per expert (W, E).

    Slots are sorted by global expert, so the rows for EP rank j are one contiguous block.
    Received rows arrive grouped by source rank, each block sorted by local expert; ``order_R``
    regroups them by local expert so each expert runs on one contiguous segment.
    """
    P = layout.ep
    E = kept_WE.shape[1]
    El = E // P
    mine = layout.expert_slice(E)
    # The all-to-all needs its split sizes on the host: one read per layer and forward under
    # EP (moelab.host), the only one of the expert-parallel path.
    kept_WE = to_cpu(kept_WE, "all-to-all split sizes")
    send = kept_WE[layout.rank].view(P, El).sum(1)  # (P,)
    from_src_PE = kept_WE[layout.ep_ranks][:, mine]  # (P, El) rows from each source, per expert
    labels_R = torch.arange(El).repeat(P).repeat_interleave(from_src_PE.reshape(-1))
    order_R = torch.sort(labels_R, stable=True).indices
    return Exchange(
        send=send.tolist(),
        recv=from_src_PE.sum(1).tolist(),
        order_R=order_R,
        inverse_R=torch.argsort(order_R),
        local_splits=from_src_PE.sum(0).tolist(),
    )


def rank_loads(kept_WE: Tensor, ep: int) -> Tensor:
    """(W,) token-slots processed by each rank's experts, from every rank's kept counts (W, E)."""
    W, E = kept_WE.shape
    return kept_WE.view(W // ep, ep, ep, E // ep).sum((1, 3)).reshape(W)


# ----------------------------------------------------------------------------- collectives


class Comm:
    """The collectives of one rank; failures name the rank, the operation and the timeout."""

    def __init__(self, layout: Layout, timeout_s: float, *, groups: bool = True) -> None:
        self.layout, self.timeout_s = layout, timeout_s
        self.bytes_sent = 0  # all-to-all payload sent to other ranks (benchmarks)
        self.ep_group = self.expert_dp_group = None
        if groups:
            self._make_groups()

    def _make_groups(self) -> None:
        W, P, t = self.layout.world_size, self.layout.ep, timedelta(seconds=self.timeout_s)
        # Every rank must create every group, in the same order (torch.distributed's rule).
        ep_groups = [self._new_group(list(range(g * P, (g + 1) * P)), t) for g in range(W // P)]
        edp_groups = [self._new_group(list(range(j, W, P)), t) for j in range(P)]
        self.ep_group = ep_groups[self.layout.rank // P]
        self.expert_dp_group = edp_groups[self.layout.ep_index]

    def _new_group(self, ranks: list[int], timeout: timedelta):
        if len(ranks) == self.layout.world_size:
            return dist.group.WORLD
        return self.guard("new_group", lambda: dist.new_group(ranks, timeout=timeout))

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run a collective, turning backend errors and timeouts into ``DistributedError``."""
        try:
            return fn()
        except DistributedError:
            raise
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise DistributedError(
                f"rank {self.layout.rank} of {self.layout.world_size}: {what} failed "
                f"(parallel.timeout_s={self.timeout_s:g}); a peer rank probably died, hung or "
                f"diverged: {first}"
            ) from exc

    @staticmethod
    def size(group) -> int:
        return dist.get_world_size(group)

    def all_reduce(self, t: Tensor, what: str, group=None) -> Tensor:
        """Sum over ``group`` (default: all ranks), in place; returns ``t``."""
        if group is None or self.size(group) > 1:
            self.guard(what, lambda: dist.all_reduce(t, group=group))
        return t

    def all_gather_cat(self, t: Tensor, what: str, group=None) -> Tensor:
        """Concatenate ``t`` of every rank of ``group`` along dim 0, in rank order."""
        n = self.size(group)
        if n == 1:
            return t.clone()
        parts = [torch.empty_like(t) for _ in range(n)]
        self.guard(what, lambda: dist.all_gather(parts, t.contiguous(), group=group))
        return torch.cat(parts, 0)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        out: list[Any] = [None] * self.layout.world_size
        self.guard(what, lambda: dist.all_gather_object(out, obj))
        return out

    def broadcast(self, t: Tensor, what: str) -> None:
        self.guard(what, lambda: dist.broadcast(t, src=0))

    def barrier(self) -> None:
        self.guard("barrier", lambda: dist.barrier())

    def all_to_all(self, x_ND: Tensor, recv: list[int], send: list[int], what: str) -> Tensor:
        """Rows x[send-block j] go to EP rank j; returns the rows received, by source rank."""
        if self.size(self.ep_group) == 1:
            return x_ND.clone()
        out = x_ND.new_empty((sum(recv), *x_ND.shape[1:]))
        self.guard(
            what,
            lambda: dist.all_to_all_single(out, x_ND.contiguous(), recv, send, group=self.ep_group),
        )
        j = self.layout.ep_index
        self.bytes_sent += (sum(send) - send[j]) * x_ND[0:1].numel() * x_ND.element_size()
        return out


class _AllToAll(torch.autograd.Function):
    """All-to-all whose backward is the reverse all-to-all (gradients go back to the senders)."""

    @staticmethod
    def forward(ctx, x_ND: Tensor, recv: list[int], send: list[int], comm: Comm, what: str):
        ctx.recv, ctx.send, ctx.comm, ctx.what = recv, send, comm, what
        return comm.all_to_all(x_ND, recv, send, what)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        grad = ctx.comm.all_to_all(grad_ND, ctx.send, ctx.recv, f"{ctx.what} (backward)")
        return grad, None, None, None, None


# ----------------------------------------------------------------------------- EP dispatcher


class AllToAllDispatcher:
    """The token dispatcher of an MoE layer whose experts are sharded over an EP group
    (GShard / DeepSpeed-MoE style all-to-all; ``moelab.dispatch.Dispatcher``).

    Installed on each MoE layer by ``DistributedWorld.prepare`` with the layer's expert shard,
    so the model code is the same with or without parallelism. Routing and capacity are local
    (router parameters are replicated; capacity is per source rank, as in Megatron's local
    dropping). ``load`` all-gathers every rank's routed counts (W, E), once per layer and
    forward: their sum is the computation batch's counts (global-scope aux, loss-free bias),
    the rows give the per-rank drops. ``combine`` all-gathers the kept counts to size the
    exchange and adds ``rank_load`` (W,) and ``dropped_rank`` (W,) to the stats.
    """

    def __init__(self, comm: Comm, num_experts: int) -> None:
        self.comm, self.num_experts = comm, num_experts

    def load(self, routed_E: Tensor, prices_E: Tensor | None = None) -> dispatch.Load:
        routed_WE = self.comm.all_gather_cat(routed_E.unsqueeze(0), "all_gather of expert counts")
        if prices_E is not None:  # Quantile Balancing: the mean estimate over the data ranks
            what = "all_gather of expert price estimates"
            prices_E = self.comm.all_gather_cat(prices_E.unsqueeze(0), what).mean(0)
        return dispatch.Load(routed_WE.sum(0), routed_WE, prices_E)

    def combine(
        self, x_TD: Tensor, p: dispatch.Plan, experts: nn.Module, load: dispatch.Load
    ) -> dispatch.Combined:
        """Permute -> all-to-all to the expert owners -> local experts -> all-to-all back ->
        unpermute (weighted)."""
        comm = self.comm
        x_SD = dispatch.permute(x_TD, p)  # (S, D) sorted by global expert
        kept_WE = comm.all_gather_cat(p.kept_E.unsqueeze(0), "all_gather of kept expert counts")
        ex = exchange_plan(kept_WE, comm.layout)
        x_RD = _AllToAll.apply(x_SD, ex.recv, ex.send, comm, "all_to_all (dispatch)")
        x_RD = x_RD.index_select(0, ex.order_R.to(x_RD.device))  # grouped by local expert
        y_RD = experts(x_RD, ex.local_splits)
        y_RD = _keep_in_graph(y_RD, x_RD, experts)
        y_RD = y_RD.index_select(0, ex.inverse_R.to(y_RD.device))  # back to source order
        y_SD = _AllToAll.apply(y_RD, ex.send, ex.recv, comm, "all_to_all (combine)")
        stats = {
            "rank_load": rank_loads(kept_WE, comm.layout.ep),
            "dropped_rank": (load.routed_WE - kept_WE).sum(1),
        }
        y_TD = dispatch.unpermute(y_SD, p, x_TD.shape[0])
        return dispatch.Combined(y_TD, load.batch_E, kept_WE.sum(0), stats)


def _keep_in_graph(y_RD: Tensor, x_RD: Tensor, experts: nn.Module) -> Tensor:
    """Keep the combine all-to-all in the autograd graph when no row reached this rank's
    experts: every rank must run the backward all-to-all, or its peers wait forever."""
    if y_RD.requires_grad or not torch.is_grad_enabled():
        return y_RD
    tied = [t.sum() for t in (x_RD, *experts.parameters()) if t.requires_grad]
    return y_RD + sum(tied) * 0 if tied else y_RD
