"""The package is grouped by stage of the data flow, and imports run one way:
data <- model <- rollout <- train <- tools, serve <- cli (errors.py is everyone's)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlrl_cli"
LAYERS = {"errors": 0, "data": 1, "model": 2, "rollout": 3, "train": 4, "tools": 5, "serve": 5, "cli": 6, "__main__": 7}


def stage(module: str) -> str:
    """'vlrl_cli.train.grpo' -> 'train'; the package's own __init__ -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every vlrl_cli import in a file, function-level ones included."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    if rel.name == "__init__":
        package = list(rel.parts[:-1])
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module == "vlrl_cli" or (node.level and not node.module):  # from . import x: modules
                out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
            elif module.startswith("vlrl_cli"):
                out.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("vlrl_cli")]
    return out


def test_imports_run_one_way_through_the_stages():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = stage(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        if here in ("", "__init__"):
            continue
        for line, module in imports_of(path):
            there = stage(module)
            if there in ("", "__init__", "__version__") or there == here:
                continue
            if LAYERS[there] > LAYERS[here] or (LAYERS[there] == LAYERS[here] and there != here):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({here}) imports {module} ({there})")
    assert not wrong, "\n".join(wrong)


def test_every_stage_is_a_layer():
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    stages |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert stages <= set(LAYERS), stages - set(LAYERS)
