r"""`distill sft` of a 1.5B Qwen2 student on 8k/16k/32k-token rows: tokens/s, MFU and peak GPU memory, our
memory-bounded loss against TRL's default loss (and TRL's Liger path when liger-kernel is there), and the longest
length each fits (issue 14, acceptance 6).

    # here, once (fills an ignored folder: wheels the GPU machine lacks, and the embedded model's tokenizer)
    .venv/bin/python benchmarks/sft_long_context.py --prepare runs/gpu-carry
    # on the GPU machine (torch, transformers, peft, accelerate there; no internet), carrying runs/gpu-carry:
    python3 benchmarks/sft_long_context.py --wheels runs/gpu-carry --tokenizer runs/gpu-carry/tokenizer \
        --out $OUT/sft_long_context.json
    # here, on the CPU: the same path on a tiny student, lengths 256/512, 2 steps, float32, no GPU figures
    .venv/bin/python benchmarks/sft_long_context.py --smoke --out /tmp/sft_long_context_smoke.json

The student is a random-initialized Qwen2 from `recipes/models/qwen2-1.5b.json` (Qwen2.5-1.5B's architecture, no
weights are downloaded), built in bf16 and saved with the embedded model's tokenizer (SmolLM2's, 49,152 ids, all
valid rows of the 151,936-row embedding); its bos/eos/pad ids are set to the tokenizer's. The datasets are
`distill build`-shaped folders (`DIR/data/train-*.parquet` with `messages`, `weight`, `problem_id`,
`sample_index`): a short prompt and an assistant answer of random pseudo-words sized with the tokenizer so that the
whole chat-templated row is the target length (to the token where the tokenizer allows; the table gives the mean).

Each (loss path, length) is one `distill sft --config RECIPE` in a fresh process (this file with `--child`, which
calls `sft.train.main` with the recipe's flags and adds a measuring callback), so allocator caches and peaks never
carry over and an out-of-memory run cannot take the next one with it. Loss paths: `ours` is `weighted_loss: true`
(sft/losses.py, the lm_head applied per chunk of positions); `trl` is `weighted_loss: false` with no teacher, so TRL's
own loss runs unchanged (full [tokens, vocab] logits); `trl-liger` adds `use_liger_kernel: true`, TRL's path with
Liger's fused linear cross-entropy, if liger-kernel imports. All runs: bf16, batch 1, gradient checkpointing
(non-reentrant), `attn_implementation` flash_attention_2 when flash_attn imports else sdpa, `--steps` optimizer
steps of which the first `--warmup` are not timed, `save_strategy: no`, `use_peft: false`. The trained weights are
random and thrown away: the child skips `trainer.save_model` (3 GB a run, a tenth of the budget; it happens after
the timed steps, so no figure changes).

Figures. tokens/s: real tokens of the timed steps over the wall time from the end of the last warm-up step to the
end of the last step (CUDA synchronized at each step end). Peak memory: `torch.cuda.max_memory_allocated()` over the
whole child process (weights, AdamW states, activations, loss), in GB of 10^9 bytes; the allocator's reserved peak
beside it. MFU: achieved model FLOPs/s over `--peak-tflops` (H100/H200 SXM bf16 dense: 989), with model FLOPs per
token = 6 * N + 12 * L * H * S (PaLM, Chowdhery et al. 2022, appendix B): N the weights a token is multiplied by, i.e.
the non-embedding parameters plus the lm_head (V x H, which is the tied embedding table used as a matmul: 233M of
Qwen2-1.5B's 1.54B; the embedding lookup itself is no matmul), and the attention term over the row's length S, not
halved for the causal mask. Gradient checkpointing's recomputed forward is hardware work, not model FLOPs, and is not
counted. The JSON keeps N, the non-embedding count and the attention term, so any other convention can be recomputed.
An out-of-memory child exits with code 3 and is recorded as "OOM"; a longer length of the same path is then not run
(recorded as OOM, not run). `--budget-s` bounds the whole script (the device allows 10 minutes a command): runs that
cannot start in time are recorded as skipped.

Wheels. The GPU machine has torch, transformers, peft, accelerate, pyarrow, pandas, xxhash, pyyaml, but not trl,
datasets, dill, multiprocess or liger-kernel. `--wheels DIR` installs the ones missing or at another version than
pinned below into a private folder (`pip install --no-deps --no-index --find-links DIR --target SITE`), put first
on the children's PYTHONPATH; pyarrow only where the machine's is older than datasets' floor (24). `--prepare DIR`
fills DIR here: the `pip download` it prints, and the tokenizer files (DIR/tokenizer).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CONFIG_1_5B = ROOT / "recipes" / "models" / "qwen2-1.5b.json"
OOM_EXIT = 3  # a child that ran out of GPU memory
CARRY_LIMIT = 64 * 2**20  # what the device machine's working tree may hold, carried folders included
# Pinned to the versions this project is tested with (pyproject.toml ranges; the .venv's versions).
WHEELS = {"trl": "1.16.0", "datasets": "5.2.0", "dill": "0.4.1", "multiprocess": "0.70.19"}
OPTIONAL_WHEELS = {"liger-kernel": "0.8.5"}  # the trl-liger path runs only where it installs
PYARROW = ("pyarrow", "26.0.1", 24)  # carried only for a machine whose pyarrow is older than datasets 5.2's floor
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
LOSS_PATHS = {
    "ours": {"weighted_loss": True},
    "trl": {"weighted_loss": False},
    "trl-liger": {"weighted_loss": False, "use_liger_kernel": True},
}


# --------------------------------------------------------------------------------------------------- model FLOPs


@dataclass(frozen=True)
class ParamCounts:
    non_embedding: int  # decoder layers and the final norm
    embedding: int  # the input embedding table, V x H
    lm_head: int  # V x H: multiplied by every token, tied or not

    @property
    def matmul(self) -> int:
        """The N of 6 * N: every weight a token's activations are multiplied by."""
        return self.non_embedding + self.lm_head


def param_counts(config) -> ParamCounts:
    """Qwen2's parameters from its config (q/k/v projections carry a bias, o_proj and the MLP none)."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = (h * q + q) + 2 * (h * kv + kv) + q * h + 3 * h * inter + 2 * h  # attention, MLP, two RMSNorms
    return ParamCounts(
        non_embedding=layers * per_layer + h, embedding=config.vocab_size * h, lm_head=config.vocab_size * h
    )


def flops_per_token(config, seq_len: float) -> dict:
    """Model FLOPs per trained token (forward and backward) at a row length of `seq_len`: 6 * N + 12 * L * H * S."""
    counts = param_counts(config)
    dense = 6 * counts.matmul
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len
    return {"total": dense + attention, "dense": dense, "attention": attention, "n_matmul": counts.matmul}


# --------------------------------------------------------------------------------------------------- carried files


def download_command(dest: Path, with_pyarrow: bool = True) -> list[str]:
    pins = {**WHEELS, **OPTIONAL_WHEELS} | ({PYARROW[0]: PYARROW[1]} if with_pyarrow else {})
    platforms = [f"--platform={p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")]
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version=3.12",
        "--implementation=cp",
        *platforms,
        "-d",
        str(dest),
        *(f"{k}=={v}" for k, v in pins.items()),
    ]


def prepare(dest: Path, with_pyarrow: bool) -> None:
    """Fill `dest` with what the GPU machine lacks: the wheels (Python 3.12, x86-64) and the tokenizer files."""
    from pipeline.models import EMBEDDED_ALIAS, resolve_model

    dest.mkdir(parents=True, exist_ok=True)
    command = download_command(dest, with_pyarrow)
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True)
    source = Path(resolve_model(EMBEDDED_ALIAS).path)
    (dest / "tokenizer").mkdir(exist_ok=True)
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            shutil.copy2(source / name, dest / "tokenizer" / name)
    files = sorted(p for p in dest.rglob("*") if p.is_file())
    for p in files:
        print(f"{p.stat().st_size / 1e6:9.2f} MB  {p.relative_to(dest)}")
    total = sum(p.stat().st_size for p in files)
    print(
        f"{total / 1e6:9.2f} MB  in all ({total / CARRY_LIMIT:.0%} of the 64 MiB a device call carries, the "
        "repository's own files included)"
    )


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def install_wheels(wheels: Path, site: Path) -> list[str]:
    """pip-install from `wheels` (no index, no dependencies) what this machine lacks; returns what was installed."""
    wanted = [f"{k}=={v}" for k, v in WHEELS.items() if _version(k) != v]
    have = {p.name.split("-")[0].replace("_", "-").lower() for p in wheels.glob("*.whl")}
    wanted += [f"{k}=={v}" for k, v in OPTIONAL_WHEELS.items() if _version(k) != v and k in have]
    arrow = _version(PYARROW[0])
    if arrow is None or int(arrow.split(".")[0]) < PYARROW[2]:
        wanted.append(f"{PYARROW[0]}=={PYARROW[1]}")
    if not wanted:
        return []
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "-q",
        "--no-deps",
        "--no-index",
        "--no-compile",
        "--no-cache-dir",
        "--find-links",
        str(wheels),
        "--target",
        str(site),
        *wanted,
    ]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command).returncode != 0:
        raise SystemExit(
            f"installing {wanted} from {wheels} failed; fill it here with:\n  {' '.join(download_command(wheels))}"
        )
    return wanted


# --------------------------------------------------------------------------------------------------- student, rows


def student_config(smoke: bool, tokenizer):
    from transformers import Qwen2Config

    if smoke:  # tiny, but the real vocabulary: the loss's [tokens, V] shape is the one that matters
        config = Qwen2Config(
            vocab_size=151936,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1e6,
            tie_word_embeddings=True,
        )
    else:
        config = Qwen2Config.from_json_file(str(CONFIG_1_5B))
    if len(tokenizer) > config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} ids, more than the student's {config.vocab_size} rows")
    # Qwen's special ids (151643...) mean nothing to this tokenizer: the student stops and pads on its ids.
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    config.pad_token_id = tokenizer.pad_token_id
    return config


def build_student(config, tokenizer, folder: Path, dtype, device: str) -> int:
    """A random-initialized Qwen2 saved with the tokenizer; returns its parameter count (checked against the
    config's, so the FLOPs formula counts the model that trains)."""
    import torch
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    counted = sum(p.numel() for p in model.parameters())  # a tied lm_head is counted once
    counts = param_counts(config)
    if counted != counts.non_embedding + counts.embedding:
        raise RuntimeError(f"the student has {counted} parameters; its config gives {counts}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return counted


_SYLLABLES = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"]


def _words(rng: random.Random, n: int) -> list[str]:
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(1, 3))) for _ in range(n)]


def _conversation(prompt: str, words: list[str], filler: int) -> list[dict]:
    answer = "<think>\n" + " ".join(words) + " a" * filler + "\n</think>\n\nThe answer is \\boxed{42}."
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def _n_tokens(tokenizer, messages: list[dict]) -> int:
    return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])


def sized_conversation(tokenizer, length: int, seed: int) -> tuple[list[dict], int]:
    """A prompt and an answer of random words whose chat-templated tokens number `length`, or as close below it as
    the tokenizer allows: the most words that fit (found by bisection: every word is at least one token), then
    one-token fillers (" a") up to the length."""
    rng = random.Random(seed)
    prompt = f"Problem {seed}: read the words below, then give the answer in \\boxed{{}}."
    pool = _words(rng, length)
    if _n_tokens(tokenizer, _conversation(prompt, [], 0)) > length:
        raise ValueError(f"length {length} is shorter than an empty conversation")
    lo, hi = 0, length  # tokens(lo) <= length; tokens(length words) > length
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _n_tokens(tokenizer, _conversation(prompt, pool[:mid], 0)) <= length else (lo, mid)
    filler, n = 0, _n_tokens(tokenizer, _conversation(prompt, pool[:lo], 0))
    while n < length:
        more = _n_tokens(tokenizer, _conversation(prompt, pool[:lo], filler + 1))
        if more > length or more <= n:
            break
        filler, n = filler + 1, more
    return _conversation(prompt, pool[:lo], filler), n


def write_dataset(folder: Path, tokenizer, length: int, rows: int) -> list[int]:
    """A `distill build`-shaped folder of `rows` rows of `length` tokens; returns the rows' token counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    conversations = [sized_conversation(tokenizer, length, seed=length + i) for i in range(rows)]
    table = pa.table(
        {
            "problem_id": [f"synthetic-{length}-{i}" for i in range(rows)],
            "sample_index": [0] * rows,
            "messages": [messages for messages, _ in conversations],
            "weight": [1.0] * rows,
        }
    )
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "data" / "train-00000-of-00001.parquet")
    return [n for _, n in conversations]


# --------------------------------------------------------------------------------------------------- one run (child)


def recipe(student: Path, dataset: Path, output: Path, loss: str, length: int, args) -> dict:
    """The `distill sft` recipe of one run: every field is an SFTConfig, ModelConfig or DistillArguments field."""
    return {
        "model_name_or_path": str(student),
        "dtype": "float32" if args.smoke else "bfloat16",
        "attn_implementation": args.attn,
        "use_peft": False,
        "dataset": str(dataset),
        "max_length": length,
        "overlong": "fail",  # every row is sized to fit: one that does not is a bug of this script
        "output_dir": str(output),
        "max_steps": args.steps,
        "per_device_train_batch_size": 1,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-5,
        "lr_scheduler_type": "constant",
        "bf16": not args.smoke,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": 1,
        "save_strategy": "no",
        "eval_strategy": "no",
        "report_to": "none",
        "dataloader_num_workers": 0,
        "seed": 0,
        **LOSS_PATHS[loss],
    }


def child(spec_path: Path) -> int:
    """Run `distill sft --config RECIPE` (sft.train.main) with a step timer and a token counter; write the result."""
    spec = json.loads(spec_path.read_text())
    import torch
    import transformers

    import sft.train

    gpu = torch.cuda.is_available()
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    seen: dict = {}

    class StepTimer(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sync()
            seen["collator"].tokens.clear()  # drop the batches sft.lint collated to check the rows
            seen["begin"], seen["ends"] = time.perf_counter(), []

        def on_step_end(self, args, state, control, **kwargs):
            sync()
            seen["ends"].append(time.perf_counter())

    class CountingCollator:
        """Real tokens of each batch, in order: batch i is step i (batch 1, no accumulation)."""

        def __init__(self, inner):
            self.inner, self.tokens = inner, []

        def __call__(self, examples):
            self.tokens.append(sum(len(e["input_ids"]) for e in examples))
            return self.inner(examples)

    class MeasuredTrainer(sft.train.DistillSFTTrainer):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.data_collator = seen["collator"] = CountingCollator(self.data_collator)
            self.add_callback(StepTimer())
            seen["trainer"] = self

        def save_model(self, *a, **kw):  # random weights, thrown away: see the module docstring
            return None

    sft.train.DistillSFTTrainer = MeasuredTrainer
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    result = {"loss": spec["loss"], "length": spec["length"], "versions": _versions()}
    try:
        sft.train.main(["--config", spec["recipe"]])
    except Exception as e:  # an OOM is a result; anything else is re-raised
        if not _is_oom(e):
            raise
        result |= {"status": "OOM", "error": str(e).splitlines()[0][:300]}
        result |= _memory(gpu)
        Path(spec["result"]).write_text(json.dumps(result))
        return OOM_EXIT
    warmup, ends, tokens = spec["warmup"], seen["ends"], seen["collator"].tokens
    start = ends[warmup - 1] if warmup else seen["begin"]
    timed = tokens[warmup : len(ends)]
    seconds = ends[-1] - start
    history = seen["trainer"].state.log_history
    result |= {
        "status": "ok",
        "steps": len(ends),
        "timed_steps": len(timed),
        "timed_tokens": sum(timed),
        "timed_seconds": seconds,
        "tokens_per_s": sum(timed) / seconds if seconds > 0 else None,
        "mean_row_tokens": sum(tokens[: len(ends)]) / len(ends),
        "losses": [e["loss"] for e in history if "loss" in e],
        **_memory(gpu),
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return 0


def _is_oom(e: BaseException) -> bool:
    import torch

    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def _memory(gpu: bool) -> dict:
    import torch

    if not gpu:
        return {"peak_gb": None, "peak_reserved_gb": None}
    return {
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9,
        "peak_reserved_gb": torch.cuda.max_memory_reserved() / 1e9,
    }


def _versions() -> dict:
    return {
        k: _version(k) for k in ("torch", "transformers", "trl", "datasets", "liger-kernel", "pyarrow", "flash-attn")
    }


# --------------------------------------------------------------------------------------------------- the benchmark


def _child_env(site: Path | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    paths = [str(site)] if site else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _importable(module: str, env: dict) -> bool:
    return subprocess.run([sys.executable, "-c", f"import {module}"], env=env, capture_output=True).returncode == 0


def run_one(
    work: Path, student: Path, datasets: dict, loss: str, length: int, args, env: dict, timeout: float
) -> dict:
    import yaml

    folder = work / f"{loss}-{length}"
    folder.mkdir()
    (folder / "recipe.yaml").write_text(
        yaml.safe_dump(recipe(student, datasets[length], folder / "out", loss, length, args))
    )
    spec = {
        "recipe": str(folder / "recipe.yaml"),
        "result": str(folder / "result.json"),
        "loss": loss,
        "length": length,
        "warmup": args.warmup,
    }
    (folder / "spec.json").write_text(json.dumps(spec))
    print(f"-- {loss} at {length}: distill sft --config {folder / 'recipe.yaml'}", flush=True)
    started = time.perf_counter()
    with open(folder / "log.txt", "w") as log:
        try:
            rc = subprocess.run(
                [sys.executable, __file__, "--child", str(folder / "spec.json")],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                cwd=ROOT,
            ).returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall = time.perf_counter() - started
    if rc in (0, OOM_EXIT) and (folder / "result.json").exists():
        result = json.loads((folder / "result.json").read_text())
    else:
        tail = (folder / "log.txt").read_text().splitlines()[-25:]
        status = "timeout" if rc is None else "error"
        result = {"loss": loss, "length": length, "status": status, "returncode": rc, "log_tail": tail}
        print("\n".join(tail), flush=True)
    result["wall_s"] = wall
    return result


def add_rates(result: dict, config, peak_tflops: float | None) -> dict:
    if result.get("status") != "ok" or not result.get("tokens_per_s"):
        return result
    flops = flops_per_token(config, result["mean_row_tokens"])
    result["model_flops_per_token"] = flops
    result["mfu"] = result["tokens_per_s"] * flops["total"] / (peak_tflops * 1e12) if peak_tflops else None
    return result


def table(results: list[dict]) -> str:
    lines = [f"{'loss path':<11}{'length':>7}{'tokens/s':>11}{'MFU':>8}{'peak GB':>9}{'reserved':>9}  first/last loss"]
    for r in results:
        head = f"{r['loss']:<11}{r['length']:>7}"
        if r["status"] != "ok":
            note = {"OOM": "OOM", "not_run": f"OOM (not run: {r.get('reason', '')})"}.get(r["status"], r["status"])
            lines.append(f"{head}  {note if r['status'] != 'skipped' else 'skipped: ' + r.get('reason', '')}")
            continue
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.1%}"
        peak = "-" if r.get("peak_gb") is None else f"{r['peak_gb']:.1f}"
        reserved = "-" if r.get("peak_reserved_gb") is None else f"{r['peak_reserved_gb']:.1f}"
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f}/{losses[-1]:.3f}" if losses else "-"
        lines.append(f"{head}{r['tokens_per_s']:>11.0f}{mfu:>8}{peak:>9}{reserved:>9}  {loss}")
    return "\n".join(lines)


def longest_fit(results: list[dict]) -> dict:
    out: dict = {}
    for r in results:
        if r["status"] in ("ok", "OOM", "not_run"):
            out.setdefault(r["loss"], None)
            if r["status"] == "ok":
                out[r["loss"]] = max(out[r["loss"]] or 0, r["length"])
    return out


def benchmark(args) -> dict:
    started = time.perf_counter()
    import torch
    from transformers import AutoTokenizer

    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="sft-long-", dir=args.workdir))
    site = None
    installed: list[str] = []
    if args.wheels:
        site = work / "site"
        installed = install_wheels(Path(args.wheels), site)
    env = _child_env(site)
    if args.attn == "auto":
        args.attn = "flash_attention_2" if _importable("flash_attn", env) else "sdpa"
    losses = [x for x in args.losses.split(",") if x]
    unknown = sorted(set(losses) - set(LOSS_PATHS))
    if unknown:
        raise SystemExit(f"--losses: unknown {unknown}; choose from {sorted(LOSS_PATHS)}")
    results: list[dict] = []
    if "trl-liger" in losses and not _importable("liger_kernel.transformers", env):
        losses.remove("trl-liger")
        results += [
            {"loss": "trl-liger", "length": n, "status": "skipped", "reason": "liger-kernel not installed"}
            for n in args.lengths
        ]

    if args.tokenizer:
        tokenizer_path = args.tokenizer
    else:
        from pipeline.models import EMBEDDED_ALIAS, resolve_model

        tokenizer_path = resolve_model(EMBEDDED_ALIAS).path
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = student_config(args.smoke, tokenizer)
    gpu = torch.cuda.is_available() and not args.smoke
    student = work / "student"
    params = build_student(
        config, tokenizer, student, torch.float32 if args.smoke else torch.bfloat16, "cuda" if gpu else "cpu"
    )
    # Sized with the tokenizer as the student's folder loads it, which is what training uses: transformers reads it
    # back as a Qwen2Tokenizer (the folder's model_type), which merges "\n\n" where SmolLM2's own does not.
    tokenizer = AutoTokenizer.from_pretrained(student)
    datasets = {}
    row_tokens = {}
    for length in args.lengths:
        datasets[length] = work / f"dataset-{length}"
        row_tokens[length] = write_dataset(datasets[length], tokenizer, length, args.steps)
    print(
        f"student: {params / 1e6:.1f}M parameters in {student}; rows: "
        f"{ {n: sum(t) / len(t) for n, t in row_tokens.items()} } tokens; setup {time.perf_counter() - started:.0f}s",
        flush=True,
    )

    for loss in losses:
        failed_at = None
        for length in sorted(args.lengths):
            if failed_at is not None:
                results.append(
                    {"loss": loss, "length": length, "status": "not_run", "reason": f"{failed_at} did not fit"}
                )
                continue
            left = args.budget_s - (time.perf_counter() - started)
            if left < args.min_run_s:
                results.append({"loss": loss, "length": length, "status": "skipped", "reason": "time budget"})
                continue
            result = run_one(work, student, datasets, loss, length, args, env, timeout=left)
            results.append(add_rates(result, config, None if args.smoke else args.peak_tflops))
            print(table(results[-1:]).splitlines()[-1], flush=True)
            if result["status"] == "OOM":
                failed_at = length

    order = {k: i for i, k in enumerate(LOSS_PATHS)}
    results.sort(key=lambda r: (order[r["loss"]], r["length"]))
    report = {
        "smoke": args.smoke,
        "device": torch.cuda.get_device_name() if gpu else "cpu",
        "student": {
            "config": "smoke" if args.smoke else str(CONFIG_1_5B.relative_to(ROOT)),
            "parameters": params,
            "matmul_parameters": param_counts(config).matmul,
            "non_embedding_parameters": param_counts(config).non_embedding,
        },
        "settings": {
            "steps": args.steps,
            "warmup": args.warmup,
            "batch": 1,
            "attn_implementation": args.attn,
            "dtype": "float32" if args.smoke else "bfloat16",
            "gradient_checkpointing": True,
            "peak_tflops": None if args.smoke else args.peak_tflops,
        },
        "flops_formula": "6 * (non-embedding params + lm_head V*H) + 12 * layers * hidden * seq_len per token",
        "row_tokens": row_tokens,  # each dataset's rows, chat-templated, in tokens
        "wheels_installed": installed,
        "results": results,
        "longest_fit": longest_fit(results),
        "seconds": time.perf_counter() - started,
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="CPU: tiny student, lengths 256/512, 2 steps, float32")
    parser.add_argument("--lengths", type=int, nargs="+", help="row lengths in tokens (default 8192 16384 32768)")
    parser.add_argument("--losses", default="ours,trl,trl-liger", help=f"comma-separated, of {list(LOSS_PATHS)}")
    parser.add_argument("--steps", type=int, help="optimizer steps per run (default 5; smoke 2)")
    parser.add_argument("--warmup", type=int, help="steps not timed (default 2; smoke 1)")
    parser.add_argument("--attn", default="auto", help="attn_implementation; auto: flash_attention_2 if importable")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU bf16 dense peak (H100/H200 SXM: 989)")
    parser.add_argument("--budget-s", type=float, default=560.0, help="the whole script's wall time")
    parser.add_argument("--min-run-s", type=float, default=45.0, help="start no run with less time than this left")
    parser.add_argument("--wheels", help="folder of wheels to install from first (no index, no deps)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the embedded model's)")
    parser.add_argument("--workdir", help="where the temporary student, datasets and runs go (default: TMPDIR)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (recipes, logs, results)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    parser.add_argument("--prepare", type=Path, metavar="DIR", help="here: download the wheels and copy the tokenizer")
    parser.add_argument("--no-pyarrow", action="store_true", help="with --prepare: leave out pyarrow's 55 MB wheel")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.prepare:
        prepare(args.prepare, not args.no_pyarrow)
        return 0
    args.lengths = args.lengths or ([256, 512] if args.smoke else [8192, 16384, 32768])
    args.steps = args.steps or (2 if args.smoke else 5)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 2)
    if not 0 <= args.warmup < args.steps:
        parser.error("--warmup must be smaller than --steps (something must be timed)")
    report = benchmark(args)
    print(table(report["results"]))
    print("longest length that fits:", json.dumps(report["longest_fit"]))
    print(f"total {report['seconds']:.0f}s; MFU formula: {report['flops_formula']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    failed = [r for r in report["results"] if r["status"] in ("error", "timeout")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
