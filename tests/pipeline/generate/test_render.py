import pytest

from pipeline.generate.render import PROMPTS_DIR, Renderer
from pipeline.records import DOMAINS, Problem


def test_every_domain_has_a_template_file():
    for domain in DOMAINS:
        assert (PROMPTS_DIR / f"{domain}.txt").is_file()


def test_math_prompt_carries_deepseek_r1_boxed_instruction():
    messages = Renderer({}).messages(Problem("p1", "s", "math", "What is 2+2?"))
    assert messages == [
        {
            "role": "user",
            "content": "What is 2+2?\nPlease reason step by step, and put your final answer within \\boxed{}.",
        }
    ]


def test_system_prompt_and_custom_template_from_the_recipe_folder(tmp_path):
    (tmp_path / "short.txt").write_text("Q: {{ prompt }}")
    renderer = Renderer({"math": "short.txt"}, system_prompt="Be brief.", base_dir=tmp_path)
    messages = renderer.messages(Problem("p1", "s", "math", "1+1?"))
    assert messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 1+1?"}]
    assert renderer.templates_hash() != Renderer({}).templates_hash()
    # every domain's template counts (problems are streamed: which domains a run uses is known only at its end)
    assert Renderer({"code": "short.txt"}, base_dir=tmp_path).templates_hash() != Renderer({}).templates_hash()


def test_missing_template_names_the_recipe_field():
    with pytest.raises(FileNotFoundError, match=r"templates\.math"):
        Renderer({"math": "nope.txt"}).messages(Problem("p1", "s", "math", "x"))
