"""`vlrl ...` as its own process, the way a user runs it, without paying Python's imports each time.

Most CLI tests start `python -m vlrl_cli train ...`: a run of a tiny model takes 9 s, of which 7.5 s is
importing torch, transformers and DeepSpeed. So each test process keeps one "zygote": a process that has
imported them once and forks a child per CLI call. The child takes the call's arguments, environment,
working folder and `sys.path` as `python -m vlrl_cli` would, runs the CLI's `__main__`, and exits with its
code; its stdout and stderr come back as `subprocess.run(..., capture_output=True, text=True)` gives them.

A real interpreter is started instead (`fresh=True`, or automatically) when the call changes an
environment variable that the preloaded libraries may read at import (`IMPORT_TIME_ENV`), or when the
zygote cannot start. Tests of interpreter start-up itself (signals, lazy imports) use
`subprocess` directly."""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time

# Variables the preloaded libraries (torch, transformers, the Hub client, DeepSpeed, matplotlib) may read while
# they are imported: a call that changes one of these gets a fresh interpreter. Others only matter once the
# CLI runs, and the child has the call's whole environment by then; the libraries also set some in the test
# process itself (TORCHINDUCTOR_CACHE_DIR, OpenCV's LD_LIBRARY_PATH), which must not stop forking.
IMPORT_TIME_ENV = ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TORCH_", "PYTORCH_", "CUDA_", "NCCL_",
                   "OMP_", "MKL_", "KMP_", "DS_", "DEEPSPEED_", "MPL", "XDG_", "HOME", "PYTHON", "LD_PRELOAD")
FORKABLE_ENV = {"PYTHONUNBUFFERED", "PYTHONPATH", "TORCH_EXTENSIONS_DIR", "PYTORCH_NVML_BASED_CUDA_CHECK"}
PRELOAD = ["numpy", "torch", "transformers", "deepspeed", "matplotlib.pyplot", "pyarrow.parquet", "PIL.Image",
           "vlrl_cli.cli", "vlrl_cli.train.runs", "vlrl_cli.train.grpo", "vlrl_cli.train.sft",
           "vlrl_cli.tools.drift", "vlrl_cli.tools.evaluate", "vlrl_cli.tools.validate"]


def run_vlrl(*args, env_extra: dict | None = None, cwd=None, timeout: float = 600,
             fresh: bool = False) -> subprocess.CompletedProcess:
    """`python -m vlrl_cli *args` with the test's environment plus `env_extra`, stdout and stderr captured.
    A PYTHONPATH in env_extra goes before the test's own: the floor run's transformers sits there, and a call
    that replaced it would quietly test the newest release instead."""
    args = [str(a) for a in args]
    extra = {k: str(v) for k, v in (env_extra or {}).items()}
    if extra.get("PYTHONPATH") and os.environ.get("PYTHONPATH"):
        extra["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("VLRL_RUN_CLAIMED", None)  # a run directory claimed by this test process is not the child's
    cmd = [sys.executable, "-m", "vlrl_cli", *args]
    zygote = None if fresh else _zygote()
    why = "fresh=True" if fresh else "no zygote" if zygote is None else zygote.why_not(env)
    if why is None:
        try:
            _log("fork", args)
            return zygote.run(cmd, args, env, str(cwd or os.getcwd()), timeout)
        except ZygoteGone:  # it died before forking the call (nothing ran): a fresh interpreter runs it
            why = "the zygote exited"
    _log(why, args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def _log(how: str, args: list[str]) -> None:
    """VLRL_TEST_CALL_LOG=FILE: one line per call saying whether it forked, or why not (a suite that
    silently stopped forking only gets slower)."""
    path = os.environ.get("VLRL_TEST_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"how": how, "args": args[:2], "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
                                "worker": os.environ.get("PYTEST_XDIST_WORKER", "")}) + "\n")


class ZygoteGone(Exception):
    """The zygote process exited; a call it had not started yet can run in a fresh interpreter."""


class Zygote:
    def __init__(self):
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.env.pop("VLRL_RUN_CLAIMED", None)
        self.proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, env=self.env, bufsize=0)
        self.buf = b""
        try:
            self.ready = self._reply(120).get("ready", False)
        except ZygoteGone:  # an import failed: every call runs in a fresh interpreter, which will say why
            self.ready = False

    def can_run(self, env: dict) -> bool:
        return self.why_not(env) is None

    def why_not(self, env: dict) -> str | None:
        """Why a call with this environment cannot be forked from the zygote (None: it can)."""
        if not self.ready or self.proc.poll() is not None:
            return "the zygote is not running"
        keys = {k for k in set(env) | set(self.env) if k.startswith(IMPORT_TIME_ENV) and k not in FORKABLE_ENV}
        changed = sorted(k for k in keys if env.get(k) != self.env.get(k))
        if changed:
            return f"import-time variables differ: {', '.join(changed)}"
        # the zygote's own PYTHONPATH (the floor run's transformers) is imported already: the call must keep
        # it, in order; folders put before it (a test's environment module) hold no library the zygote imported
        have = [p for p in self.env.get("PYTHONPATH", "").split(os.pathsep) if p]
        added = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        want = iter(added)
        if not all(p in want for p in have):
            return f"the call drops the zygote's PYTHONPATH ({os.pathsep.join(have)})"
        # Python imports these at interpreter start-up only, which a forked child never goes through
        hooks = [os.path.join(p, f) for p in added if p not in have for f in ("sitecustomize.py", "usercustomize.py")]
        if any(os.path.exists(h) for h in hooks):
            return "a PYTHONPATH folder holds a start-up hook (sitecustomize/usercustomize)"
        return None

    def run(self, cmd, args, env, cwd, timeout) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            try:
                self.proc.stdin.write(json.dumps({"args": args, "env": env, "cwd": cwd, "stdout": out,
                                                  "stderr": err}).encode() + b"\n")
            except BrokenPipeError:
                raise ZygoteGone() from None
            pid = self._reply(60).get("pid")
            if pid is None:
                raise ZygoteGone()
            try:
                reply = self._reply(timeout)
            except ZygoteGone:
                # mid-call: the child may still run (now an orphan) and has written part of its outputs,
                # so the call cannot be repeated; it ends here as a failure that says why
                _kill_group(pid)
                raise RuntimeError(f"the test zygote exited while running `vlrl {' '.join(args)}`; "
                                   f"stderr so far:\n{_read(err)[-3000:]}") from None
            if "code" not in reply:  # timed out: the child and everything it started (its own session)
                _kill_group(pid)
                try:
                    self._reply(60)  # the zygote reaps the child and says so
                except ZygoteGone:
                    pass
                raise subprocess.TimeoutExpired(cmd, timeout, _read(out), _read(err))
            return subprocess.CompletedProcess(cmd, reply["code"], _read(out), _read(err))

    def _reply(self, timeout: float) -> dict:
        """The zygote's next reply line, or {} after `timeout` seconds; ZygoteGone if it exited."""
        end = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self.buf:
            left = end - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return {}
            chunk = os.read(fd, 65536)
            if not chunk:
                raise ZygoteGone()
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


_ZYGOTE: list = []


def _zygote() -> Zygote | None:
    if not _ZYGOTE:
        try:
            z = Zygote()
        except OSError:
            z = None
        _ZYGOTE.append(z if z is not None and z.ready else None)
        if _ZYGOTE[0] is not None:
            atexit.register(_ZYGOTE[0].close)
    return _ZYGOTE[0]


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read(path: str) -> str:
    """A captured stream as `subprocess.run(text=True)` returns it (universal newlines)."""
    try:
        with open(path, encoding="utf-8", errors="replace", newline=None) as f:
            return f.read()
    except FileNotFoundError:
        return ""


# --- the zygote process ---------------------------------------------------------------------------------


def _serve() -> None:
    import importlib

    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything an import prints must not reach the reply pipe
    for name in PRELOAD:
        importlib.import_module(name)
    base_path = [p for p in sys.path[1:] if p not in os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    replies.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        req = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.close(replies.fileno())
            _child(req, base_path)  # never returns
        replies.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"code": os.waitstatus_to_exitcode(status)}) + "\n")


def _child(req: dict, base_path: list[str]) -> None:
    """Become `python -m vlrl_cli ARGS` in req's folder and environment; exit with the CLI's code."""
    code = 1
    try:
        os.setsid()  # its own process group: a timeout kills it and whatever it started
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [req["cwd"], *extra, *base_path]  # what `python -m` puts first: the working folder
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(f, fd)
            os.close(f)
        sys.argv = ["vlrl_cli", *req["args"]]
        import runpy

        try:
            runpy.run_module("vlrl_cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
        import threading

        threading._shutdown()  # what the interpreter does at exit: join worker threads, then atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


if __name__ == "__main__":
    _serve()
