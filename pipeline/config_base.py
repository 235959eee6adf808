"""The base of every config model (unknown keys are errors, so a typo in a recipe never passes silently) and the
error a bad recipe raises."""

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecipeError(ValueError):
    """An invalid recipe; the message names the recipe field (or override) at fault."""
