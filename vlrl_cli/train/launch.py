"""Starting `vlrl train`: in this process (the algorithm the recipe names, with a progress bar and the run's
curves at the end) or, for several ranks, through DeepSpeed's own launcher (no home-made process orchestration)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .recipe import Recipe


def launcher_command(recipe: Path, overrides: list[str], resume: bool, gpus: int = 1, nprocs: int = 1,
                     hostfile: Path | None = None) -> list[str]:
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", str(hostfile)]  # the nodes agree on DeepSpeed's port (or the user's MASTER_PORT)
    else:
        # one machine: a free port, so two runs at once do not both take DeepSpeed's default (29500) and
        # the second fail with "address already in use"; a MASTER_PORT the user set wins
        cmd += ["--num_gpus", str(max(gpus, nprocs)), "--master_port", os.environ.get("MASTER_PORT") or str(free_port())]
    cmd += ["--no_local_rank", "--module", "vlrl_cli", "train", str(recipe)]  # ranks read LOCAL_RANK
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    return cmd


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def relaunch(recipe: Path, overrides: list[str], resume: bool, **kw) -> int:
    """Runs the launcher and its ranks in a process group of their own and waits for them. Ctrl-C or a
    termination of this process stops the whole group before it returns: this process holds the run
    directory's lock, so no rank may outlive it and write into a run another process has since claimed."""
    proc = subprocess.Popen(launcher_command(recipe, overrides, resume, **kw), start_new_session=True)

    def terminated(signum, frame):
        raise KeyboardInterrupt

    before = signal.signal(signal.SIGTERM, terminated)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        stop_group(proc)
        raise
    finally:
        signal.signal(signal.SIGTERM, before)


def stop_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to every process of proc's group (the launcher and each rank), SIGKILL to what is left after
    grace_s; returns once none is left."""
    def alive() -> bool:
        try:
            os.killpg(proc.pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:  # a zombie leader whose group is otherwise gone
            return False

    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if not alive():
            break
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            proc.poll()  # reap the launcher, so its group can empty
            if not alive():
                return
            time.sleep(0.1)
    proc.poll()


KEY_METRICS = ("reward_mean", "accuracy", "val_accuracy", "loss", "drift_abs_mean", "grad_norm")


def run_training(recipe: Recipe, resume: bool = False, console=None) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .grpo import train_grpo
    from .sft import train_sft

    fn = train_sft if recipe.algorithm.name == "sft" else train_grpo
    last: dict = {}
    live = console is not None and console.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, disable=not live) as bar:
        task = bar.add_task(f"{recipe.algorithm.name} {recipe.run.name}", total=recipe.trainer.steps, info="")

        def on_step(m: dict) -> None:
            last.clear()
            last.update(m)
            info = "  ".join(f"{k}={m[k]:.3g}" for k in KEY_METRICS if isinstance(m.get(k), (int, float)))
            bar.update(task, completed=m["step"], info=info)
            if console is not None and not live:
                console.print(f"step {m['step']}/{recipe.trainer.steps}  {info}", highlight=False, soft_wrap=True)

        try:
            run_dir = fn(recipe, resume=resume, on_step=on_step)
        finally:  # also when interrupted or failed: the curves of the steps that ran
            curves = plot_curves(recipe.run_dir)
    if curves is not None and console is not None:
        console.print(f"curves: {curves}", highlight=False, soft_wrap=True)
    return {"run_dir": str(run_dir), **last}


def plot_curves(run_dir):
    """Rank 0 writes curves.png; a plotting problem is reported, never raised over the run's own outcome."""
    import os
    import sys

    if os.environ.get("RANK", "0") != "0":
        return None
    from .curves import write_curves

    try:
        return write_curves(run_dir)
    except Exception as e:  # noqa: BLE001
        print(f"warning: curves.png not written: {type(e).__name__}: {e}", file=sys.stderr)
        return None
