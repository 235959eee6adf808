"""Does logit distillation beat plain SFT for a pruned student? Both train the same pruned SmolLM2 (8 of 30 layers)
on the same teacher completions for the same steps; the held-out loss on unseen teacher completions decides.

    .venv/bin/python benchmarks/kd_vs_sft.py                 # 160 problems, 40 steps each: 15-20 minutes on 2 cores
    .venv/bin/python benchmarks/kd_vs_sft.py --problems 80 --steps 60 --batch 4 --max-new-tokens 64   # 4 epochs

Teacher completions come from the embedded SmolLM2-135M-Instruct itself, go through the real `distill build` (25% of
problems held out as the test split), and both students are trained by the real `distill sft` with the same learning
rate, batch and steps. They are sampled from the teacher's own distribution (temperature 1, no top_p): only then is
the held-out loss E[-log q(y)] = H(teacher) + KL(teacher || student), the quantity distillation aims at.
`--sample-temperature 0.6` measures on DeepSeek-R1-style sharpened samples instead.

    .venv/bin/python benchmarks/kd_vs_sft.py --kd-source stored   # sparse KD from the top-20 stored at generation

`--kd-source stored` (issue 14): the teacher answers through the real `distill generate` (in-process vLLM, n=1 at
temperature 1, `sampling.teacher_topk: 20`), its raw rows are marked passed and built by `distill build`, and the same
pruned student trains twice on exactly the teacher's token ids: `kd_source: stored` with kd_alpha 0 (cross-entropy
only) and with kd_alpha 0.5 (the stored top-20, T 1). The measure is the held-out KL(teacher || student) per
completion token on the test split, over the full vocabulary with the teacher loaded, on the teacher's own tokens.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.build.config import BuildConfig  # noqa: E402
from pipeline.build.stage import build  # noqa: E402
from pipeline.models import EMBEDDED_ALIAS, resolve_model  # noqa: E402
from pipeline.parts import PartWriter  # noqa: E402
from pipeline.records import VERIFIED_SCHEMA  # noqa: E402
from sft.heldout import completion_loss  # noqa: E402


def _questions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    kinds = [
        "What is {a} + {b}?",
        "What is {a} times {b}?",
        "A shop sells {a} apples in the morning and {b} in the afternoon. How many apples does it sell?",
        "Tom has {a} marbles and gives {b} away. How many are left?",
    ]
    return [kinds[i % len(kinds)].format(a=int(rng.integers(2, 90)), b=int(rng.integers(2, 40))) for i in range(n)]


@torch.no_grad()
def teacher_completions(
    questions: list[str], max_new_tokens: int, temperature: float, batch_size: int = 32
) -> list[str]:
    path = resolve_model(EMBEDDED_ALIAS).path
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    torch.manual_seed(0)
    texts = []
    for start in range(0, len(questions), batch_size):
        chats = [[{"role": "user", "content": q}] for q in questions[start : start + batch_size]]
        enc = tokenizer.apply_chat_template(
            chats, add_generation_prompt=True, return_tensors="pt", return_dict=True, padding=True
        )
        out = model.generate(
            **enc,
            do_sample=True,
            temperature=temperature,
            top_p=1.0 if temperature == 1 else 0.95,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return texts


def _verified_row(i: int, question: str, completion: str) -> dict:
    """A completion as `distill verify` leaves it; marked passed: this compares fitting the teacher, not truth."""
    return {
        "problem_id": f"q{i}",
        "sample_index": 0,
        "source": "kd-benchmark",
        "domain": "text",
        "prompt": question,
        "reference": "",
        "metadata": "{}",
        "messages": json.dumps([{"role": "user", "content": question}]),
        "completion": completion,
        "reasoning": "teacher completion",
        "answer": completion.strip(),
        "finish_reason": "stop",
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "mean_token_entropy": 0.5,
        "entropy_top_k": 5,
        "teacher": EMBEDDED_ALIAS,
        "sampling": "{}",
        "config_hash": "kd",
        "verifier": "text",
        "status": "passed",
        "passed": True,
        "reason": "teacher_completion",
        "verdict_detail": "{}",
        "failed_filters": [],
    }


def make_dataset(run_dir: Path, problems: int, max_new_tokens: int, temperature: float) -> Path:
    questions = _questions(problems)
    texts = teacher_completions(questions, max_new_tokens, temperature)
    with PartWriter(run_dir / "verified", max_rows=64, max_seconds=3600, schema=VERIFIED_SCHEMA) as writer:
        for i, (q, t) in enumerate(zip(questions, texts, strict=True)):
            writer.add([_verified_row(i, q, t)])
    build(run_dir, BuildConfig(near_dup_threshold=None, exact_dedup=False, test_fraction=0.25), base_dir=run_dir)
    return run_dir / "dataset"


def _distill(*args: str) -> None:
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"distill {' '.join(args)} failed:\n{done.stderr[-3000:]}")


def generate_with_topk(run_dir: Path, questions: list[str], max_new_tokens: int, topk: int) -> Path:
    """`distill generate` with the teacher's top-k kept, then every row marked passed and `distill build`."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    source = run_dir / "questions.jsonl"
    source.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q}) + "\n" for i, q in enumerate(questions)))
    recipe = {
        "name": "kd-stored",
        "sources": [{"type": "file", "path": str(source), "name": "kd-benchmark", "domain": "text"}],
        "sampling": {"n": 1, "temperature": 1.0, "top_p": 1.0, "max_tokens": max_new_tokens, "teacher_topk": topk},
        "output": {"runs_dir": str(run_dir)},
    }
    (run_dir / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    _distill("generate", str(run_dir / "recipe.yaml"), "--no-verify", "-q")
    run = run_dir / "kd-stored"
    (run / "verified").mkdir(exist_ok=True)
    for part in sorted((run / "raw").glob("part-*.parquet")):
        table = pq.read_table(part)
        n = table.num_rows
        verdicts = {
            "verifier": ["text"] * n,
            "status": ["passed"] * n,
            "passed": [True] * n,
            "reason": ["teacher_completion"] * n,  # this compares fitting the teacher, not truth
            "verdict_detail": ["{}"] * n,
            "failed_filters": [[]] * n,
            "verify_hash": [""] * n,
        }
        for name, values in verdicts.items():
            field = VERIFIED_SCHEMA.field(name)
            table = table.append_column(field, pa.array(values, field.type))
        pq.write_table(table.select(VERIFIED_SCHEMA.names), run / "verified" / part.name)
    build(run, BuildConfig(near_dup_threshold=None, exact_dedup=False, test_fraction=0.25), base_dir=run)
    return run / "dataset"


@torch.no_grad()
def heldout_kl(student: str, dataset: str, batch_size: int = 8) -> float:
    """Mean KL(teacher || student) per completion token of the test split, on the teacher's own token ids, over the
    full vocabulary (the teacher loaded here, at T 1)."""
    import torch.nn.functional as F

    from sft.data import load_split, tokenize_split

    teacher_path = resolve_model(EMBEDDED_ALIAS).path
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    rows = tokenize_split(load_split(dataset, "test"), tokenizer, None, False, teacher_tokens=True).rows
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (teacher_path, student)]
    total, count = 0.0, 0
    for row_ids, mask in zip(rows["input_ids"], rows["completion_mask"], strict=True):
        ids = torch.tensor([row_ids])
        keep = torch.tensor(mask[1:], dtype=torch.bool)
        teacher, student_logits = (m(input_ids=ids).logits[0, :-1][keep] for m in models)
        vocab = min(teacher.shape[-1], student_logits.shape[-1])
        log_p = F.log_softmax(teacher[:, :vocab], -1)
        log_q = F.log_softmax(student_logits[:, :vocab], -1)
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += int(keep.sum())
    return total / max(count, 1)


def _student_and_sft_args(workdir: Path, dataset: Path, layers: int, steps: int, batch: int) -> tuple[Path, list]:
    """The pruned student both runs start from, and the `distill sft` arguments they share."""
    student = workdir / f"student-{layers}"
    _distill("student", "init", "--from", EMBEDDED_ALIAS, "--layers", str(layers), "--output", str(student))
    common = ["sft", "--config", "recipes/sft/demo-cpu.yaml", "--dataset", str(dataset)]
    common += ["--model_name_or_path", str(student), "--use_peft", "false", "--merge_lora", "false"]
    common += ["--weighted_loss", "false", "--learning_rate", "3e-4", "--max_steps", str(steps)]
    common += ["--per_device_train_batch_size", str(batch), "--save_strategy", "no", "--seed", "0"]
    return student, common


def run_stored(workdir: Path, problems: int, steps: int, layers: int, max_new_tokens: int, batch: int) -> dict:
    started = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    dataset = generate_with_topk(workdir / "runs", _questions(problems), max_new_tokens, topk=20)
    student, common = _student_and_sft_args(workdir, dataset, layers, steps, batch)
    common += ["--kd_source", "stored", "--kd_temperature_schedule", "constant", "--kd_temperature_start", "1"]
    stats = json.loads((dataset / "stats.json").read_text())
    results = {"problems": problems, "steps": steps, "layers": layers, "teacher_topk": stats.get("teacher_topk")}
    results["before"] = heldout_kl(str(student), str(dataset))
    for name, alpha in (("ce", "0"), ("stored_kd", "0.5")):
        _distill(*common, "--output_dir", str(workdir / name), "--kd_alpha", alpha)
        results[name] = heldout_kl(str(workdir / name), str(dataset))
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def run(
    workdir: Path,
    problems: int = 160,
    steps: int = 40,
    layers: int = 8,
    max_new_tokens: int = 96,
    sample_temperature: float = 1.0,
    batch: int = 8,
) -> dict:
    started = time.monotonic()
    shutil.rmtree(workdir, ignore_errors=True)
    dataset = make_dataset(workdir / "run", problems, max_new_tokens, sample_temperature)
    student, common = _student_and_sft_args(workdir, dataset, layers, steps, batch)
    results = {
        "problems": problems,
        "steps": steps,
        "layers": layers,
        "sample_temperature": sample_temperature,
        "before": completion_loss(str(student), str(dataset)),
    }
    for name, extra in (("sft", []), ("kd", ["--teacher_model_name_or_path", EMBEDDED_ALIAS])):
        _distill(*common, "--output_dir", str(workdir / name), *extra)
        results[name] = completion_loss(str(workdir / name), str(dataset))
    results["teacher"] = completion_loss(EMBEDDED_ALIAS, str(dataset))
    results["seconds"] = round(time.monotonic() - started, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problems", type=int, default=160)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--sample-temperature", type=float, default=1.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--workdir", type=Path, default=ROOT / "runs" / "bench-kd")
    parser.add_argument("--kd-source", choices=["model", "stored"], default="model")
    args = parser.parse_args()
    if args.kd_source == "stored":
        r = run_stored(args.workdir, args.problems, args.steps, args.layers, args.max_new_tokens, args.batch)
        print(json.dumps(r, indent=2))
        print(
            f"held-out KL(teacher || student) per completion token: pruned student untrained {r['before']:.3f}, "
            f"CE only {r['ce']:.3f}, stored top-20 KD {r['stored_kd']:.3f}; KD/CE = {r['stored_kd'] / r['ce']:.3f}"
        )
        return
    r = run(
        args.workdir, args.problems, args.steps, args.layers, args.max_new_tokens, args.sample_temperature, args.batch
    )
    print(json.dumps(r, indent=2))
    print(
        f"held-out loss per completion token on teacher completions: pruned student untrained {r['before']:.3f}, "
        f"SFT {r['sft']:.3f}, KD {r['kd']:.3f} (teacher itself {r['teacher']:.3f}); "
        f"KD/SFT = {r['kd'] / r['sft']:.3f}"
    )


if __name__ == "__main__":
    main()
