"""The test harness's forked CLI (tests/vlrl_process.py) behaves as a fresh `python -m vlrl_cli` does: the same
exit code and output, the caller's folder and PYTHONPATH, and a timeout that ends the call and everything it
started."""

import os
import subprocess
import time

import psutil
import pytest
from vlrl_process import _zygote, run_vlrl


def test_a_forked_call_gives_what_a_fresh_interpreter_gives(tmp_path):
    (tmp_path / "r.yaml").write_text("model: {path: nowhere}\n")  # no data.train: a one-line error, exit 2
    for args in (["train", "r.yaml"], ["train", "missing.yaml"], ["--help"]):
        forked = run_vlrl(*args, cwd=tmp_path)
        fresh = run_vlrl(*args, cwd=tmp_path, fresh=True)
        assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert forked.returncode == 0 and "check-drift" in forked.stdout
    assert _zygote() is not None and _zygote().can_run({**os.environ, "PYTHONUNBUFFERED": "1"})


def recipe(tiny_model, colors_data, module: str) -> str:
    return (f"model: {{path: {tiny_model}}}\ndata: {{train: {colors_data / 'train.parquet'}}}\n"
            f"envs: {{colors: '{module}:Env'}}\n")


def test_a_forked_call_imports_from_its_folder_and_pythonpath(tmp_path, tiny_model, colors_data):
    """An environment module on PYTHONPATH is found as `python -m` finds it."""
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "myenvs.py").write_text("raise RuntimeError('imported from lib')\n")
    (tmp_path / "r.yaml").write_text(recipe(tiny_model, colors_data, "myenvs"))
    without = run_vlrl("train", "r.yaml", cwd=tmp_path)
    with_path = run_vlrl("train", "r.yaml", cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path / "lib")})
    assert "imported from lib" not in without.stderr and "myenvs" in without.stderr, without.stderr[-800:]
    assert "imported from lib" in with_path.stderr, with_path.stderr[-800:]


def test_a_timeout_ends_the_call_and_what_it_started(tmp_path, tiny_model, colors_data):
    script = tmp_path / "sleeper.py"  # an environment module that starts a child and then waits for ever
    script.write_text("import subprocess, sys, time\n"
                      f"p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
                      f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(p.pid))\n"
                      "time.sleep(600)\n")
    (tmp_path / "r.yaml").write_text(recipe(tiny_model, colors_data, "sleeper"))
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_vlrl("train", "r.yaml", cwd=tmp_path, timeout=20)
    assert time.monotonic() - start < 60
    child = int((tmp_path / "child.pid").read_text())
    for _ in range(50):
        try:
            if psutil.Process(child).status() == psutil.STATUS_ZOMBIE:  # dead, not yet reaped by init
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the call's child {child} outlived its timeout")
    assert run_vlrl("--help").returncode == 0  # the harness still serves the next call
