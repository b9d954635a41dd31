import pytest

from vlrl_cli.train.recipe import RecipeError, load_recipe


@pytest.fixture
def recipe_file(tmp_path, colors_data, tiny_model):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{path: {tiny_model}}}\ndata: {{train: {colors_data / 'train.parquet'}}}\n"
                    "rollout: {n: 4}\ntrainer: {lr: 1.0e-3}\n")
    return path


def test_overrides_types_and_defaults(recipe_file):
    r = load_recipe(recipe_file, ["trainer.lr=5e-4", "rollout.n=8", "algorithm.kl_coef=0.01", "data.val=null"])
    assert r.trainer.lr == 5e-4 and r.rollout.n == 8 and r.algorithm.kl_coef == 0.01
    assert r.algorithm.loss_agg == "token-mean" and r.trainer.zero_stage == 0  # defaults


@pytest.mark.parametrize("override,needle", [
    ("trainer.lrr=1", "trainer: unknown key ('lrr' was unexpected) (did you mean 'lrr' -> 'lr'?)"),
    ("rollout.engine_rank=1", "(did you mean 'engine_rank' -> 'engine_ranks'?)"),
    ("rolout.n=2", "(top level): unknown key ('rolout' was unexpected) (did you mean 'rolout' -> 'rollout'?)"),
    ("rollout.n=many", "rollout.n: 'many' is not of type 'integer'"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg: 'mean' is not one of"),
    ("trainer.zero_stage=4", "trainer.zero_stage"),
    ("bogus.key=1", "unknown key ('bogus' was unexpected)"),  # nothing close: no guess

    ("trainer.lr", "expected key=value"),
    ("data.train=/no/such.parquet", "data.train /no/such.parquet does not exist"),
])
def test_bad_recipes_name_the_key(recipe_file, override, needle):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe_file, [override])
    assert needle in str(e.value), str(e.value)
    if override.startswith("bogus"):
        assert "did you mean" not in str(e.value)


def test_shipped_recipes_are_valid():
    import yaml
    import jsonschema

    from vlrl_cli.data.records import load_schema, schema_dir

    recipes = sorted((schema_dir().parent / "recipes").glob("*.yaml"))
    assert {"colors-tiny.yaml", "colors-tiny-sft.yaml"} <= {p.name for p in recipes}
    for p in recipes:
        jsonschema.validate(yaml.safe_load(p.read_text()), load_schema("recipe"))


def test_cli_reports_bad_recipe_cleanly(cli, recipe_file):
    r = cli("train", recipe_file, "--set", "trainer.steps=-1")
    assert r.exit_code == 2 and "trainer.steps" in r.output and "Traceback" not in r.output
