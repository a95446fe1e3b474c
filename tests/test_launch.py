"""A user's script under ``torchrun`` exits 0 every time, with no clean-up by hand.

The script is the README's usage (a parallelized model, a step, ``all_reduce_gradients``, then
``destroy_process_group`` with the model and its output still alive at module level). A ``ProcessGroup`` that
library objects keep alive past ``destroy_process_group`` keeps its gloo worker threads running into
interpreter shutdown; a worker still releasing its last finished ``Work`` must take the GIL to free the
Work's tensors, and a thread that asks for the GIL while Python finalizes is ended inside a noexcept
destructor: ``terminate called without an active exception``, SIGABRT, exit code 1 from torchrun, in about
a third of the runs. The symptom is intermittent, so a second test checks its cause deterministically: whether
``destroy_process_group`` released the group (the condition that makes the exit safe).
"""

import os
import subprocess
import sys
import textwrap

LAUNCHES = 3

SCRIPT = textwrap.dedent(
    """
    import sys
    import weakref

    import torch
    import torch.distributed as dist

    import mamba_cp

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    cp_size, cp_rank = dist.get_world_size(), dist.get_rank()
    log = open(f"{sys.argv[1]}/rank{cp_rank}.txt", "w")  # one file per rank: no interleaving
    torch.manual_seed(0)
    models = {}
    for strategy in ("hidden", "state_passing"):
        model = mamba_cp.Mamba2Mixer(hidden_size=16, num_heads=4, head_dim=4, n_groups=2, state_size=8, chunk_size=8)
        mamba_cp.parallelize(model, dist.group.WORLD, strategy=strategy)
        x = torch.randn(2, 32, 16)
        out = model(mamba_cp.shard(x, cp_size, cp_rank, seq_dim=1))
        out.sum().backward()
        mamba_cp.all_reduce_gradients(model, dist.group.WORLD)
        models[strategy] = (model, out)  # kept, as a script's globals are, until the interpreter exits
        print(f"{strategy}: output {tuple(out.shape)}", file=log)
    if sys.argv[2] == "exit":  # as a user's script ends: nothing after destroy_process_group
        log.close()
        dist.destroy_process_group()
    else:  # say whether destroy_process_group released the group (the output releases the GIL: no abort then)
        group = weakref.ref(dist.group.WORLD)
        dist.destroy_process_group()
        print(f"group released by destroy_process_group: {group() is None}", file=log)
        log.close()
    """
)

OUTPUT = ["hidden: output (2, 16, 16)", "state_passing: output (2, 16, 16)"]


def _launch(tmp_path, name: str, mode: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    """Run the script under torchrun on 2 CPU ranks; returns the run and each rank's output lines."""
    script, logs = tmp_path / "train.py", tmp_path / name
    script.write_text(SCRIPT)
    logs.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([*command, str(logs), mode], capture_output=True, text=True, env=env, timeout=300)
    lines = [
        (logs / f"rank{r}.txt").read_text().splitlines() if (logs / f"rank{r}.txt").exists() else [] for r in (0, 1)
    ]
    return run, lines


def test_torchrun_script_exits_zero_every_time(tmp_path):
    """The symptom: before the fix about a third of these launches ended in SIGABRT (torchrun exit code 1)."""
    for launch in range(LAUNCHES):
        run, lines = _launch(tmp_path, f"launch{launch}", "exit")
        where = f"launch {launch + 1} of {LAUNCHES}: exit code {run.returncode}\nstderr:\n{run.stderr[-3000:]}"
        assert lines == [OUTPUT, OUTPUT], where
        assert "terminate called" not in run.stderr, where
        assert run.returncode == 0, where


def test_destroy_process_group_releases_the_group(tmp_path):
    """The cause, deterministically: with the model and its autograd graph still alive, nothing of ours may keep
    the process group (and so its worker threads) alive past destroy_process_group."""
    run, lines = _launch(tmp_path, "check", "check")
    where = f"exit code {run.returncode}\nstderr:\n{run.stderr[-3000:]}"
    assert lines == [[*OUTPUT, "group released by destroy_process_group: True"]] * 2, where
    assert run.returncode == 0, where
