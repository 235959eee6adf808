"""`distill run`: every stage of one recipe in order (generate -> verify -> build -> student init -> sft -> eval).

    distill run --config recipes/demo-run.yaml            # the CPU demo: embedded teacher, pruned student
    distill run --config recipes/demo-run.yaml eval.limit=10

Each stage records its state in RUN/stages/STAGE.json with the hash of its inputs: its part of the recipe and the
hashes of the stages before it. A stage marked done with the same hash is skipped; any other is run, and the stages
resume their own partial work (generate keeps its closed parts, sft its checkpoints, eval its generations). So a
run stopped anywhere, by Ctrl-C or a crash, is resumed by running the same command, and changing a section re-runs
that stage and everything after it. The generate stage's inputs are resolved (the problems' content, the template
texts, the teacher's revision); when they differ from the generation in RUN, the whole run goes to a new folder
RUN-HASH named by them and RUN is kept untouched, since its rows answer other problems or settings. A student folder
trained under other inputs is moved aside, never resumed from and never deleted. Every decision is a line of
RUN/run.log.

SFT runs as a process of its own (`distill sft --config RUN/sft.yaml`, or `accelerate launch --config_file X` of it
when the recipe names an `accelerate_config`), so it can train on all of a node's GPUs and leaves eval a clean one.
Its stderr passes through and its exit code decides: a failure stops the run with the child's last error line in
run.log. The child has a process group of its own, so that only the run decides when it stops: an interrupt of the
run (Ctrl-C, SIGTERM) is passed to it as SIGTERM, and what is left of its group (accelerate's workers too) after
SFT_GRACE_S is killed.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, model_validator

from eval.config import EvalConfig
from pipeline.config import Recipe, load_recipe, validate
from pipeline.config_base import RecipeError, Strict
from pipeline.generate.config import GymSource
from pipeline.parts import write_atomic_bytes
from pipeline.records import fingerprint
from pipeline.verify.stage import verify_hash


class StudentInitConfig(Strict):
    """Start the student from the teacher's own layers (`distill student init`)."""

    layers: int = Field(ge=1, description="decoder layers the student keeps")
    strategy: str = Field("even", pattern="^(even|first)$", description="evenly spaced layers or the first K")
    source: str | None = Field(None, description="model to prune; default: the teacher")


class RunRecipe(Recipe):
    """A generate recipe plus the stages after it; a section left out skips its stage."""

    student: StudentInitConfig | None = Field(None, description="prune the teacher into the student's start")
    sft: dict[str, Any] | None = Field(
        None,
        description="`distill sft` fields (TRL SFTConfig, ModelConfig, ours); dataset, output_dir and, with a "
        "student section, model_name_or_path are set by the run",
    )
    eval: dict[str, Any] | None = Field(
        None,
        description="`distill eval` fields; models (teacher, student before and after), output and "
        "exclude_prompts_from are set by the run, max_tokens defaults to sampling.max_tokens",
    )
    accelerate_config: str | None = Field(
        None,
        description="an `accelerate config` file (relative to the recipe): SFT is started by `accelerate launch "
        "--config_file` with it (all its GPUs and processes); default: one `distill sft` process",
    )

    @model_validator(mode="after")
    def _eval_seeds_disjoint(self) -> RunRecipe:
        train_seeds = {s.seed for s in self.sources if isinstance(s, GymSource)}
        for b in (self.eval or {}).get("benchmarks", []):
            if isinstance(b, dict) and b.get("type") == "reasoning_gym" and b.get("seed", 0) in train_seeds:
                raise ValueError(f"eval benchmark {b.get('name', b)}: seed {b.get('seed', 0)} is a training seed")
        return self


def load_run_recipe(path: Path, overrides: list[str] = ()) -> RunRecipe:
    recipe = load_recipe(path, overrides, model=RunRecipe)
    if recipe.eval is not None:  # unknown eval fields fail now, not after hours of generation and training
        validate(EvalConfig, _eval_fields(recipe), f"run recipe {path}", prefix="eval.")
    if recipe.sft is not None:
        from trl import ModelConfig, SFTConfig

        from sft.config import DistillArguments

        known = {f.name for dc in (DistillArguments, SFTConfig, ModelConfig) for f in dataclasses.fields(dc)}
        unknown = sorted(set(recipe.sft) - known)
        if unknown:
            raise RecipeError(f"run recipe {path}: unknown sft field(s) {', '.join(unknown)} (see distill sft --help)")
    if recipe.accelerate_config is not None and not _accelerate_config(recipe).is_file():
        raise RecipeError(f"run recipe {path}: accelerate_config {_accelerate_config(recipe)} is not a file")
    return recipe


def _accelerate_config(recipe: RunRecipe) -> Path:
    return Path(recipe.base_dir) / recipe.accelerate_config


def _folders(recipe: RunRecipe) -> dict[str, Path]:
    run = recipe.run_dir
    return {"dataset": run / "dataset", "init": run / "student-init", "student": run / "student", "eval": run / "eval"}


def _sft_fields(recipe: RunRecipe) -> dict[str, Any]:
    folders = _folders(recipe)
    fields = dict(recipe.sft or {}) | {"dataset": str(folders["dataset"]), "output_dir": str(folders["student"])}
    if recipe.student:
        fields["model_name_or_path"] = str(folders["init"])
    return fields


def _before_training(recipe: RunRecipe) -> str:
    if recipe.student:
        return str(_folders(recipe)["init"])
    return (recipe.sft or {}).get("model_name_or_path", "")


def _eval_fields(recipe: RunRecipe) -> dict[str, Any]:
    folders = _folders(recipe)
    models = [f"teacher={recipe.teacher.model}"]
    if recipe.sft is not None:
        before = _before_training(recipe)
        models += [f"student-before={before}"] if before else []
        models += [f"student-after={folders['student']}"]
    fields = dict(recipe.eval or {})
    # The teacher's engine settings, made reproducible; eval.engine changes single fields of them.
    engine = recipe.teacher.model_dump(exclude={"model", "revision"}) | {"reproducible": True}
    fields["engine"] = engine | fields.get("engine", {})
    defaults = {"max_tokens": recipe.sampling.max_tokens, "seed": recipe.sampling.seed or 0}
    set_by_run = {"models": models, "output": str(folders["eval"]), "exclude_prompts_from": [str(folders["dataset"])]}
    return defaults | fields | set_by_run


class StageLog:
    """Stage decisions on stderr and appended to RUN/run.log, each line stamped with the time."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "run.log"
        run_dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, message: str) -> None:
        line = f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} [{stage}] {message}"
        print(f"distill run: {line}", file=sys.stderr, flush=True)
        with self.path.open("a") as f:  # a log for people: a torn last line after a crash loses nothing
            f.write(line + "\n")


def _generate_inputs(recipe: RunRecipe) -> dict[str, Any]:
    """What the teacher's rows depend on, resolved: the problems' content (an edited file row keeps its id), the
    template texts, and the teacher's revision (retrained weights keep their folder and config.json)."""
    from pipeline.generate.render import Renderer
    from pipeline.generate.sources import problems_digest, stream_problems
    from pipeline.generate.teacher.base import logprobs_mode
    from pipeline.models import resolve_model

    problems = stream_problems(recipe.sources, Path(recipe.base_dir), rejects=[])
    renderer = Renderer(recipe.templates, recipe.system_prompt, Path(recipe.base_dir))
    teacher = resolve_model(recipe.teacher.model, recipe.teacher.revision)
    return {
        "sources": [s.model_dump(mode="json") for s in recipe.sources],
        "problems": problems_digest(problems),
        "templates": renderer.templates_hash(),
        "sampling": recipe.sampling.model_dump(),
        # What the teacher is, not how it is served: more concurrency must not retrain the student.
        "teacher": {"model": recipe.teacher.model, "revision": teacher.revision},
        # Entropies measured on two distributions must not share a run (as generate's own fingerprint says).
        "logprobs_mode": logprobs_mode(recipe.teacher.backend, recipe.sampling.teacher_topk)
        if recipe.sampling.logprobs or recipe.sampling.teacher_topk
        else None,
    }


def _sft_inputs(recipe: RunRecipe) -> Any:
    """The sft section, and the accelerate config's content when there is one: its process count sets the global
    batch, its mixed precision and DeepSpeed stage the numbers, so another one trains another student."""
    if recipe.accelerate_config is None:
        return recipe.sft  # the hash of every run recipe without one stays what it was
    return {"sft": recipe.sft, "accelerate_config": _accelerate_config(recipe).read_text()}


def _stage_hashes(recipe: RunRecipe, generate_inputs: dict[str, Any] | None = None) -> dict[str, str]:
    sections = {
        "generate": generate_inputs if generate_inputs is not None else _generate_inputs(recipe),
        "verify": verify_hash(recipe.verify),
        "build": recipe.build.model_dump(),
        "student": recipe.student.model_dump() if recipe.student else None,
        "sft": _sft_inputs(recipe),
        "eval": _eval_fields(recipe) if recipe.eval is not None else None,
    }
    hashes: dict[str, str] = {}
    upstream = {
        "generate": [],
        "verify": ["generate"],
        "build": ["verify"],
        "student": [],
        "sft": ["build", "student"],
    }
    upstream["eval"] = ["sft", "student", "build"]
    for stage, inputs in sections.items():
        hashes[stage] = fingerprint({"inputs": inputs, "after": [hashes[u] for u in upstream[stage]]})
    return hashes


def _stages(recipe: RunRecipe) -> list[str]:
    stages = ["generate", "verify", "build"]
    stages += ["student"] if recipe.student else []
    stages += ["sft"] if recipe.sft is not None else []
    stages += ["eval"] if recipe.eval is not None else []
    return stages


def _run_stage(stage: str, recipe: RunRecipe, quiet: bool, log: StageLog) -> str | None:
    """Run one stage; returns a reason the run cannot go on (infrastructure errors to retry), or None."""
    folders = _folders(recipe)
    if stage == "generate":
        from pipeline.generate.stage import generate

        stats = generate(recipe, quiet=quiet)
        return f"{stats['infra_errors']} problems failed on infrastructure errors" if stats["infra_errors"] else None
    if stage == "verify":
        from pipeline.verify.stage import verify_run

        stats = verify_run(recipe.run_dir, recipe.verify, quiet=quiet)
        return f"{stats['infra_error']} verdicts failed on infrastructure errors" if stats["infra_error"] else None
    if stage == "build":
        from pipeline.build.stage import build

        recipe_yaml = yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
        vhash = verify_hash(recipe.verify)
        stats = build(recipe.run_dir, recipe.build, Path(recipe.base_dir), recipe_yaml, quiet=quiet, verify_hash=vhash)
        return None if stats["kept"] else "no row was kept: nothing to train on (see build_exclusions.parquet)"
    if stage == "student":
        from sft.prune import prune_layers

        init = recipe.student
        if not folders["init"].exists():  # the pruned folder appears atomically, complete or not at all
            prune_layers(init.source or recipe.teacher.model, init.layers, folders["init"], strategy=init.strategy)
        return None
    if stage == "sft":
        config = recipe.run_dir / "sft.yaml"
        write_atomic_bytes(config, yaml.safe_dump(_sft_fields(recipe), sort_keys=False).encode())
        _launch_sft(_sft_command(recipe, config), log)
        return None
    from eval.evaluate import evaluate

    report = evaluate(EvalConfig.model_validate(_eval_fields(recipe)), quiet=quiet)
    failed = {m: report["incomplete"][m] for m in report["needs_retry"]}
    return f"infrastructure errors in the evaluation: {failed}" if failed else None


SFT_GRACE_S = 120.0  # for an interrupted SFT to finish the checkpoint it is saving and exit
ERROR_TAIL_BYTES = 4096  # of the child's stderr, kept to name its error in run.log


class StageFailed(RuntimeError):
    """A stage's own process failed: the run stops (exit 2), the message carries the process's last error line."""


def _sft_command(recipe: RunRecipe, config: Path) -> list[str]:
    sft = ["-m", "pipeline.cli", "sft", "--config", str(config)]
    if recipe.accelerate_config is None:
        return [sys.executable, *sft]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_accelerate_config(recipe)), *sft]


class _Relay(threading.Thread):
    """Copies a child's stderr to ours as it comes (progress bars included) and keeps its end."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.tail = ""

    def run(self) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := os.read(self.stream.fileno(), 65536):
            text = decoder.decode(chunk)
            self.tail = (self.tail + text)[-ERROR_TAIL_BYTES:]
            try:
                sys.stderr.write(text)
                sys.stderr.flush()
            except (OSError, ValueError):  # our stderr is gone (a closed pipe): keep draining, or the child blocks
                pass

    def last_error(self) -> str:
        lines = [line.strip() for line in self.tail.replace("\r", "\n").splitlines() if line.strip()]
        return lines[-1] if lines else "(nothing on stderr)"


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a member we may not signal: still there
        return True
    return True


def _stop_group(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM to the child (`distill sft` turns it into an interrupt; accelerate's and torchrun's launchers pass it
    to their workers, once), then SIGKILL to whatever of its process group is left after `grace_s`."""
    pgid = process.pid
    if process.poll() is None:
        process.terminate()
    deadline = time.monotonic() + grace_s
    try:
        while _group_alive(pgid) and time.monotonic() < deadline:  # a launcher can end before its workers
            process.poll()  # reaps the child: a zombie would keep the group alive
            time.sleep(0.2)
    finally:  # a second interrupt does not wait any longer
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        process.wait()


def _launch_sft(command: list[str], log: StageLog, grace_s: float = SFT_GRACE_S) -> None:
    """Run SFT in its own process group, so that only this process decides when it is interrupted."""
    process = subprocess.Popen(command, stderr=subprocess.PIPE, process_group=0)
    relay = _Relay(process.stderr)
    relay.start()
    try:
        log("sft", f"training in process {process.pid}: {shlex.join(command)}")
        code = process.wait()
    except BaseException:  # Ctrl-C, SIGTERM (raised as KeyboardInterrupt by `distill`), anything: no orphan
        _stop_group(process, grace_s)
        raise
    finally:
        relay.join(5)  # the pipe closes when the last writer ends; a worker left holding it is not waited for
    if _group_alive(process.pid):  # the launcher exited and left workers: they must not outlive the stage
        _stop_group(process, grace_s)
    if code == 130 or code == -signal.SIGINT:  # interrupted from outside this run (e.g. its own terminal group)
        raise KeyboardInterrupt(f"distill sft (process {process.pid}) was interrupted")
    if code != 0:
        raise StageFailed(f"distill sft (process {process.pid}) exited with code {code}: {relay.last_error()}")
    log("sft", f"process {process.pid} exited with code 0")


def _set_aside(stage: str, recipe: RunRecipe, old_hash: str, log: StageLog) -> None:
    """A student trained (or pruned) under other inputs is kept, renamed, so that no checkpoint is resumed wrongly."""
    folder = {"student": _folders(recipe)["init"], "sft": _folders(recipe)["student"]}.get(stage)
    if folder is not None and folder.exists():
        aside = folder.with_name(f"{folder.name}.{old_hash[:8]}")
        os.replace(folder, aside)
        log(stage, f"inputs changed since {folder} was made: moved it to {aside}")


def _run_folder(recipe: RunRecipe, generate_hash: str) -> tuple[RunRecipe, str | None]:
    """The recipe's own folder, unless it holds a generation of other inputs: rows of two settings never share a
    folder, and the old one is kept whole, so this recipe goes to RUNS_DIR/NAME-HASH (HASH: its generate inputs).
    Returns the recipe to run and, when it moved, why."""
    state_file = recipe.run_dir / "stages" / "generate.json"
    if not state_file.exists():
        return recipe, None
    previous = json.loads(state_file.read_text())["hash"]
    if previous == generate_hash:
        return recipe, None
    moved = recipe.model_copy(update={"name": f"{recipe.name}-{generate_hash[:8]}"})
    return moved, (
        f"{recipe.run_dir} holds a generation of other inputs (generate hash {previous}; this recipe's is "
        f"{generate_hash}): it is kept as it is, and this recipe runs in {moved.run_dir}"
    )


def run(recipe: RunRecipe, quiet: bool = False) -> int:
    """Run or resume every stage; 0 when all are done, 3 when infrastructure errors need a re-run."""
    run_started = time.monotonic()
    generate_inputs = _generate_inputs(recipe)
    recipe, moved = _run_folder(recipe, _stage_hashes(recipe, generate_inputs)["generate"])
    log = StageLog(recipe.run_dir)
    if moved:
        log("run", moved)
    states = recipe.run_dir / "stages"
    states.mkdir(parents=True, exist_ok=True)
    hashes = _stage_hashes(recipe, generate_inputs)
    log("run", f"recipe {recipe.name}: stages {' -> '.join(_stages(recipe))}")
    for stage in _stages(recipe):
        state_file = states / f"{stage}.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else None
        if state and state["hash"] == hashes[stage] and state["status"] == "done":
            log(stage, f"skipped: complete and inputs unchanged (hash {hashes[stage]})")
            continue
        if state and state["hash"] != hashes[stage]:
            _set_aside(stage, recipe, state["hash"], log)
        resuming = state is not None and state["hash"] == hashes[stage]
        log(stage, f"{'resuming' if resuming else 'starting'} (hash {hashes[stage]})")
        started = time.monotonic()
        state = {"stage": stage, "hash": hashes[stage], "status": "running"}
        write_atomic_bytes(state_file, json.dumps(state).encode())
        try:
            problem = _run_stage(stage, recipe, quiet, log)
        except KeyboardInterrupt:
            log(stage, f"interrupted after {time.monotonic() - started:.0f} s; run the same command to resume")
            raise
        except StageFailed as e:
            log(stage, f"failed after {time.monotonic() - started:.0f} s: {e}")
            raise
        seconds = time.monotonic() - started
        if problem:
            log(stage, f"stopped after {seconds:.0f} s: {problem}; run the same command again to retry")
            return 3
        write_atomic_bytes(state_file, json.dumps(state | {"status": "done", "seconds": seconds}).encode())
        log(stage, f"done in {seconds:.0f} s")
    report = f"; report: {_folders(recipe)['eval'] / 'report.md'}" if recipe.eval is not None else ""
    log("run", f"all stages done in {time.monotonic() - run_started:.0f} s{report}")
    return 0
