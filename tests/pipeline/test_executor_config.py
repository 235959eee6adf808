"""The `executor:` recipe section: `shard=I/N` on the command line, defaults, and what is refused."""

from __future__ import annotations

import pytest

from pipeline.config import load_recipe
from pipeline.config_base import RecipeError
from pipeline.executor import LocalExecutor, Shard
from pipeline.executor_config import ExecutorConfig, make_executor, parse_shard_override

RECIPE = {"name": "x", "sources": [{"type": "humaneval"}]}


def test_shard_i_of_n_is_the_two_overrides_and_is_checked():
    assert parse_shard_override("3/8") == ["executor.shard=3", "executor.shards=8"]
    for bad in ("8/8", "1", "a/2", "-1/2", "1/0"):
        with pytest.raises(RecipeError, match=f"shard={bad}"):
            parse_shard_override(bad)
    recipe = load_recipe(None, parse_shard_override("1/4"), defaults=RECIPE)
    executor = make_executor(recipe.executor)
    assert isinstance(executor, LocalExecutor) and executor.shards == [Shard(1, 4)]


def test_defaults_one_local_shard_and_four_shards_per_ray_worker():
    assert ExecutorConfig().shard_list() == [Shard(0, 1)]
    assert ExecutorConfig(type="ray", workers=3).shards == 12
    assert ExecutorConfig(type="ray", workers=3, shards=5).shard_list() == [Shard(i, 5) for i in range(5)]
    with pytest.raises(ValueError, match="shard 4 of 4"):
        ExecutorConfig(shard=4, shards=4)
    with pytest.raises(ValueError, match="ray runs every shard"):
        ExecutorConfig(type="ray", shard=0, shards=2)


def test_the_run_folder_recipe_keeps_the_shard_count_but_not_one_array_tasks_shard(tmp_path):
    from pipeline.generate.stage import prepare_run

    recipe = load_recipe(
        None, ["executor.shard=1", "executor.shards=2", f"output.runs_dir={tmp_path}"], defaults=RECIPE
    )
    prepare_run(recipe)
    saved = load_recipe(recipe.run_dir / "recipe.yaml")
    assert (saved.executor.shards, saved.executor.shard) == (2, None)  # so `distill verify RUN` does every shard
