"""model.engine and model.engine_options are checked before anything starts."""

from __future__ import annotations

from importlib.util import find_spec

import pytest

from jobs.core.errors import ModelError
from jobs.core.spec import spec_from_dict
from jobs.preflight import check_engine


def spec(engine: str = "auto", options: dict | None = None, **generation):
    return spec_from_dict(
        {
            "input": {"uri": "/in", "prompt_column": "prompt"},
            "model": {"path": "org/model", "engine": engine, "engine_options": options or {}},
            "generation": generation,
            "output": {"uri": "/out"},
        }
    )


def test_transformers_takes_no_engine_options():
    with pytest.raises(ModelError, match=r"model.engine_options \['max_model_len'\]: the transformers engine takes none"):
        check_engine(spec("transformers", {"max_model_len": 64}))


def test_transformers_runs_a_replica_on_one_gpu():
    with pytest.raises(ModelError, match="resources.num_gpus 2.0: the transformers engine runs a replica on one GPU"):
        check_engine(spec_from_dict({**spec("transformers").model_dump(), "resources": {"num_gpus": 2}}))


def test_vllm_refuses_what_it_cannot_honour():
    with pytest.raises(ModelError, match="model.engine is vllm, but vLLM has no no_repeat_ngram_size"):
        check_engine(spec("vllm", no_repeat_ngram_size=3))
    check_engine(spec("auto", no_repeat_ngram_size=3))  # auto takes transformers for it instead
    with pytest.raises(ModelError, match="model.engine is vllm, but model.engine_options.max_logprobs 2 is below "
                                         "generation.top_logprobs 3"):  # fmt: skip
        check_engine(spec("vllm", {"max_logprobs": 2}, logprobs=True, top_logprobs=3))


def test_options_may_not_contradict_the_spec():
    with pytest.raises(ModelError, match="model.engine_options.seed: set generation.seed in the spec instead"):
        check_engine(spec("vllm", {"seed": 3}))
    with pytest.raises(ModelError, match="model.engine_options.logprobs_mode: set generation.logprobs in the spec"):
        check_engine(spec("vllm", {"logprobs_mode": "processed_logprobs"}))


@pytest.mark.skipif(find_spec("vllm") is None, reason="vLLM is not installed")
def test_options_are_vllms_own_argument_names():
    check_engine(spec("vllm", {"max_model_len": 64, "enforce_eager": True, "gpu_memory_utilization": 0.5}))
    with pytest.raises(ModelError, match="model.engine_options.gpu_memory_utilisation: .* did you mean 'gpu_memory_utilization'"):
        check_engine(spec("vllm", {"gpu_memory_utilisation": 0.5}))


def test_engine_options_are_tuning_not_identity():
    # A resume may change memory or compilation settings, as it may change resources.
    assert spec("vllm", {"enforce_eager": True}).fingerprint() == spec("vllm").fingerprint()
    assert spec("vllm").fingerprint() != spec("transformers").fingerprint()


def test_vllm_on_cpu_runs_eager_unless_asked(tiny_model):
    from workers.vllm_engine import engine_args

    def on_cpu(options=None):
        data = spec("vllm", options).model_dump()
        data["model"]["path"] = str(tiny_model)
        return engine_args(spec_from_dict(data))

    assert on_cpu()["enforce_eager"] is True  # no compile before the first token
    assert on_cpu({"enforce_eager": False})["enforce_eager"] is False


def test_vllm_caches_prefixes_by_name_unless_the_options_say_not(tiny_model):
    from workers.vllm_engine import engine_args

    def args(options=None):
        data = spec("vllm", options).model_dump()
        data["model"]["path"] = str(tiny_model)
        return engine_args(spec_from_dict(data))

    assert args()["enable_prefix_caching"] is True  # in the record's engine arguments, by name
    assert args({"enable_prefix_caching": False})["enable_prefix_caching"] is False


def test_vllm_serves_every_adapter_in_one_batch_with_a_spare_slot_on_cpu(tiny_model, lora_adapters):
    from workers.vllm_engine import engine_args

    def args(num_gpus: float, adapters: dict) -> dict:
        data = spec("vllm").model_dump()
        data["model"].update(path=str(tiny_model), adapters={name: str(path) for name, path in adapters.items()})
        data["input"]["adapter_column"] = "adapter" if adapters else None
        data["resources"] = {"num_gpus": num_gpus}
        return engine_args(spec_from_dict(data))

    # On CPU a base row's slot index -1 picks the last slot (vllm/lora/ops/torch_ops): one more, left empty.
    assert {k: args(0, lora_adapters)[k] for k in ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank")} == {
        "enable_lora": True, "max_loras": 3, "max_cpu_loras": 3, "max_lora_rank": 8
    }  # fmt: skip
    assert args(1, lora_adapters)["max_loras"] == 2
    assert "enable_lora" not in args(0, {})


def test_options_may_not_turn_lora_on_or_size_it():
    for option in ("enable_lora", "max_loras"):
        with pytest.raises(ModelError, match=f"model.engine_options.{option}: set model.adapters in the spec instead"):
            check_engine(spec("vllm", {option: 2}))
def test_vllm_builds_grammars_with_llguidance_when_a_job_may_constrain(tiny_model):
    # The guidance backend is llguidance, as our engine's grammars: the same tokens allowed at each step.
    from workers.vllm_engine import engine_args

    def args(**sections):
        data = spec("vllm").model_dump()
        data["model"]["path"] = str(tiny_model)
        for section, values in sections.items():
            data[section] = {**data[section], **values}
        return engine_args(spec_from_dict(data))

    assert "structured_outputs_config" not in args()
    assert args(generation={"structured": {"regex": "[0-9]+"}})["structured_outputs_config"] == {
        "backend": "guidance", "disable_any_whitespace": True
    }  # fmt: skip
    flexible = args(generation={"structured": {"whitespace": "flexible"}}, input={"schema_column": "schema"})
    assert flexible["structured_outputs_config"] == {"backend": "guidance", "disable_any_whitespace": False}
