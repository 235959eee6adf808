"""A run's recipe, loaded from YAML with command-line overrides: the generate stage's config (sources, teacher,
sampling, output) plus the sections of the stages after it (verify, build).

pydantic models with `extra="forbid"`: an unknown or mistyped recipe key is an error that names the field,
rather than a setting silently ignored for a multi-hour run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError, model_validator

from pipeline.build.config import BuildConfig
from pipeline.config_base import RecipeError, Strict
from pipeline.generate.config import GenerateConfig
from pipeline.verify.config import VerifyConfig


class Recipe(GenerateConfig):
    """A generation run and how its completions are verified and built into a dataset."""

    verify: VerifyConfig = VerifyConfig()
    build: BuildConfig = BuildConfig()

    @model_validator(mode="after")
    def _logprobs_only_when_weighted(self) -> Recipe:
        """Top-k logprobs cost the engine time and memory; only the "sample" weightings read the entropy they give
        (pipeline.build.weighting), so a uniform build asks for none unless the recipe sets sampling.logprobs."""
        if "logprobs" not in self.sampling.model_fields_set and self.build.weighting == "uniform":
            self.sampling = self.sampling.model_copy(update={"logprobs": 0})
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if not isinstance(node.setdefault(key, {}), (dict, list)):
            raise RecipeError(f"override {dotted}: {'.'.join(keys[: i + 1])} is not a section")
        node = node[key]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def load_recipe(
    path: str | Path | None,
    overrides: list[str] = (),
    defaults: dict[str, Any] | None = None,
    model: type[Recipe] = Recipe,
) -> Recipe:
    """Read a YAML recipe (or start from `defaults`), apply `key.sub=value` overrides (values parsed as YAML).

    `model` is the recipe type: a `distill run` recipe extends the generate recipe with more sections.
    """
    data: dict[str, Any] = dict(defaults or {})
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from e
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path}: top level must be a mapping of fields")
        data.setdefault("base_dir", str(path.parent))
    apply_overrides(data, overrides)
    return validate(model, data, f"recipe {path or ''}")


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise RecipeError(f"override {item!r}: expected FIELD=VALUE, e.g. sampling.n=4")
        try:
            _set_dotted(data, key.strip(), yaml.safe_load(raw))
        except (IndexError, ValueError, KeyError) as e:
            raise RecipeError(f"override {item!r}: {e}") from e
    return data


def validate(model: type[Strict], data: dict[str, Any], label: str, prefix: str = "") -> Any:
    """Validate `data`, turning pydantic's errors into one message that names each bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = prefix + ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"  recipe field {where}: {err['msg']}")
        raise RecipeError(f"invalid {label}\n" + "\n".join(lines)) from None
