"""Multi-rank launches go through DeepSpeed's own launcher (no home-made process orchestration)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def launcher_command(recipe: Path, overrides: list[str], resume: bool, gpus: int = 1, nprocs: int = 1,
                     hostfile: Path | None = None) -> list[str]:
    exe = shutil.which("deepspeed")
    cmd = [exe] if exe else [sys.executable, "-m", "deepspeed.launcher.runner"]
    if hostfile:
        cmd += ["--hostfile", str(hostfile)]
    else:
        cmd += ["--num_gpus", str(max(gpus, nprocs))]
    cmd += ["--no_local_rank", "--module", "vlrl_cli", "train", str(recipe)]  # ranks read LOCAL_RANK
    for o in overrides:
        cmd += ["--set", o]
    if resume:
        cmd.append("--resume")
    return cmd


def relaunch(recipe: Path, overrides: list[str], resume: bool, **kw) -> int:
    return subprocess.call(launcher_command(recipe, overrides, resume, **kw))
