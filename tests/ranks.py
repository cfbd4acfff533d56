"""Spawned gloo ranks for the tests: ``spawn(W, fn, *args)`` runs ``fn(rank, *args)`` in W CPU
processes (one thread each) that rendezvous on a free local port; ``values`` unpacks what they
returned. Used by test_parallel.py and test_reliability.py."""

from __future__ import annotations

import io
import os
import queue
import socket
import time
import traceback

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, fn, args, q, env) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        **env,
    )
    torch.set_num_threads(1)
    try:
        buf = io.BytesIO()  # plain bytes: tensors shared by fd die with the process
        torch.save(fn(rank, *args), buf)
        q.put((rank, "ok", buf.getvalue()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        q.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))


def spawn(world_size: int, fn, *args, timeout: float = 90, expect: int | None = None, env=None):
    """Run ``fn(rank, *args)`` in ``world_size`` processes; returns {rank: (status, value)}.

    ``expect``: how many ranks must report (fewer when a rank is meant to die or hang).
    Leftover processes are killed.
    """
    ctx = mp.get_context("spawn")
    q, port = ctx.Queue(), _free_port()
    procs = [
        ctx.Process(target=_entry, args=(r, world_size, port, fn, args, q, env or {}))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results, deadline = {}, time.monotonic() + timeout
    try:
        while len(results) < (world_size if expect is None else expect):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = q.get(timeout=left)
            except queue.Empty:
                break
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5 if expect is None else 0.1)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results


def values(results: dict, world_size: int) -> list:
    errors = [v for s, v in results.values() if s != "ok"]
    assert not errors, errors[0]
    assert sorted(results) == list(range(world_size)), f"ranks reported: {sorted(results)}"
    return [torch.load(io.BytesIO(results[r][1])) for r in range(world_size)]
