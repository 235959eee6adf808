"""SFT fixtures: a dataset made by the real `distill build` from verified arithmetic chains of thought, and tiny
randomly initialized Qwen2/Llama students that share the embedded model's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from trl import SFTConfig

from pipeline.build.config import BuildConfig
from pipeline.build.stage import build
from pipeline.models import EMBEDDED_ALIAS, resolve_model
from pipeline.parts import PartWriter
from pipeline.records import VERIFIED_SCHEMA
from sft.config import DistillArguments
from sft.trainer import DistillSFTTrainer


def arithmetic_row(p: int, a: int, b: int, weight_entropy: float, sample_index: int = 0) -> dict:
    prompt = f"What is {a} + {b}? Put the final answer in \\boxed{{}}."
    reasoning = f"I add {a} and {b}. {a} + {b} = {a + b}."
    answer = f"The answer is \\boxed{{{a + b}}}."
    return {
        "problem_id": f"add-{p}",
        "sample_index": sample_index,
        "source": "arithmetic",
        "domain": "math",
        "prompt": prompt,
        "reference": str(a + b),
        "metadata": "{}",
        "messages": json.dumps([{"role": "user", "content": prompt}]),
        "completion": f"<think>\n{reasoning}\n</think>\n\n{answer}",
        "reasoning": reasoning,
        "answer": answer,
        "finish_reason": "stop",
        "prompt_tokens": 20,
        "completion_tokens": 30,
        "mean_token_entropy": weight_entropy,
        "entropy_top_k": 5,
        "teacher": "synthetic",
        "sampling": "{}",
        "config_hash": "c",
        "verifier": "math",
        "status": "passed",
        "passed": True,
        "reason": "correct",
        "verdict_detail": "{}",
        "failed_filters": [],
    }


def build_arithmetic_dataset(run_dir: Path, problems: int = 48) -> Path:
    """Verified parts -> `distill build` -> RUN/dataset (the real builder, so SFT reads the real contract)."""
    rng = np.random.default_rng(0)
    with PartWriter(run_dir / "verified", max_rows=32, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        for p in range(problems):
            a, b = (int(x) for x in rng.integers(10, 99, size=2))
            writer.add([arithmetic_row(p, a, b, float(rng.uniform(0.05, 0.9)))])
    build(run_dir, BuildConfig(near_dup_threshold=None, test_fraction=0.25), base_dir=run_dir)
    return run_dir / "dataset"


@pytest.fixture(scope="session")
def arithmetic_dataset(tmp_path_factory) -> Path:
    return build_arithmetic_dataset(tmp_path_factory.mktemp("sft-data") / "run")


@pytest.fixture(scope="session")
def embedded_path() -> str:
    return resolve_model(EMBEDDED_ALIAS).path


def tiny_student(family: str, folder: Path, tokenizer_path: str, **config) -> Path:
    """A 2-layer student of the given family with the embedded model's tokenizer (head_dim 64: vLLM's CPU kernels);
    `config` overrides or adds config fields (more layers, per-layer attention types)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    shape = (
        dict(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            tie_word_embeddings=True,
        )
        | config
    )
    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM), "llama": (LlamaConfig, LlamaForCausalLM)}[
        family
    ]
    model = model_cls(config_cls(**shape))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def conversation_rows(pairs: list[tuple[str, str]], weights: list[float] | None = None) -> datasets.Dataset:
    """Rows in the dataset contract's shape (messages, weight, problem_id) without going through a build."""
    return datasets.Dataset.from_list(
        [
            {
                "problem_id": f"p{i}",
                "sample_index": 0,
                "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                "weight": (weights or [1.0] * len(pairs))[i],
            }
            for i, (q, a) in enumerate(pairs)
        ]
    )


def make_trainer(model_dir: Path, rows, out: Path, distill: DistillArguments | None = None, teacher=None, **cfg):
    """The real DistillSFTTrainer over already tokenized rows, as `distill sft` builds it."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=str(out), max_length=None, report_to="none", bf16=False, **cfg)
    return DistillSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
        args=args,
        train_dataset=rows,
        processing_class=tokenizer,
        distill=distill or DistillArguments(),
        teacher=teacher,
    )


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, embedded_path) -> Path:
    return tiny_student("qwen2", tmp_path_factory.mktemp("tiny-qwen2"), embedded_path)
