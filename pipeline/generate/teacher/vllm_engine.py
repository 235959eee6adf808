"""The in-process vLLM engine (`vllm.LLM`): the highest-throughput backend on one node.

`LLM.generate` returns only when every prompt is done, which would hold hours of completions in memory and lose
them all on a crash. We drive the same engine step by step instead (what `LLM.generate` does inside), keeping a
bounded window of requests queued so the batch stays full while finished completions stream out to the parts.
"""

from __future__ import annotations

import gc
import itertools
import os
import time
from collections.abc import Iterable, Iterator

from pipeline.generate.completion import Completion, mean_topk_entropy
from pipeline.generate.config import SamplingConfig, TeacherConfig
from pipeline.generate.teacher.base import (
    PROCESSED_LOGPROBS,
    Teacher,
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
        logprobs=sampling.logprobs or None,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def load_llm(model: ResolvedModel, cfg: TeacherConfig, seed: int | None = None):
    """Start the engine with the settings measured fastest on CPU (float32, eager) and processed logprobs."""
    os.environ.update(vllm_env())
    # Read at engine start. Once an in-process engine has run, vLLM caches its settings: later engines of this
    # process stay in-process too.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if cfg.reproducible else "1"
    from vllm import LLM

    return LLM(
        model.path,
        dtype=cfg.dtype,
        enforce_eager=cfg.enforce_eager,
        max_model_len=cfg.max_model_len,
        max_num_seqs=cfg.max_num_seqs,
        seed=seed if seed is not None else 0,  # per-request seeds crash the CPU build (see SamplingConfig.seed)
        logprobs_mode=PROCESSED_LOGPROBS,  # entropy on the distribution sampled from (see logprobs_mode)
    )


class VLLMEngineTeacher(Teacher):
    engine = "vllm"

    def __init__(self, model: ResolvedModel, cfg: TeacherConfig, llm=None, seed: int | None = None):
        """`llm` lets a caller share an already started engine (tests, benchmarks)."""
        super().__init__()
        self.engine_version = vllm_version()
        self._cfg = cfg
        self._owns_llm = llm is None
        self.llm = llm if llm is not None else load_llm(model, cfg, seed)
        self._tokenizer = self.llm.get_tokenizer()
        self._ids = itertools.count()

    def generate(self, requests: Iterable[TeacherRequest], sampling: SamplingConfig) -> Iterator[TeacherResult]:
        engine = self.llm.llm_engine
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
                engine.add_request(request_id, {"prompt_token_ids": ids}, params)
                in_flight[request_id] = (request.key, len(ids), time.monotonic(), think_opened)
            if not in_flight:
                return
            for output in engine.step():
                if output.finished and output.request_id in in_flight:
                    key, prompt_tokens, submitted, think_opened = in_flight.pop(output.request_id)
                    latency = time.monotonic() - submitted
                    completions = _completions(output, sampling.logprobs, think_opened)
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


def _completions(output, k: int, think_opened: bool) -> list[Completion]:
    result = []
    for sample_index, choice in enumerate(sorted(output.outputs, key=lambda c: c.index)):
        entropy = None
        if k and choice.logprobs:
            entropy = mean_topk_entropy(([lp.logprob for lp in pos.values()] for pos in choice.logprobs), k)
        result.append(
            Completion(
                sample_index=sample_index,
                text=choice.text,
                finish_reason=choice.finish_reason or "unknown",
                completion_tokens=len(choice.token_ids),
                mean_token_entropy=entropy,
                think_opened=think_opened,
            )
        )
    return result
