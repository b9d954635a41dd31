"""The reference pages are generated and current, every metric a run emits is documented (and every documented
one emitted), and the project's own text speaks of itself: no issue numbers or working sessions."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_generated_pages_are_current():
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_docs.py"), "--check"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.model
def test_every_emitted_metric_is_documented_and_every_documented_one_emitted(tmp_path, tiny_model, colors_data, monkeypatch):
    import torch

    from vlrl_cli.train.launch import run_training
    from vlrl_cli.train.metric_docs import METRICS
    from vlrl_cli.train.recipe import load_recipe
    from vlrl_cli.train.runs import read_metrics

    emitted = set()
    for algo in ("grpo", "sft"):
        recipe = tmp_path / f"{algo}.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": {"path": str(tiny_model)},
            "data": {"train": str(colors_data / "train.parquet"), "val": str(colors_data / "val.parquet"), "val_limit": 2},
            "rollout": {"n": 2, "prompts_per_step": 2, "max_new_tokens": 2},
            "algorithm": {"name": algo, "kl_coef": 0.1} if algo == "grpo" else {"name": "sft", "sft_target": "random_choice"},
            "trainer": {"steps": 1, "lr": 1e-4, "eval_every": 1, "save_final": False},
            "run": {"name": algo, "dir": str(tmp_path / "runs")}}))
        run_training(load_recipe(recipe))
        for m in read_metrics(tmp_path / "runs" / algo):
            emitted |= set(m)
    documented = {k for k, (who, _) in METRICS.items()
                  if (torch.cuda.is_available() or "gpu" not in who) and "engine ranks" not in who}
    assert emitted == documented, (sorted(emitted - documented), sorted(documented - emitted))


def test_the_project_speaks_of_itself():
    """Code, recipes, schemas and user docs say what things are for, not which issue or session made them."""
    pattern = re.compile(r"\b(issues? ?[-#]?\d+|(working )?session of 20\d\d)\b", re.I)
    files = [*ROOT.glob("vlrl_cli/**/*.py"), *ROOT.glob("recipes/*.yaml"), *ROOT.glob("schemas/*.json"),
             *ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("scripts/*"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("bench/*.sh"), ROOT / "Makefile"]
    found = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:100]}" for p in files if p.is_file()
             for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not found, "\n".join(found)


def test_the_readme_is_a_guide_of_about_300_lines_and_shows_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 320 and "make demo" in text and "make test" in text
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert (ROOT / link).exists(), link
