"""Environments, by `env_class`. Names map to import paths so that listing them imports nothing heavy.

Users add their own with an import path (`mypkg.envs:MyEnv`) in a recipe; `vlrl validate
--env-class NAME` accepts extra names.
"""

from __future__ import annotations

import importlib

BUILTIN_ENVS = {
    "colors": "vlrl_cli.rollout.envs.colors:ColorsEnv",
    "geometry3k": "vlrl_cli.rollout.envs.geometry3k:Geometry3kEnv",
    "maze2d": "vlrl_cli.rollout.envs.maze2d:Maze2dEnv",
}


def known_env_classes(extra: list[str] | tuple[str, ...] = ()) -> set[str]:
    return set(BUILTIN_ENVS) | set(extra)


def resolve_env(name: str, registry: dict[str, str] | None = None):
    """The environment class for an env_class name or a `module:Class` import path."""
    target = {**BUILTIN_ENVS, **(registry or {})}.get(name, name)
    if ":" not in target:
        raise KeyError(f"unknown env_class {name!r}; known: {', '.join(sorted(BUILTIN_ENVS))} (or module:Class)")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)
