"""Run a function on ``world_size`` real processes joined in a gloo process group.

Processes are forked (cheap: torch is already imported) and meet through a ``FileStore`` in a fresh
temporary directory, so no port is picked by hand and parallel runs never collide. Each rank's return
value (or its exception and traceback) comes back through a pipe; a rank that hangs past ``timeout`` is
killed and reported.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import tempfile
import traceback
from collections.abc import Callable
from typing import Any


class RankFailure(RuntimeError):
    """One or more ranks raised or hung; the message holds every failing rank's traceback."""


def _worker(rank: int, world_size: int, store_path: str, fn: Callable, args: tuple, conn, timeout_s: float) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # forked children share the parent's cores
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo", store=store, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s)
        )
        # gloo's mesh set-up can still be completing on a peer when this rank returns: a rank that raised at once
        # would then close its sockets under that peer's handshake ("connectFullMesh failed"). Meet first.
        dist.barrier()
        try:
            result = ("ok", fn(rank, world_size, *args))
        finally:
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}", _picklable(err))
    try:
        conn.send(result)
    except Exception as err:  # noqa: BLE001 - e.g. an unpicklable return value
        conn.send(("error", f"could not send rank {rank}'s result: {err}", None))
    conn.close()


def _picklable(err: BaseException) -> BaseException | None:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return None


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` forked processes in one gloo group.

    ``fn`` must be a module-level function. Returns the ranks' return values in rank order. If every rank
    raised the same exception (type and message), it is re-raised (so ``pytest.raises`` works on a
    ``ValueError`` raised by all ranks); otherwise :class:`RankFailure` lists every failure.
    """
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="mamba_cp_store_") as tmp:
        store_path = os.path.join(tmp, "store")
        pipes, procs = [], []
        for rank in range(world_size):
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(
                target=_worker, args=(rank, world_size, store_path, fn, args, child, timeout), daemon=True
            )
            proc.start()
            child.close()
            pipes.append(parent)
            procs.append(proc)
        results: list[Any] = []
        for rank, (conn, proc) in enumerate(zip(pipes, procs, strict=True)):
            if conn.poll(timeout + 10):
                try:
                    results.append(conn.recv())
                except EOFError:
                    results.append(("error", f"rank {rank} died (exit code {proc.exitcode})", None))
            else:
                results.append(("error", f"rank {rank} did not finish within {timeout + 10:.0f} s", None))
        for proc in procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    failures = [(rank, r) for rank, r in enumerate(results) if r[0] != "ok"]
    if failures:
        errors = [r[2] for _, r in failures]
        same = all(e is not None for e in errors) and len({(type(e), str(e)) for e in errors}) == 1
        if len(failures) == world_size and same:
            raise errors[0]
        report = "\n".join(f"--- rank {rank}:\n{r[1]}" for rank, r in failures)
        raise RankFailure(f"{len(failures)} of {world_size} ranks failed:\n{report}")
    return [r[1] for r in results]
