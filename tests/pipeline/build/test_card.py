import importlib.util
import json
import re

import matplotlib.image
import pyarrow as pa
import pytest
import yaml
from rich.console import Console

from pipeline.build.card import card_tables, print_stats, render_card, size_category
from pipeline.build.shards import ShardWriter, write_manifest

SCHEMA = pa.schema([("id", pa.int64()), ("prompt", pa.string()), ("completion", pa.string())])
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECIPE = "name: demo\nteacher:\n  model: smollm2-135m-instruct\nfilters:\n  - truncated\n"


def make_stats() -> dict:
    tokens = {"mean": 812.3, "p50": 640, "p90": 1800, "max": 4096}
    return {
        "name": "demo",
        "license": "apache-2.0",
        "recipe_hash": "ab12cd34ef56" * 4,
        "rows_in": 1000,
        "kept": 640,
        "dropped": {
            "not_passed": 200,
            "failed_filter:truncated": 50,
            "exact_duplicate": 40,
            "near_duplicate": 30,
            "contaminated:aime24": 20,
            "pass_rate_band": 10,
            "over_k_per_problem": 10,
        },
        "splits": {"train": 600, "test": 40},
        "pass_rate_by_source": {"demo_math": 0.41, "reasoning_gym": 0.22},
        "pass_rate_by_domain": {"math": 0.41, "gym": 0.22},
        "tokens": {"completion_tokens": tokens, "prompt_tokens": {"mean": 95.5, "p50": 80, "p90": 160, "max": 512}},
        "histograms": {
            "completion_tokens": {"edges": [0.0, 512.0, 1024.0, 2048.0, 4096.0], "counts": [300, 200, 100, 40]},
            "weight": {"edges": [0.0, 0.5, 1.0, 1.5], "counts": [100, 440, 100]},
        },
        "decontamination": {"aime24": {"removed": 20, "n": 8, "source": "evals/aime24.jsonl"}},
        "teacher": "smollm2-135m-instruct",
        "domains": ["math", "gym"],
    }


def build_dataset(dataset_dir, stats=None, card=True):
    """A finished build as `distill build` leaves it: shards, manifest, stats.json and (optionally) the card."""
    stats = stats or make_stats()
    entries, start = [], 0
    for split, counts in (("train", [300, 300]), ("test", [40])):
        writer = ShardWriter(dataset_dir, split, SCHEMA, counts, group_rows=100)
        n = sum(counts)
        ids = list(range(start, start + n))
        writer.write(pa.table({"id": ids, "prompt": [f"q{i}" for i in ids], "completion": ["a"] * n}, schema=SCHEMA))
        entries += writer.close()
        start += n
    write_manifest(dataset_dir, entries, recipe_hash=stats["recipe_hash"], extra={"teacher": stats["teacher"]})
    (dataset_dir / "stats.json").write_text(json.dumps(stats))
    if card:
        render_card(dataset_dir, stats, RECIPE)
    return stats


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


def test_front_matter_is_hub_yaml(tmp_path):
    build_dataset(tmp_path)
    meta = _front_matter((tmp_path / "README.md").read_text())
    assert meta["license"] == "apache-2.0"
    assert meta["pretty_name"] == "demo"
    assert meta["size_categories"] == ["n<1K"]
    assert meta["task_categories"] == ["text-generation"]
    assert meta["tags"] == ["distillation", "reasoning", "synthetic"]
    (config,) = meta["configs"]
    assert config["config_name"] == "default"
    assert config["data_files"] == [
        {"split": "train", "path": "data/train-*"},
        {"split": "test", "path": "data/test-*"},
    ]
    for entry in config["data_files"]:  # every glob must match a real shard, or the Hub viewer breaks
        assert list(tmp_path.glob(entry["path"] + ".parquet"))


def test_plots_are_real_pngs(tmp_path):
    build_dataset(tmp_path)
    targets = re.findall(r"!\[[^\]]*\]\((plots/[^)]+)\)", (tmp_path / "README.md").read_text())
    assert sorted(targets) == ["plots/completion_tokens.png", "plots/pass_rate_by_source.png", "plots/weight.png"]
    for target in targets:
        path = tmp_path / target
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 50 and image.shape[1] > 50
    assert not list((tmp_path / "plots").glob("*.tmp"))
    stats = make_stats() | {"histograms": {}}  # a rebuild without histograms drops the old plots
    render_card(tmp_path, stats, RECIPE)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["pass_rate_by_source.png"]
    assert "plots/weight.png" not in (tmp_path / "README.md").read_text()


def test_tables_carry_the_numbers(tmp_path):
    stats = build_dataset(tmp_path)
    text = (tmp_path / "README.md").read_text()
    for needle in [
        "640",
        "1000",
        "360",
        "failed_filter:truncated",
        "contaminated:aime24",
        "over_k_per_problem",
        "demo_math",
        "41.0%",
        "22.0%",
        "812.3",
        "4096",
        "evals/aime24.jsonl",
        "smollm2-135m-instruct",
    ]:
        assert needle in text, needle
    assert "```yaml\n" + RECIPE.rstrip() + "\n```" in text
    assert 'load_dataset("parquet"' in text and "<user>/demo" in text
    titles = [t for t, _, _ in card_tables(stats)]
    assert titles == ["Counts", "Splits", "Drop reasons", "Pass rate by source", "Pass rate by domain",
                      "Token lengths", "Decontamination"]  # fmt: skip
    drops = {t: rows for t, _, rows in card_tables(stats)}["Drop reasons"]
    assert drops[0] == ["not_passed", "200", "20.0%"]  # largest first


def test_markdown_tables_are_well_formed(tmp_path):
    stats = build_dataset(tmp_path)
    text = (tmp_path / "README.md").read_text()
    if importlib.util.find_spec("markdown"):
        import markdown

        html = markdown.markdown(text.split("---\n", 2)[2], extensions=["tables", "fenced_code"])
        assert html.count("<table>") == len(card_tables(stats))
        return
    for title, header, rows in card_tables(stats):
        section = text.split(f"## {title}\n\n", 1)[1].split("\n\n", 1)[0].splitlines()
        assert section[0] == "| " + " | ".join(header) + " |"
        assert section[1] == "| " + " | ".join(["---"] * len(header)) + " |"
        assert len(section) == 2 + len(rows)
        assert all(line.count("|") == len(header) + 1 for line in section)


def test_backticks_in_recipe_cannot_close_the_fence(tmp_path):
    build_dataset(tmp_path, card=False)
    readme = render_card(tmp_path, make_stats(), "note: |\n  ```\n  inline\n  ```\n")
    assert "````yaml\n" in readme.read_text()


def test_split_without_shards_is_an_error(tmp_path):
    stats = make_stats() | {"splits": {"train": 600, "validation": 10}}
    build_dataset(tmp_path, card=False)
    with pytest.raises(ValueError, match="validation"):
        render_card(tmp_path, stats, RECIPE)


def test_size_categories():
    assert [size_category(n) for n in (0, 999, 1000, 9999, 10_000, 2_500_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "1K<n<10K", "10K<n<100K", "1M<n<10M"
    ]  # fmt: skip


def test_print_stats_shows_tables_and_shards(tmp_path):
    build_dataset(tmp_path)
    console = Console(record=True, width=200)
    print_stats(tmp_path, console=console)
    out = console.export_text()
    for name, rows in (
        ("data/train-00000-of-00002.parquet", "300"),
        ("data/train-00001-of-00002.parquet", "300"),
        ("data/test-00000-of-00001.parquet", "40"),
    ):
        line = next(line for line in out.splitlines() if name in line)
        assert rows in line
    for needle in ("640", "failed_filter:truncated", "41.0%", "812.3", "aime24", "Shards"):
        assert needle in out, needle


@pytest.mark.parametrize(
    ("modes", "says"),
    [
        (["processed_logprobs"], "the distribution each token was sampled from (vLLM's processed_logprobs"),
        (["endpoint"], "for a default `vllm serve`, raw_logprobs, the model's distribution before temperature"),
    ],
)
def test_card_says_which_distribution_the_entropy_was_measured_on(tmp_path, modes, says):
    schema = pa.schema([("id", pa.int64()), ("sampling", pa.string())])
    writer = ShardWriter(tmp_path, "train", schema, [len(modes)], group_rows=100)
    sampling = [json.dumps({"temperature": 0.6, "top_p": 0.95, "logprobs_mode": m}) for m in modes]
    writer.write(pa.table({"id": list(range(len(modes))), "sampling": sampling}, schema=schema))
    stats = make_stats() | {"splits": {"train": len(modes)}}
    text = render_card(tmp_path, stats, RECIPE).read_text()
    note = next(line for line in text.splitlines() if line.startswith("`mean_token_entropy`"))
    assert note.startswith("`mean_token_entropy`, and the `weight` made from it, is the entropy of the top-k")
    assert says in note
