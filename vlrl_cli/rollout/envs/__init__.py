"""Environments, by `env_class`: one registry every command reads (prepare, validate, train, eval, check-drift).

A name maps to an import path (`module:Class`), so listing them imports nothing heavy. Where names come from,
later ones winning: the built-in environments, installed packages' entry points (group `vlrl.envs`, e.g. in a
pyproject.toml: `[project.entry-points."vlrl.envs"] my_maze = "mypkg.envs:MyMaze"`), a recipe's `envs:` and the
`--env NAME=module:Class` flags. A record may also carry an import path itself as its env_class, or
`gymnasium:ID` for any gymnasium environment that renders RGB frames (gym.py). User modules
are imported from the current folder, the recipe's folder, PYTHONPATH, or an installed package; `check_envs`
imports them at start-up, so a bad path is one line naming it before any model loads.
"""

from __future__ import annotations

import importlib
import sys
from functools import lru_cache
from pathlib import Path

from ...errors import UserError
from .base import is_count, is_time_limit

BUILTIN_ENVS = {
    "colors": "vlrl_cli.rollout.envs.colors:ColorsEnv",
    "geometry3k": "vlrl_cli.rollout.envs.geometry3k:Geometry3kEnv",
    "maze2d": "vlrl_cli.rollout.envs.maze2d:Maze2dEnv",
}
ENTRY_POINTS = "vlrl.envs"


@lru_cache(maxsize=None)
def installed_envs() -> dict[str, str]:
    """Environments installed packages register under the entry-point group `vlrl.envs`."""
    from importlib.metadata import entry_points

    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINTS)}


def env_registry(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Every known env_class name -> its import path (`extra`: a recipe's envs: and --env flags)."""
    return {**BUILTIN_ENVS, **installed_envs(), **(extra or {})}


def known_env_classes(extra: list[str] | tuple[str, ...] = ()) -> set[str]:
    return set(env_registry()) | set(extra)


def parse_env_flags(flags: list[str] | None) -> dict[str, str]:
    """`--env NAME=module:Class` flags as a registry addition; UserError naming a malformed one."""
    out = {}
    for flag in flags or []:
        name, sep, target = flag.partition("=")
        if not sep or not name or ":" not in target:
            raise UserError(f"--env {flag!r}: expected NAME=module:Class, e.g. --env my_maze=mypkg.envs:MyMaze")
        out[name] = target
    return out


def importable_from(*folders: str | Path) -> None:
    """Let user environment modules be imported from these folders (the current one, a recipe's). They go last
    on the path: a user's file named like a package vlrl uses (datasets.py, yaml.py) must not replace it.
    Worker processes inherit the path; DeepSpeed's ranks run the same command, which calls this again."""
    for folder in folders:
        path = str(Path(folder).resolve())
        if path not in sys.path:
            sys.path.append(path)


def load_env_class(name: str, target: str):
    """The class an import path names (`gymnasium:ID`: that gymnasium environment, rollout/envs/gym.py); UserError
    saying what is wrong with it."""
    module, _, attr = target.partition(":")
    if module == "gymnasium":
        from .gym import gym_env_class

        return gym_env_class(attr)
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        raise UserError(f"environment {name!r}: cannot import {module!r} ({e}); install its package, or run from the "
                        "folder that holds it (or put that folder on PYTHONPATH)") from None
    except (Exception, SystemExit) as e:  # noqa: BLE001 - the user's module failed (or exited) while importing
        raise UserError(f"environment {name!r}: importing {module!r} failed: {type(e).__name__}: {e}") from None
    cls = getattr(mod, attr, None)
    if cls is None:
        raise UserError(f"environment {name!r}: module {module!r} has no {attr!r}")
    if not (isinstance(cls, type) and callable(getattr(cls, "reset", None)) and callable(getattr(cls, "step", None))):
        raise UserError(f"environment {name!r}: {target} is not an environment class (reset(record) and step(text); "
                        "see vlrl_cli.rollout.envs.base.Env)")
    # what vlrl reads from the class before any episode (the engine's limits): checked here, at import
    if not callable(getattr(cls, "turn_limit", None)):
        raise UserError(f"environment {name!r}: {target} has no turn_limit(record); subclass "
                        "vlrl_cli.rollout.envs.base.Env, which gives it and the other defaults")
    for attr, least in (("max_turns", 1), ("observation_images", 0)):
        value = getattr(cls, attr, least)
        if not is_count(value, least):
            raise UserError(f"environment {name!r}: {target}.{attr} = {str(value)[:40]!r}; a whole number >= {least}")
    problem = _class_problem(cls)
    if problem:
        raise UserError(f"environment {name!r}: {target} {problem}")
    return cls


def _class_problem(cls) -> str | None:
    """What would fail every episode of this class (None: nothing seen): found at import, one line before any
    model loads, not as the same env_error on every record after it."""
    import inspect

    from .base import Env

    try:
        needed = [p.name for p in list(inspect.signature(cls).parameters.values())
                  if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    except (TypeError, ValueError):  # a signature Python cannot read (a C type): left to the first episode
        needed = []
    if needed:
        return (f"needs constructor arguments ({', '.join(needed)}); vlrl makes one environment per episode with "
                "none (read settings from the record in reset)")
    if issubclass(cls, Env) and cls.step is Env.step and cls.score is Env.score:
        return "implements neither step(text) nor score(text); a single-turn environment implements score"
    limit = getattr(cls, "time_limit_s", None)
    if not is_time_limit(limit):
        return f"time_limit_s = {str(limit)[:40]!r}; a number of seconds > 0 or None"
    return None


def check_envs(registry: dict[str, str]) -> None:
    """Import every environment of `registry` now: a bad path is a UserError naming it (before any model loads)."""
    for name, target in registry.items():
        if ":" not in target:
            raise UserError(f"environment {name!r}: {target!r} is not an import path (module:Class)")
        load_env_class(name, target)


def resolve_env(name: str, registry: dict[str, str] | None = None):
    """The environment class for an env_class name or a `module:Class` import path."""
    target = env_registry(registry).get(name, name)
    if ":" not in target:
        raise UserError(f"unknown env_class {name!r}; known: {', '.join(sorted(env_registry(registry)))} (or an "
                        "import path module:Class; a recipe's envs: or --env NAME=module:Class add names)")
    return _load_cached(name, target)


@lru_cache(maxsize=256)
def _load_cached(name: str, target: str):
    return load_env_class(name, target)
