"""What decides whether vLLM runs a spec (jobs/core/vllm_support.py), without vLLM."""

from __future__ import annotations

from jobs.core import vllm_support
from jobs.core.spec import spec_from_dict


def spec(model: str = "org/model", dtype: str = "auto", num_gpus: float = 0, engine_options=None, **generation):
    return spec_from_dict(
        {
            "input": {"uri": "/in", "prompt_column": "prompt"},
            "model": {"path": model, "engine": "auto", "dtype": dtype, "engine_options": engine_options or {}},
            "generation": generation,
            "resources": {"num_gpus": num_gpus},
            "output": {"uri": "/out"},
        }
    )


def test_vllm_refuses_what_it_cannot_honour():
    assert vllm_support.refuses(spec()) is None
    assert vllm_support.refuses(spec(no_repeat_ngram_size=3)).startswith("vLLM has no no_repeat_ngram_size")
    assert vllm_support.refuses(spec(num_gpus=1.5)).startswith("resources.num_gpus 1.5 above 1 means tensor")
    assert vllm_support.refuses(spec(num_gpus=0.5)) is None  # a share of one GPU is no tensor parallelism


def test_vllm_refuses_more_top_logprobs_than_its_max_logprobs():
    top = {"logprobs": True, "top_logprobs": 8}
    assert vllm_support.refuses(spec(engine_options={"max_logprobs": 5}, **top)) == (
        "model.engine_options.max_logprobs 5 is below generation.top_logprobs 8; "
        "raise it (or drop it: vLLM's default is 20)"
    )
    assert vllm_support.refuses(spec(engine_options={"max_logprobs": 8}, **top)) is None
    assert vllm_support.refuses(spec(engine_options={"max_logprobs": -1}, **top)) is None  # -1: no cap
    assert vllm_support.refuses(spec(**top)) is None  # the default, 20, is the spec's own limit
    # The chosen token's logprob alone is within any cap.
    assert vllm_support.refuses(spec(engine_options={"max_logprobs": 0}, logprobs=True)) is None


def test_auto_tries_vllm_on_cpu_in_float32_only(tiny_model):
    assert vllm_support.auto_passes_over(spec(dtype="bfloat16")) == "bfloat16 on CPU"
    assert vllm_support.auto_passes_over(spec(dtype="float32")) is None
    assert vllm_support.auto_passes_over(spec(dtype="float16", num_gpus=1)) is None  # a GPU runs any
    assert vllm_support.auto_passes_over(spec(str(tiny_model))) is None  # auto: the checkpoint's own, float32
