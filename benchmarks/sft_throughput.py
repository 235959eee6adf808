"""Trained tokens/s and padding waste of `distill sft`'s default batching against TRL's defaults, on the same rows.

    .venv/bin/python benchmarks/sft_throughput.py                  # CPU: a small random Qwen2 student, ~3 minutes
    .venv/bin/python benchmarks/sft_throughput.py --hidden 896 --layers 24 --steps 50 --batch 16 --flash  # 0.5B, GPU

Same rows for both (chain-of-thought answers of log-normal length, like a teacher's), same model and batch size,
runs alternated so that machine noise hits both. TRL's defaults: random order, padded to the longest row of each
batch. Ours: with a varlen attention kernel (flash attention, GPU) padding-free batches, otherwise batches bucketed
by length. Padding waste = padded positions / all positions the model computes; trained tokens = real tokens.
On a GPU the script also reports MFU (6 * parameters * tokens/s over the GPU's bf16 peak, --peak-tflops).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
from trl import SFTConfig, SFTTrainer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.models import EMBEDDED_ALIAS, resolve_model  # noqa: E402
from sft.config import DistillArguments  # noqa: E402
from sft.data import tokenize_split  # noqa: E402
from sft.trainer import DistillSFTTrainer  # noqa: E402


def conversations(n: int, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        steps = int(np.clip(rng.lognormal(2.2, 0.8), 1, 40))  # 1 to 40 sentences (< 1024 tokens: no TRL truncation)
        a, b = (int(x) for x in rng.integers(10, 99, 2))
        reasoning = " ".join(f"Step {k}: {a} + {k} * {b} = {a + k * b}." for k in range(steps))
        answer = f"<think>\n{reasoning}\n</think>\n\nThe answer is \\boxed{{{a + steps * b}}}."
        rows.append(
            {
                "problem_id": f"p{i}",
                "messages": [
                    {"role": "user", "content": f"Sum {a} and {b}."},
                    {"role": "assistant", "content": answer},
                ],
                "weight": 1.0,
            }
        )
    return datasets.Dataset.from_list(rows)


class CountingCollator:
    """Wraps a trainer's collator to count real and computed positions of every batch."""

    def __init__(self, inner):
        self.inner, self.real, self.computed = inner, 0, 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real += sum(len(e["input_ids"]) for e in examples)
        self.computed += batch["input_ids"].numel()
        return batch


def student(folder: Path, hidden: int, layers: int, tokenizer) -> Path:
    heads = max(hidden // 64, 1)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(heads // 4, 1),
        tie_word_embeddings=True,
    )
    Qwen2ForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(kind: str, model_dir: Path, rows: datasets.Dataset, args, out: Path) -> dict:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    gpu = torch.cuda.is_available()
    attn = "flash_attention_2" if gpu and args.flash else "sdpa"
    common = dict(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        report_to="none",
        save_strategy="no",
        logging_steps=args.steps,
        bf16=gpu,
        learning_rate=1e-4,
        seed=0,
        model_init_kwargs={"dtype": torch.bfloat16 if gpu else torch.float32, "attn_implementation": attn},
    )
    if kind == "trl-defaults":
        trainer = SFTTrainer(
            model=str(model_dir),
            args=SFTConfig(**common),
            train_dataset=rows.select_columns(["messages"]),
            processing_class=tokenizer,
        )
    else:
        split = tokenize_split(rows, tokenizer, max_length=None, weighted=False)
        padding_free = attn.startswith("flash")
        cfg = SFTConfig(
            **common,
            max_length=None,
            padding_free=padding_free,
            train_sampling_strategy="random" if padding_free else "group_by_length",
        )
        trainer = DistillSFTTrainer(
            model=str(model_dir),
            args=cfg,
            train_dataset=split.rows,
            processing_class=tokenizer,
            distill=DistillArguments(),
        )
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    params = sum(p.numel() for p in trainer.model.parameters())
    result = {
        "tokens_per_s": counter.real / seconds,
        "padding_waste": 1 - counter.real / counter.computed,
        "seconds": seconds,
        "params": params,
    }
    if gpu:
        result["mfu"] = 6 * params * result["tokens_per_s"] / (args.peak_tflops * 1e12)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds of both configurations")
    parser.add_argument("--flash", action="store_true", help="GPU: use flash_attention_2 (padding-free batches)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100/H200 SXM: 989)")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(EMBEDDED_ALIAS).path)
    rows = conversations(args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = student(Path(tmp) / "student", args.hidden, args.layers, tokenizer)
        results: dict[str, list[dict]] = {"trl-defaults": [], "distill": []}
        for r in range(args.rounds):
            for kind in results:
                results[kind].append(measure(kind, model_dir, rows, args, Path(tmp) / f"{kind}-{r}"))
                print(kind, {k: round(v, 4) for k, v in results[kind][-1].items()}, flush=True)
    best = {k: max(v, key=lambda x: x["tokens_per_s"]) for k, v in results.items()}
    trl, ours = best["trl-defaults"], best["distill"]
    print(
        f"params {ours['params'] / 1e6:.1f}M, {args.rows} rows, batch {args.batch}, {args.steps} steps, "
        f"best of {args.rounds}"
    )
    print(f"{'':14}{'tokens/s':>10}{'padding waste':>15}")
    for name, r in (("TRL defaults", trl), ("distill", ours)):
        print(f"{name:14}{r['tokens_per_s']:>10.0f}{r['padding_waste']:>15.1%}")
    print(f"distill / TRL defaults: {ours['tokens_per_s'] / trl['tokens_per_s']:.2f}x trained tokens/s")
    if "mfu" in ours:
        print(f"MFU: TRL defaults {trl['mfu']:.1%}, distill {ours['mfu']:.1%}")


if __name__ == "__main__":
    main()
