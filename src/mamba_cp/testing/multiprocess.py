"""Run a function on ``world_size`` real processes joined in a gloo process group.

Processes are forked (cheap: torch is already imported) and meet through a ``FileStore`` in a fresh
temporary directory, so no port is picked by hand and parallel runs never collide. Each rank's return
value (or its exception and traceback) comes back through a pipe. A call succeeds only if every rank sent a
result *and* its process then exited with status 0: a rank that hangs past ``timeout`` is killed and reported,
and so is a rank that sent a correct result and then crashed in its teardown (a signal such as SIGABRT from
``terminate called without an active exception``, or a non-zero exit status).
"""

from __future__ import annotations

import datetime
import gc
import multiprocessing as mp
import os
import pickle
import signal
import sys
import tempfile
import traceback
from collections.abc import Callable
from typing import Any

EXIT_GRACE_S = 10.0
"""How long a rank may take, after sending its result, to exit before it is killed and reported."""


class RankFailure(RuntimeError):
    """One or more ranks raised, hung or exited badly; the message holds every failing rank's report."""


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
            # Free fn's garbage (models, autograd graphs, pending Work) while the group still exists, then tear
            # the group down: this is the teardown whose crash the parent sees in the exit status.
            gc.collect()
            dist.destroy_process_group()
    except BaseException as err:  # noqa: BLE001 - everything goes back to the parent
        result = ("error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}", _picklable(err))
    try:
        conn.send(result)
    except Exception as err:  # noqa: BLE001 - e.g. an unpicklable return value
        conn.send(("error", f"could not send rank {rank}'s result: {err}", None))
    conn.close()
    # Returning lets multiprocessing run its exit handlers, flush stdio and end the process with os._exit(0);
    # anything that still crashes from here on shows up as a non-zero exit status in the parent.
    sys.stdout.flush()
    sys.stderr.flush()


def _picklable(err: BaseException) -> BaseException | None:
    try:
        pickle.dumps(err)
        return err
    except Exception:  # noqa: BLE001
        return None


def describe_exit(exitcode: int | None) -> str:
    """``"exit status 3"``, ``"signal SIGABRT (exit code -6)"`` or ``"no exit (killed after hanging)"``."""
    if exitcode is None:
        return "no exit (still running, killed)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"signal {name} (exit code {exitcode})"
    return f"exit status {exitcode}"


def _summary(result: tuple) -> str:
    """What a rank sent, for a report about its exit: its result (shortened) or its traceback."""
    if result[0] == "ok":
        text = repr(result[1])
        return f"it had sent its result: {text[:500]}{' ...' if len(text) > 500 else ''}"
    return f"it had failed:\n{result[1]}"


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` forked processes in one gloo group.

    ``fn`` must be a module-level function. Returns the ranks' return values in rank order. If every rank
    raised the same exception (type and message) and exited cleanly, it is re-raised (so ``pytest.raises``
    works on a ``ValueError`` raised by all ranks); otherwise :class:`RankFailure` lists every failure: ranks
    that raised, ranks that did not finish within ``timeout`` (+10 s), and ranks whose process did not exit
    with status 0 (signal or status named, with what the rank had sent), even if every result was correct.
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
        results: list[tuple] = []
        for rank, (conn, proc) in enumerate(zip(pipes, procs, strict=True)):
            if conn.poll(timeout + 10):
                try:
                    results.append(conn.recv())
                except EOFError:  # the process ended without sending: its exit status says how
                    proc.join(timeout=EXIT_GRACE_S)
                    results.append(("error", f"rank {rank} died before sending a result", None))
            else:
                results.append(("error", f"rank {rank} did not finish within {timeout + 10:.0f} s", None))
            conn.close()
        exits: list[int | None] = []
        for proc in procs:
            proc.join(timeout=EXIT_GRACE_S)
            if proc.is_alive():
                proc.kill()
                proc.join()
                exits.append(None)
            else:
                exits.append(proc.exitcode)
    bad_exit = [rank for rank, code in enumerate(exits) if code != 0]
    failures = [(rank, r) for rank, r in enumerate(results) if r[0] != "ok" or rank in bad_exit]
    if not failures:
        return [r[1] for r in results]
    errors = [r[2] if r[0] == "error" else None for _, r in failures]
    same = all(e is not None for e in errors) and len({(type(e), str(e)) for e in errors}) == 1
    if len(failures) == world_size and same and not bad_exit:
        raise errors[0]
    lines = []
    for rank, r in failures:
        if rank in bad_exit:
            lines.append(f"--- rank {rank}: its process ended with {describe_exit(exits[rank])}; {_summary(r)}")
        else:
            lines.append(f"--- rank {rank}:\n{r[1]}")
    raise RankFailure(f"{len(failures)} of {world_size} ranks failed:\n" + "\n".join(lines))
