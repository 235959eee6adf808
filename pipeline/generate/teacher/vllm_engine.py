"""The in-process vLLM engine (`vllm.LLM`): the highest-throughput backend on one node.

`LLM.generate` returns only when every prompt is done, which would hold hours of completions in memory and lose
them all on a crash. We drive the same engine step by step instead (what `LLM.generate` does inside), keeping a
bounded window of requests queued so the batch stays full while finished completions stream out to the parts.

The engine's settings depend on where it runs (`engine_settings`): the ones measured fastest on CPU (float32, eager)
there, vLLM's own on a GPU (the model's dtype, CUDA graphs, a share of GPU memory, tensor/pipeline parallelism).
The managed server (`vllm_server`) builds its command line from the same resolved settings.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from collections.abc import Iterable, Iterator
from functools import cache
from typing import Any

from pipeline.generate.completion import Completion, TopK, mean_topk_entropy
from pipeline.generate.config import SamplingConfig, TeacherConfig
from pipeline.generate.teacher.base import (
    PROCESSED_LOGPROBS,
    RAW_LOGPROBS,
    Teacher,
    TeacherConfigError,
    TeacherRequest,
    TeacherResult,
    vllm_env,
    vllm_version,
)
from pipeline.models import ResolvedModel
from pipeline.records import THINK_OPEN


def sampling_params(sampling: SamplingConfig):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        # One request serves both: the entropy keeps its own k of them, sparse KD its teacher_topk.
        logprobs=max(sampling.logprobs, sampling.teacher_topk) or None,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


@cache
def running_on_cpu() -> bool:
    """vLLM's own platform detection (its CPU build, or no accelerator it supports). Importing vLLM costs seconds,
    once per process; on a GPU it asks NVML and creates no CUDA context, so a parent that only starts a server takes
    no GPU memory."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def engine_settings(
    cfg: TeacherConfig, on_cpu: bool | None = None, logprobs_mode: str = PROCESSED_LOGPROBS
) -> dict[str, Any]:
    """The vllm.LLM keywords of `cfg` on this platform (`on_cpu`: given, or detected): the CPU defaults are float32
    and eager (start-up 60 s instead of 200 s); on a GPU, vLLM's auto dtype (bf16 for a bf16 model), CUDA graphs and
    the GPU memory share. Explicit `dtype`/`enforce_eager` win everywhere; `engine_kwargs` come last (the config
    refuses one that repeats a field). The model, the seed and the reasoning parser are not among them.
    `logprobs_mode`: teacher.base.logprobs_mode of the run (raw_logprobs for sparse KD)."""
    cpu = running_on_cpu() if on_cpu is None else on_cpu
    settings: dict[str, Any] = {
        "dtype": "float32" if cpu and cfg.dtype == "auto" else cfg.dtype,
        "enforce_eager": cpu if cfg.enforce_eager is None else cfg.enforce_eager,
        "max_model_len": cfg.max_model_len,
        "max_num_seqs": cfg.max_num_seqs,
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "pipeline_parallel_size": cfg.pipeline_parallel_size,
        "logprobs_mode": logprobs_mode,  # see teacher.base.logprobs_mode
    }
    if not cpu:  # vLLM's CPU build sizes its KV cache from VLLM_CPU_KVCACHE_SPACE instead
        settings["gpu_memory_utilization"] = cfg.gpu_memory_utilization
    return settings | cfg.engine_kwargs


def load_llm(
    model: ResolvedModel,
    cfg: TeacherConfig,
    seed: int | None = None,
    in_process: bool | None = None,
    logprobs_mode: str = PROCESSED_LOGPROBS,
):
    """Start the engine with `engine_settings`. `in_process` (default: cfg.reproducible) runs the engine's scheduler
    in this process: the same seed and requests then give the same samples, and a process killed with SIGKILL (a Ray
    actor) leaves no engine process behind."""
    os.environ.update(vllm_env())
    # Read at engine start. Once an in-process engine has run, vLLM caches its settings: later engines of this
    # process stay in-process too.
    in_process = cfg.reproducible if in_process is None else in_process
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    from vllm import LLM

    # Per-request seeds crash the CPU build (see SamplingConfig.seed): the engine gets the seed.
    return LLM(model.path, seed=seed if seed is not None else 0, **engine_settings(cfg, logprobs_mode=logprobs_mode))


def engine_input(engine, prompt_token_ids: list[int]):
    """The prompt as the engine takes it (what `LLM.generate` passes, vLLM 0.32 and 0.33): rendered by the engine's
    renderer; a raw `{"prompt_token_ids": ...}` dict is deprecated."""
    from vllm.inputs import TokensPrompt

    (rendered,) = engine.renderer.render_cmpl([TokensPrompt(prompt_token_ids=prompt_token_ids)])
    return rendered


class VLLMEngineTeacher(Teacher):
    engine = "vllm"

    def __init__(
        self,
        model: ResolvedModel,
        cfg: TeacherConfig,
        llm=None,
        seed: int | None = None,
        in_process: bool | None = None,
        logprobs_mode: str = PROCESSED_LOGPROBS,
    ):
        """`llm` lets a caller share an already started engine (tests, benchmarks); `in_process`, `logprobs_mode`:
        see load_llm."""
        super().__init__()
        self.engine_version = vllm_version()
        self._cfg = cfg
        self._owns_llm = llm is None
        self.llm = llm if llm is not None else load_llm(model, cfg, seed, in_process, logprobs_mode)
        self._tokenizer = self.llm.get_tokenizer()
        self._ids = itertools.count()

    def generate(self, requests: Iterable[TeacherRequest], sampling: SamplingConfig) -> Iterator[TeacherResult]:
        engine = self.llm.llm_engine
        if sampling.teacher_topk:
            _require_raw_logprobs(engine)
        params = sampling_params(sampling)
        # Enough queued requests to refill the batch as sequences finish, few enough to bound memory.
        window = max(4, 2 * self._cfg.max_num_seqs // sampling.n)
        pending = iter(requests)
        in_flight: dict[str, tuple[str, int, float]] = {}
        exhausted = False
        while True:
            while not exhausted and len(in_flight) < window:
                request = next(pending, None)
                if request is None:
                    exhausted = True
                    break
                ids, think_opened = self._prompt(request.messages)
                if len(ids) + sampling.max_tokens > self._cfg.max_model_len:
                    self.counters["rejected_too_long"] += 1
                    yield TeacherResult(
                        request.key,
                        prompt_tokens=len(ids),
                        error_kind="rejected_too_long",
                        error=f"{len(ids)} prompt + {sampling.max_tokens} new tokens > max_model_len "
                        f"{self._cfg.max_model_len}",
                    )
                    continue
                request_id = f"{request.key}#{next(self._ids)}"
                engine.add_request(request_id, engine_input(engine, ids), params)
                in_flight[request_id] = (request.key, len(ids), time.monotonic(), think_opened)
            if not in_flight:
                return
            for output in engine.step():
                if output.finished and output.request_id in in_flight:
                    key, prompt_tokens, submitted, think_opened = in_flight.pop(output.request_id)
                    latency = time.monotonic() - submitted
                    completions = _completions(output, sampling.logprobs, think_opened, sampling.teacher_topk)
                    yield TeacherResult(key, completions, prompt_tokens, latency)

    def _prompt(self, messages: list[dict[str, str]]) -> tuple[list[int], bool]:
        """Prompt token ids, and whether the chat template opened the think block (DeepSeek-R1's templates end the
        prompt with <think>): then a completion that never writes </think> is all reasoning and has no answer."""
        text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._tokenizer.encode(text, add_special_tokens=False), text.rstrip().endswith(THINK_OPEN)

    def close(self) -> None:
        if self._owns_llm and self.llm is not None:
            self.llm = None  # the engine's own finalizer shuts its worker processes down
            gc.collect()  # an in-process engine's weights and KV cache go only when its cycles are collected


def _require_raw_logprobs(engine) -> None:
    """Sparse KD needs the model's own distribution: an engine started (or shared) with another logprobs_mode would
    store the sampled one under the same columns."""
    mode = getattr(getattr(engine, "model_config", None), "logprobs_mode", RAW_LOGPROBS)
    if mode != RAW_LOGPROBS:
        raise TeacherConfigError(
            f"sampling.teacher_topk needs an engine started with logprobs_mode={RAW_LOGPROBS} (the teacher's own "
            f"distribution at temperature 1); this one has {mode}"
        )


def _completions(output, k: int, think_opened: bool, teacher_topk: int = 0) -> list[Completion]:
    """`k`: the entropy's top-k (0: none); `teacher_topk`: sparse KD's K (0: no TopK kept).

    vLLM's token_ids hold every sampled token, the end-of-turn token it stopped on included (the text leaves it
    out), and its logprobs one dict per token: {token id: Logprob}, the requested top ones plus the sampled token
    when it is not among them."""
    result = []
    for sample_index, choice in enumerate(sorted(output.outputs, key=lambda c: c.index)):
        entropy = None
        if k and choice.logprobs:
            entropy = mean_topk_entropy(([lp.logprob for lp in pos.values()] for pos in choice.logprobs), k)
        topk = None
        if teacher_topk:
            positions = ([(i, lp.logprob) for i, lp in pos.items()] for pos in choice.logprobs or ())
            where = f"request {output.request_id} sample {sample_index}"
            topk = TopK.from_positions(teacher_topk, list(choice.token_ids), positions, where)
        result.append(
            Completion(
                sample_index=sample_index,
                text=choice.text,
                finish_reason=choice.finish_reason or "unknown",
                completion_tokens=len(choice.token_ids),
                mean_token_entropy=entropy,
                think_opened=think_opened,
                topk=topk,
            )
        )
    return result
