"""Sparse KD's columns (`sampling.teacher_topk`) from the real embedded teacher: the in-process engine (one, shared by
the module, started with raw logprobs as a run with teacher_topk starts it) and the session's managed server through
the openai backend; checked against the model's own distribution computed with transformers. A server that does not
return token ids stops the run."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline.config import load_recipe
from pipeline.generate.completion import TopK
from pipeline.generate.config import SamplingConfig, TeacherConfig
from pipeline.generate.stage import generate
from pipeline.generate.teacher.base import RAW_LOGPROBS, TeacherConfigError, TeacherRequest, logprobs_mode
from pipeline.records import RAW_SCHEMA, TOPK_COLUMNS, VERIFIED_SCHEMA, fingerprint
from pipeline.verify.config import VerifyConfig
from pipeline.verify.stage import verify_run
from tests.conftest import SMALL_TEACHER, read_raw, small_recipe
from tests.fake_openai import FakeOpenAIServer
from tests.pipeline.generate.test_generate import write_recipe

K = 5
QUESTIONS = ["What is 2 + 3?", "What is 7 times 6?", "Name a prime number.", "What is 10 - 4?"]


def _requests() -> list[TeacherRequest]:
    return [TeacherRequest(f"q{i}", [{"role": "user", "content": q}]) for i, q in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def raw_engine(embedded_model):
    from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher

    teacher = VLLMEngineTeacher(
        embedded_model, TeacherConfig(**SMALL_TEACHER), seed=0, in_process=True, logprobs_mode=RAW_LOGPROBS
    )
    yield teacher
    teacher.close()


@pytest.fixture(scope="module")
def hf_model(embedded_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_model.path, torch_dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(embedded_model.path)


def _generate(teacher, **sampling) -> dict:
    cfg = SamplingConfig(**{"n": 2, "max_tokens": 16, "logprobs": 5, "teacher_topk": K} | sampling)
    return {r.key: r for r in teacher.generate(_requests(), cfg)}


def _check_layout(topk: TopK, completion_tokens: int) -> None:
    assert topk.k == K
    assert len(topk.token_ids) == completion_tokens > 0
    assert len(topk.topk_ids) == len(topk.topk_logprobs) == completion_tokens * K
    lps = topk.topk_logprobs.reshape(-1, K)
    assert np.all(np.diff(lps, axis=1) <= 0), "log-probs must sort descending within each position"
    assert np.all(lps <= 0) and np.all(np.isfinite(lps))
    assert np.all(np.exp(lps).sum(axis=1) <= 1 + 1e-5)  # K of one distribution's probabilities
    ids = topk.topk_ids.reshape(-1, K)
    assert all(len(set(row)) == K for row in ids.tolist()), "K distinct tokens per position"


def _check_text(topk: TopK, text: str, finish_reason: str, tokenizer) -> None:
    """The stored ids are the text's tokens; when the engine stopped on end of turn, that last token is stored too
    and is the one token the text leaves out."""
    ids = topk.token_ids.tolist()
    if finish_reason == "stop":
        assert ids[-1] in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
        ids = ids[:-1]
    assert tokenizer.decode(ids) == text


@pytest.mark.slow
def test_inprocess_engine_keeps_the_sampled_ids_and_the_raw_top_k_of_every_token(raw_engine, hf_model):
    import torch

    model, tokenizer = hf_model
    results = _generate(raw_engine)
    assert sorted(results) == [f"q{i}" for i in range(len(QUESTIONS))]
    checked = 0
    for key, result in results.items():
        prompt_ids = raw_engine._prompt(_requests()[int(key[1:])].messages)[0]
        assert result.error_kind is None and len(result.completions) == 2
        for c in result.completions:
            _check_layout(c.topk, c.completion_tokens)
            _check_text(c.topk, c.text, c.finish_reason, tokenizer)
            assert c.mean_token_entropy is not None  # the entropy keeps its own k beside the top-k
            # The teacher's own distribution at temperature 1: log_softmax of the model's logits at each position
            # (the sampling temperature 0.6 would make these logprobs differ by far more than the tolerance).
            ids = torch.tensor([prompt_ids + c.topk.token_ids.tolist()])
            with torch.no_grad():
                logits = model(ids).logits[0, len(prompt_ids) - 1 : -1]
            expected = torch.log_softmax(logits.double(), dim=-1)
            top = expected.topk(K, dim=-1)
            got = c.topk.topk_logprobs.reshape(-1, K)
            np.testing.assert_allclose(got, top.values.numpy(), atol=2e-3)
            stored = expected.gather(1, torch.tensor(c.topk.topk_ids.reshape(-1, K), dtype=torch.long))
            np.testing.assert_allclose(got, stored.numpy(), atol=2e-3)  # each id carries its own logprob
            checked += len(c.topk.token_ids)
    assert checked > 20


@pytest.mark.slow
def test_greedy_samples_are_the_top_1_token_at_every_position(raw_engine, hf_model):
    results = _generate(raw_engine, n=1, temperature=0.0, max_tokens=48)
    finish = []
    for result in results.values():
        (c,) = result.completions
        _check_layout(c.topk, c.completion_tokens)
        _check_text(c.topk, c.text, c.finish_reason, hf_model[1])
        assert c.topk.token_ids.tolist() == c.topk.topk_ids.reshape(-1, K)[:, 0].tolist()
        finish.append(c.finish_reason)
    assert "stop" in finish, "no completion ended on end of turn: the stored final token went unchecked"


@pytest.mark.slow
def test_the_served_backend_returns_the_same_ids_and_logprobs_as_the_engine(vllm_server, raw_engine, hf_model):
    """Greedy, so the session server (started for the entropy's processed_logprobs) returns the raw distribution as
    well: vLLM applies no temperature to greedy requests. Token ids come back as "token_id:N"."""
    from pipeline.generate.teacher.openai_client import OpenAITeacher

    _, tokenizer = hf_model
    cfg = TeacherConfig(backend="openai", endpoints=[vllm_server.url], concurrency=4, model=vllm_server.model.name)
    greedy = {"n": 1, "temperature": 0.0, "max_tokens": 48}
    served = _generate(OpenAITeacher(cfg, vllm_server.model.name, send_seed=False), **greedy)
    engine = _generate(raw_engine, **greedy)
    assert "stop" in {r.completions[0].finish_reason for r in served.values()}  # the end-of-turn token is checked
    for key, result in served.items():
        (c,) = result.completions
        (e,) = engine[key].completions
        _check_layout(c.topk, c.completion_tokens)
        _check_text(c.topk, c.text, c.finish_reason, tokenizer)
        assert c.topk.token_ids.tolist() == c.topk.topk_ids.reshape(-1, K)[:, 0].tolist()
        assert c.topk.token_ids.tolist() == e.topk.token_ids.tolist()
        assert c.topk.topk_ids.tolist() == e.topk.topk_ids.tolist()
        np.testing.assert_allclose(c.topk.topk_logprobs, e.topk.topk_logprobs, atol=1e-3)


@pytest.mark.slow
def test_a_run_stores_the_columns_through_raw_and_verified_parts(raw_engine, tmp_path):
    recipe = load_recipe(
        small_recipe(tmp_path, "topk", problems=2, sampling={"max_tokens": 16, "teacher_topk": K}), []
    )
    generate(recipe, quiet=True, teacher=raw_engine)
    verify_run(recipe.run_dir, VerifyConfig(), quiet=True)
    raw = read_raw(recipe.run_dir)
    assert raw.schema.equals(RAW_SCHEMA)
    verified = pq.read_table(recipe.run_dir / "verified")
    assert verified.schema.equals(VERIFIED_SCHEMA)
    assert verified.num_rows == raw.num_rows == (2 + 4) * 2
    by_key = {(r["problem_id"], r["sample_index"]): r for r in verified.to_pylist()}
    for row in raw.to_pylist():
        assert row["teacher_topk"] == K
        assert len(row["completion_token_ids"]) == row["completion_tokens"]
        assert len(row["topk_token_ids"]) == len(row["topk_logprobs"]) == row["completion_tokens"] * K
        again = by_key[(row["problem_id"], row["sample_index"])]
        assert {c: again[c] for c in TOPK_COLUMNS} == {c: row[c] for c in TOPK_COLUMNS}
        sampling = json.loads(row["sampling"])
        assert (sampling["teacher_topk"], sampling["logprobs_mode"]) == (K, RAW_LOGPROBS)


def test_float16_storage_keeps_logprobs_within_half_a_thousandth_relative():
    lps = -np.geomspace(1e-4, 30, 2000)
    stored = lps.astype(np.float16).astype(np.float64)
    # float16: 11 significant bits, round to nearest; a probability exp(lp) is then off by |lp| * 2^-11 relative
    # (0.5% at lp = -10)
    assert np.max(np.abs(stored - lps) / np.abs(lps)) <= 2**-11


def test_teacher_topk_off_leaves_every_existing_fingerprint_as_it_was():
    # Hashes computed with the code before the field existed.
    assert fingerprint(SamplingConfig().model_dump()) == "e92e42a16b670c7d"
    assert fingerprint(SamplingConfig(n=4, max_tokens=256, seed=3).model_dump()) == "caf2856c9cb9886f"
    assert "teacher_topk" not in SamplingConfig(teacher_topk=0).model_dump_json()
    on = SamplingConfig(teacher_topk=20)
    assert on.model_dump()["teacher_topk"] == 20 and fingerprint(on.model_dump()) != "e92e42a16b670c7d"
    assert SamplingConfig.model_validate(on.model_dump()) == on  # a saved recipe.yaml reloads to the same K
    assert fingerprint(SamplingConfig(teacher_topk=5).model_dump()) != fingerprint(on.model_dump())


def test_engines_we_start_for_sparse_kd_use_raw_logprobs(tmp_path):
    from pipeline.generate.teacher.vllm_engine import engine_settings
    from pipeline.generate.teacher.vllm_server import ManagedVLLMServer
    from pipeline.models import ResolvedModel

    assert logprobs_mode("vllm", 20) == logprobs_mode("vllm-server", 20) == RAW_LOGPROBS
    assert logprobs_mode("vllm", 0) == "processed_logprobs" and logprobs_mode("openai", 20) == "endpoint"
    assert engine_settings(TeacherConfig(), on_cpu=True, logprobs_mode=RAW_LOGPROBS)["logprobs_mode"] == RAW_LOGPROBS
    model = ResolvedModel(name="m", path="/models/m", revision="r")
    server = ManagedVLLMServer(
        model, TeacherConfig(backend="vllm-server"), tmp_path / "log", logprobs_mode=RAW_LOGPROBS
    )
    command = server.command(on_cpu=True)
    assert command[command.index("--logprobs-mode") + 1] == RAW_LOGPROBS


def test_a_server_that_returns_token_strings_not_ids_stops_the_run(tmp_path):
    with FakeOpenAIServer() as server:  # answers logprobs with plain token strings, as a non-vLLM server does
        recipe = load_recipe(write_recipe(tmp_path, server.url, sampling={"teacher_topk": 3}))
        with pytest.raises(TeacherConfigError, match="return_tokens_as_token_ids"):
            generate(recipe, quiet=True)
        (body, *_) = server.requests
    # K + 1: vLLM's server lists the sampled token first, so K + 1 always holds the true top K
    assert (body["logprobs"], body["top_logprobs"], body["return_tokens_as_token_ids"]) == (True, 3 + 1, True)


def test_a_shared_engine_started_for_the_entropy_is_refused_for_sparse_kd():
    from types import SimpleNamespace

    from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher

    engine = SimpleNamespace(model_config=SimpleNamespace(logprobs_mode="processed_logprobs"))
    llm = SimpleNamespace(get_tokenizer=lambda: None, llm_engine=engine)
    teacher = VLLMEngineTeacher(None, TeacherConfig(), llm=llm)
    with pytest.raises(TeacherConfigError, match="raw_logprobs"):
        next(teacher.generate(_requests(), SamplingConfig(teacher_topk=K)))
