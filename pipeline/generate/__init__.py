"""Generate: problems from the recipe's sources, rendered with their domain's template, answered by the teacher into
crash-safe raw parts (`RUN/raw/`). The stage itself is `stage.generate`; `teacher/` holds one module per backend."""
