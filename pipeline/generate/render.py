"""Prompt rendering: a domain's template file in prompts/ turns a Problem into the user message.

Templates are data (plain text with Jinja2 placeholders) so that changing a prompt never needs a code change; the
template's hash goes into every row and into the run's fingerprint, because a different prompt is a different run.
The chat template of the model itself is applied by the backend (vLLM's tokenizer or the server).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jinja2

from pipeline.records import DOMAINS, Problem, fingerprint

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "prompts"


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    @property
    def hash(self) -> str:
        return fingerprint(self.text)


class Renderer:
    """Loads one template per domain (recipe `templates` or prompts/DOMAIN.txt) and renders chat messages."""

    def __init__(self, templates: dict[str, str], system_prompt: str | None = None, base_dir: Path = Path(".")):
        self._overrides = templates
        self._base_dir = base_dir
        self._system_prompt = system_prompt
        self._env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
        self._loaded: dict[str, tuple[Template, jinja2.Template]] = {}

    def template(self, domain: str) -> Template:
        return self._load(domain)[0]

    def _load(self, domain: str) -> tuple[Template, jinja2.Template]:
        if domain not in self._loaded:
            name = self._overrides.get(domain, f"{domain}.txt")
            candidates = [self._base_dir / name, PROMPTS_DIR / name]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                raise FileNotFoundError(
                    f"no prompt template for domain {domain!r}: looked for {', '.join(map(str, candidates))} "
                    f"(set recipe field templates.{domain})"
                )
            text = path.read_text()
            self._loaded[domain] = (Template(name, text), self._env.from_string(text))
        return self._loaded[domain]

    def messages(self, problem: Problem) -> list[dict[str, str]]:
        _, compiled = self._load(problem.domain)
        user = compiled.render(prompt=problem.prompt, problem=problem, metadata=problem.metadata).strip()
        system = [{"role": "system", "content": self._system_prompt}] if self._system_prompt else []
        return [*system, {"role": "user", "content": user}]

    def templates_hash(self) -> str:
        """One hash over the system prompt and the template of every domain that has one: known before the first
        problem is read (problems are streamed), so the run's fingerprint is checked before any is sent."""
        hashes = {}
        for domain in DOMAINS:
            try:
                hashes[domain] = self.template(domain).hash
            except FileNotFoundError:  # a domain without a template stops the run when a problem of it comes
                continue
        return fingerprint(hashes | {"system": self._system_prompt})
