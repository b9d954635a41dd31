"""The test harness's forked CLI (tests/vlrl_process.py) behaves as a fresh `python -m vlrl_cli` does: the same
exit code and output, the caller's folder and PYTHONPATH, and a timeout that ends the call and everything it
started."""

import os
import subprocess
import time

import psutil
import pytest
from vlrl_process import Zygote, ZygoteGone, _zygote, run_vlrl


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


def wait_for(path, seconds=60):
    end = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.1)
    return int(path.read_text())


def test_a_zygote_that_dies_fails_its_call_with_a_reason_and_refuses_new_ones(tmp_path, tiny_model, colors_data):
    """A call under way when its zygote dies ends in an error that says so (not a hang or a timeout), with
    the call's child killed; calls after that cannot go to the dead zygote (run_vlrl runs them fresh)."""
    (tmp_path / "sleeper.py").write_text("import os, time\n"
                                         f"open({str(tmp_path / 'child.pid')!r}, 'w').write(str(os.getpid()))\n"
                                         "time.sleep(600)\n")
    (tmp_path / "r.yaml").write_text(recipe(tiny_model, colors_data, "sleeper"))
    z = Zygote()
    assert z.ready
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    import threading

    result = {}

    def call():
        try:
            z.run(["vlrl"], ["train", "r.yaml"], env, str(tmp_path), 300)
        except BaseException as e:  # noqa: BLE001 - the test inspects what was raised
            result["error"] = e

    t = threading.Thread(target=call)
    start = time.monotonic()
    t.start()
    child = wait_for(tmp_path / "child.pid")
    z.proc.kill()
    t.join(60)
    assert not t.is_alive() and time.monotonic() - start < 120
    assert isinstance(result.get("error"), RuntimeError) and "zygote exited" in str(result["error"]), result
    for _ in range(50):
        if not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the call's child {child} outlived its zygote")
    assert not z.can_run(env)
    with pytest.raises(ZygoteGone):
        z.run(["vlrl"], ["--help"], env, str(tmp_path), 60)


def test_a_call_whose_pythonpath_holds_a_start_up_hook_gets_a_fresh_interpreter(tmp_path):
    """sitecustomize runs at interpreter start-up only: forked, the hook would silently not run."""
    (tmp_path / "sitecustomize.py").write_text("import sys; print('hook ran', file=sys.stderr)\n")
    r = run_vlrl("--help", env_extra={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0 and "hook ran" in r.stderr, r.stderr[-500:]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(tmp_path)}
    assert "start-up hook" in _zygote().why_not(env)


def test_a_calls_pythonpath_goes_before_the_inherited_one_instead_of_replacing_it(tmp_path, tiny_model, colors_data,
                                                                                 monkeypatch):
    """The floor run puts transformers 5.17 on PYTHONPATH; a test adding its own folder must keep it there."""
    for lib, text in (("inherited", "raise RuntimeError('found on the inherited path')\n"), ("added", "import base_env\n")):
        (tmp_path / lib).mkdir()
        (tmp_path / lib / ("base_env.py" if lib == "inherited" else "myenvs.py")).write_text(text)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path / "inherited"))
    (tmp_path / "r.yaml").write_text(recipe(tiny_model, colors_data, "myenvs"))
    r = run_vlrl("train", "r.yaml", cwd=tmp_path, env_extra={"PYTHONPATH": str(tmp_path / "added")})
    assert "found on the inherited path" in r.stderr, r.stderr[-800:]
