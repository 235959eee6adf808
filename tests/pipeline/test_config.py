from pathlib import Path

import pytest
import yaml

from pipeline.config import load_recipe
from pipeline.config_base import RecipeError

ROOT = Path(__file__).resolve().parents[2]


def test_demo_recipe_loads_with_deepseek_r1_sampling_defaults():
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml")
    assert recipe.name == "demo" and recipe.teacher.model == "smollm2-135m-instruct"
    assert (recipe.sampling.temperature, recipe.sampling.top_p) == (0.6, 0.95)
    assert recipe.run_dir == Path("runs") / "demo"


def test_overrides_reach_any_field_and_parse_values_as_yaml():
    recipe = load_recipe(
        ROOT / "recipes" / "demo.yaml",
        ["sampling.n=4", "teacher.backend=openai", "teacher.endpoints=[http://127.0.0.1:1/v1]", "sources.0.limit=3"],
    )
    assert recipe.sampling.n == 4
    assert recipe.teacher.endpoints == ["http://127.0.0.1:1/v1"]
    assert recipe.sources[0].limit == 3


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (["sampling.temperature=hot"], "sampling.temperature"),
        (["teacher.backnd=vllm"], "teacher.backnd"),
        (["teacher.backend=tgi"], "teacher.backend"),
        (["sampling.top_p=1.5"], "sampling.top_p"),
        (["teacher.backend=openai"], "teacher"),
    ],
)
def test_invalid_recipe_error_names_the_field(overrides, field):
    with pytest.raises(RecipeError, match=rf"recipe field {field}"):
        load_recipe(ROOT / "recipes" / "demo.yaml", overrides)


def test_unknown_source_type_and_malformed_override_are_clear(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"name": "x", "sources": [{"type": "csv", "path": "a"}]}))
    with pytest.raises(RecipeError, match=r"recipe field sources\.0"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="expected FIELD=VALUE"):
        load_recipe(path, ["sampling.n"])
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
