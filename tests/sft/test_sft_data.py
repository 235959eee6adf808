"""What the student trains on: the loss mask, the per-sample weights through TRL's preparation and collator, and the
lint that stops a run before it silently learns the wrong thing."""

from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import AutoTokenizer

from pipeline.cli import main as distill_main
from sft.config import DistillArguments
from sft.data import load_split, tokenize_split
from sft.lint import LintError, end_of_turn_token, lint_collated, lint_rows
from sft.losses import sparse_kl_teacher_student
from sft.train import make_parser
from tests.conftest import ROOT
from tests.sft.conftest import conversation_rows, make_trainer

QUESTION = "What is 17 + 25? Put the final answer in \\boxed{}."
ANSWER = "<think>\nI add 17 and 25: 17 + 25 = 42.\n</think>\n\nThe answer is \\boxed{42}."
PAIRS = [(QUESTION, ANSWER), ("What is 2 + 2?", "<think>\n2 + 2 = 4.\n</think>\n\n\\boxed{4}")]


def test_loss_mask_covers_exactly_the_assistant_turn(tiny_qwen, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    split = tokenize_split(conversation_rows(PAIRS), tokenizer, max_length=None, weighted=False)
    trainer = make_trainer(tiny_qwen, split.rows, tmp_path)
    for row, (question, answer) in zip(trainer.train_dataset.sort("problem_id"), PAIRS, strict=True):
        labels = trainer.data_collator([row])["labels"][0]
        ids = torch.tensor(row["input_ids"])
        trained = tokenizer.decode(ids[labels != -100])
        context = tokenizer.decode(ids[labels == -100])
        # The whole assistant turn, think block included, and the template's end of turn; nothing else.
        assert trained == answer + "<|im_end|>\n"
        prompt_text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        assert context == prompt_text
        assert (labels != -100).nonzero().min() > (labels == -100).nonzero().max()  # one contiguous tail


def test_weights_reach_the_loss_as_a_per_sample_mean_then_a_weighted_mean(tiny_qwen, tmp_path):
    weights = [3.0, 1.0]
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    split = tokenize_split(conversation_rows(PAIRS, weights), tokenizer, max_length=None, weighted=True)
    assert split.rows["sample_weight"] == weights  # one float per sample is stored, not one per token
    trainer = make_trainer(tiny_qwen, split.rows, tmp_path, DistillArguments(weighted_loss=True))
    rows = list(trainer.train_dataset.sort("problem_id"))
    batch = trainer.data_collator(rows)
    assert batch["token_weight"].shape == batch["labels"].shape  # padded like the labels
    for token_weight, row, w in zip(batch["token_weight"], rows, weights, strict=True):
        loss_tokens = torch.zeros(len(token_weight), dtype=torch.bool)
        loss_tokens[: len(row["labels"])] = torch.tensor(row["labels"]) != -100
        n = int(loss_tokens.sum())  # w / n on each of the n loss tokens, 0 on the prompt and the padding
        assert token_weight[loss_tokens].tolist() == pytest.approx([w / n] * n)
        assert token_weight[~loss_tokens].abs().sum().item() == 0
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        per_sample = []
        for row in rows:  # each sample alone: mean next-token CE over its loss tokens
            ids = torch.tensor([row["input_ids"]])
            labels = torch.tensor([row["labels"]])
            logits = model(input_ids=ids).logits[0, :-1]
            target = labels[0, 1:]
            per_sample.append(torch.nn.functional.cross_entropy(logits[target != -100], target[target != -100]).item())
    expected = (weights[0] * per_sample[0] + weights[1] * per_sample[1]) / sum(weights)
    assert loss == pytest.approx(expected, rel=1e-5)
    assert abs(per_sample[0] - per_sample[1]) > 1e-3  # otherwise any weighting would pass


def test_dataset_folder_from_distill_build_loads_with_both_splits(arithmetic_dataset):
    train, test = load_split(str(arithmetic_dataset), "train"), load_split(str(arithmetic_dataset), "test")
    stats = json.loads((arithmetic_dataset / "stats.json").read_text())
    assert (len(train), len(test)) == (stats["splits"]["train"], stats["splits"]["test"])
    with pytest.raises(FileNotFoundError, match="validation"):
        load_split(str(arithmetic_dataset), "validation")


def test_overlong_rows_fail_or_are_dropped_with_their_reason_never_truncated(tiny_qwen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    long_answer = "<think>\n" + "I keep adding numbers. " * 40 + "\n</think>\n\n\\boxed{1}"
    rows = conversation_rows([*PAIRS, ("Long one?", long_answer)])
    split = tokenize_split(rows, tokenizer, max_length=120, weighted=False)
    with pytest.raises(LintError, match=r"1 row\(s\) are longer than max_length=120.*problem p2"):
        lint_rows(split, "fail", 120)
    report = lint_rows(split, "drop", 120)
    assert report["excluded"] == {"overlong": 1} and report["rows_trained"] == 2
    assert [e["problem_id"] for e in split.excluded] == ["p2"]
    assert all(length <= 120 for length in split.rows["length"])


def test_a_template_that_strips_the_think_block_stops_training(tiny_qwen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    # DeepSeek-R1-Distill's template keeps only what follows </think> in assistant turns.
    tokenizer.chat_template = tokenizer.chat_template.replace(
        "message['content']",
        "(message['content'].split('</think>')[-1].lstrip() if message['role'] == 'assistant' "
        "else message['content'])",
    )
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": ANSWER}], tokenize=False
    )
    assert "<think>" not in rendered, "the test template should strip the think block"
    split = tokenize_split(conversation_rows(PAIRS), tokenizer, max_length=None, weighted=False)
    with pytest.raises(LintError, match="removes the <think> block"):
        lint_rows(split, "drop", None)


def test_a_template_that_drops_the_answer_stops_training(tiny_qwen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}"
        "<|im_start|>user\n{{ m['content'] }}<|im_end|>\n{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    split = tokenize_split(conversation_rows(PAIRS), tokenizer, max_length=None, weighted=False)
    with pytest.raises(LintError, match="template"):
        lint_rows(split, "drop", None)


def test_rows_without_an_assistant_turn_are_excluded_with_their_reason(tiny_qwen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    rows = conversation_rows(PAIRS).to_list()
    rows[1]["messages"] = rows[1]["messages"][:1]
    split = tokenize_split(type(conversation_rows(PAIRS)).from_list(rows), tokenizer, max_length=None, weighted=False)
    assert lint_rows(split, "drop", None)["excluded"] == {"no_assistant_turn": 1}
    assert split.excluded[0]["problem_id"] == "p1"


def test_end_of_turn_token_masked_by_a_pad_equals_eos_collator_is_caught(tiny_qwen, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    eot_id, eot_token = end_of_turn_token(tokenizer)
    assert eot_token == "<|im_end|>" and tokenizer.pad_token_id == eot_id  # SmolLM2: pad == eos, the trap
    split = tokenize_split(conversation_rows(PAIRS), tokenizer, max_length=None, weighted=False)
    trainer = make_trainer(tiny_qwen, split.rows, tmp_path)
    assert lint_collated(trainer, eot_id, eot_token) == 2  # TRL's collator keeps it: labels are masked by position

    real = trainer.data_collator

    def masks_pad_ids(examples):  # the classic collator bug, injected: labels[input_ids == pad] = -100
        batch = real(examples)
        batch["labels"][batch["input_ids"] == tokenizer.pad_token_id] = -100
        return batch

    trainer.data_collator = masks_pad_ids
    with pytest.raises(LintError, match=r"<\|im_end\|>.*never learn to stop"):
        lint_collated(trainer, eot_id, eot_token)


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "recipes" / "sft").glob("*.yaml")))
def test_every_sft_recipe_parses_with_trls_parser(recipe):
    distill, cfg, model = make_parser().parse_args_and_config(
        ["--config", str(ROOT / "recipes" / "sft" / recipe), "--bf16", "false"]
    )
    assert model.model_name_or_path and distill.dataset and cfg.output_dir
    if cfg.chat_template_path:
        assert (ROOT / cfg.chat_template_path).exists()


def test_the_shipped_llama3_template_keeps_the_think_block(tiny_qwen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    tokenizer.chat_template = (ROOT / "prompts" / "chat_templates" / "llama3.jinja").read_text()
    split = tokenize_split(conversation_rows(PAIRS), tokenizer, max_length=None, weighted=False)
    assert lint_rows(split, "fail", None)["rows_trained"] == 2
    row = split.rows[0]
    trained = [t for t, m in zip(row["input_ids"], row["completion_mask"], strict=True) if m]
    assert tokenizer.decode(trained) == ANSWER + "<|eot_id|>"


def test_an_unknown_recipe_field_is_an_error_that_names_it(tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: smollm2-135m-instruct\nlearning_rat: 1.0e-4\n")
    assert distill_main(["sft", "--config", str(recipe)]) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_tokenized_rows_are_cached_by_rows_tokenizer_and_settings(tiny_qwen, tmp_path, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    rows = conversation_rows(PAIRS, [3.0, 1.0])
    first = tokenize_split(rows, tokenizer, max_length=None, weighted=True, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("tokenized-*.arrow"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds these rows")

    monkeypatch.setattr("sft.data._tokenize_row", fail)
    again = tokenize_split(rows, tokenizer, max_length=None, weighted=True, cache_dir=tmp_path)
    assert again.rows.to_list() == first.rows.to_list()  # read from the cache: the tokenizer did not run
    with pytest.raises(AssertionError, match="tokenized again"):  # another setting is another key
        tokenize_split(rows, tokenizer, max_length=None, weighted=False, cache_dir=tmp_path)


def _stored_topk_rows(tokenizer, k: int = 3, mangle: bool = False) -> datasets.Dataset:
    """Rows as `distill build` writes them with `sampling.teacher_topk: k`: the teacher's token ids (ending with the
    end-of-turn token, as vLLM returns them) and a top-k per token, here made up but distinct per position."""
    rows = []
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, (question, answer) in enumerate(PAIRS):
        # Tokenized in two pieces: ids the text tokenizer would not produce for the whole string.
        ids = tokenizer(answer[:5], add_special_tokens=False)["input_ids"]
        ids += tokenizer(answer[5:], add_special_tokens=False)["input_ids"] + [eot]
        if mangle:
            ids = [(t + 7) % len(tokenizer) for t in ids]  # what another tokenizer's ids read as here
        topk = [[(t + j * 11) % len(tokenizer) for j in range(k)] for t in ids]
        logprobs = [[-0.2 - j - 0.01 * p for j in range(k)] for p in range(len(ids))]
        rows.append(
            {
                "problem_id": f"p{i}",
                "sample_index": 0,
                "messages": [{"role": "user", "content": question}, {"role": "assistant", "content": "rebuilt"}],
                "answer": answer.split("</think>")[-1].strip(),
                "weight": 1.0,
                "completion_token_ids": ids,
                "topk_token_ids": [t for row in topk for t in row],
                "topk_logprobs": [lp for row in logprobs for lp in row],
                "teacher_topk": k,
            }
        )
    return datasets.Dataset.from_list(rows)


def test_stored_kd_trains_on_the_teachers_own_token_ids_with_its_topk_aligned(tiny_qwen, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    rows = _stored_topk_rows(tokenizer)
    split = tokenize_split(rows, tokenizer, max_length=None, weighted=False, teacher_tokens=True)
    assert split.excluded == []
    distill = DistillArguments(kd_source="stored", kd_alpha=0.5, kd_temperature_schedule="constant")
    trainer = make_trainer(tiny_qwen, split.rows, tmp_path, distill)
    source = {r["problem_id"]: r for r in rows}
    for row in trainer.train_dataset:
        teacher_ids = source[row["problem_id"]]["completion_token_ids"]
        prompt = tokenizer.apply_chat_template(
            source[row["problem_id"]]["messages"][:1], add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
        batch = trainer.data_collator([row])
        ids, labels = batch["input_ids"][0], batch["labels"][0]
        assert ids.tolist() == prompt + teacher_ids  # not a re-tokenization of the text ("rebuilt")
        assert labels[labels != -100].tolist() == teacher_ids
        k = source[row["problem_id"]]["teacher_topk"]
        stored = torch.tensor(source[row["problem_id"]]["topk_token_ids"]).view(-1, k)
        assert batch["topk_ids"].shape == (1, len(ids), k)
        assert torch.equal(batch["topk_ids"][0, len(prompt) :], stored)  # token j's row is the top-k it came from
        assert torch.isinf(batch["topk_logprobs"][0, : len(prompt)]).all()
    # The loss the trainer computes equals the full-logits reference of the same sparse KD.
    batch = trainer.data_collator(list(trainer.train_dataset))
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch)).item()
        labels = batch["labels"]
        scored = labels[:, 1:] != -100
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1][scored]
        target = labels[:, 1:][scored]
        temperature = distill.kd_temperature_start
        kl = sparse_kl_teacher_student(
            logits, batch["topk_ids"][:, 1:][scored], batch["topk_logprobs"][:, 1:][scored], temperature
        )
        ce = torch.nn.functional.cross_entropy(logits, target, reduction="none")
        expected = (0.5 * temperature**2 * kl.mean() + 0.5 * ce.mean()).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    assert kl.mean().item() > 0.01  # a random student is far from the made-up teacher: the KD term counts


def test_stored_kd_refuses_token_ids_another_tokenizer_wrote(tiny_qwen):
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen)
    split = tokenize_split(_stored_topk_rows(tokenizer, mangle=True), tokenizer, None, False, teacher_tokens=True)
    assert {e["reason"] for e in split.excluded} == {"teacher_tokenizer_mismatch"}
    with pytest.raises(LintError, match="shares the teacher's tokenizer"):
        lint_rows(split, "drop", None)
