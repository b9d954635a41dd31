import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

# tests never reach a hub, and keep datasets' caches out of the user's home
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", str(Path(__file__).resolve().parent.parent / ".pytest_cache" / "hf"))

ROOT = Path(__file__).resolve().parent.parent
GEOMETRY_SAMPLE = ROOT.parent / "shared" / "data" / "geometry3k-sample"


# The longest tests, longest first. Two workers take tests in collection order: a long test collected late
# (alphabetically) runs alone at the end while the other worker idles, which set the suite's wall time.
LONGEST_FIRST = ("test_demo.py::test_demo_maze", "test_demo.py::test_demo_learns", "test_serve_rl_example.py::",
                 "test_rollout_ranks.py::test_split_ranks")


def pytest_collection_modifyitems(config, items):
    def rank(item):
        return next((i for i, key in enumerate(LONGEST_FIRST) if key in item.nodeid), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: every other test keeps its place


@pytest.fixture(scope="session")
def geometry_sample() -> Path:
    # The sample ships in ../shared beside every checkout and CI clone; its absence is a broken setup.
    assert GEOMETRY_SAMPLE.is_dir(), f"missing {GEOMETRY_SAMPLE}: ../shared must sit beside the repo"
    return GEOMETRY_SAMPLE


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from vlrl_cli.model.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2_5_vl", "qwen2_5_vl")


@pytest.fixture(scope="session")
def family_models(tmp_path_factory) -> dict:
    """A tiny model of each supported family (families.FAMILIES): {name: folder} (never written to by tests)."""
    from vlrl_cli.model.tiny import FAMILIES, build_tiny_model

    root = tmp_path_factory.mktemp("families")
    return {f: build_tiny_model(root / f, f) for f in FAMILIES}


@pytest.fixture(scope="session")
def colors_data(tmp_path_factory) -> Path:
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp("colors")
    prepare(PrepareOptions(source="colors", out=out, workers=1, source_opts={"rows": 60}))
    return out


@pytest.fixture(autouse=True)
def _own_pythonpath_and_sys_path():
    """Commands run in the test process (the `cli` fixture, train functions) put the working and recipe folders
    on sys.path and PYTHONPATH for their ranks, as `vlrl` does. Undone after each test: the next test, and the
    CLI processes it starts, must see the test process's own paths."""
    import sys

    pythonpath, path = os.environ.get("PYTHONPATH"), list(sys.path)
    yield
    sys.path[:] = path
    if pythonpath is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = pythonpath


@pytest.fixture(scope="session")
def on_floor() -> bool:
    """Whether this run tests the oldest transformers vlrl supports (`make test-floor`): the floor pyproject
    declares, not a version written here twice."""
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement
    from packaging.version import Version

    spec = next(Requirement(r).specifier for r in requires("vlrl") if Requirement(r).name == "transformers")
    floor = next(Version(s.version) for s in spec if s.operator == ">=")
    return Version(version("transformers")).release[:2] == floor.release[:2]


@pytest.fixture
def cli():
    from vlrl_cli.cli import app

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def pytest_report_header(config):
    import transformers

    return f"transformers {transformers.__version__} ({transformers.__file__})"


def prepared_mazes(tmp_path_factory, size: int, max_steps: int) -> Path:
    """8 training and 4 validation Maze2D records of one size and move limit."""
    from vlrl_cli.data.prepare import PrepareOptions, prepare

    out = tmp_path_factory.mktemp(f"maze{size}x{max_steps}")
    prepare(PrepareOptions(source="maze2d", out=out, workers=1,
                           source_opts={"rows": 8, "val_rows": 4, "maze_size": size, "max_steps": max_steps}))
    return out


def terminal_sigint():
    """In the child, before exec: SIGINT as a terminal delivers it. A shell or CI runner may start us with
    SIGINT ignored (background jobs of non-interactive shells), and Python then keeps it ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
