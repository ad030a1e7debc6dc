"""LoRA adapters as the contracts read them (jobs/core/adapters.py): names, hashes, configs and
weight headers, on hand-written adapter directories (no model, no PEFT)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from jobs.core import adapters

LORA = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], "bias": "none"}


def adapter_dir(path: Path, config: dict | None = None, tensors: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / adapters.CONFIG).write_text(json.dumps(config or LORA))
    save_file(tensors or {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((8, 64), np.float32),
                          "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((64, 8), np.float32)},
              str(path / adapters.SAFETENSORS))  # fmt: skip
    return path


@pytest.mark.parametrize("name", ["legal", "poem-2", "v1-5", "a_b", "A"])
def test_adapter_names(name):
    assert adapters.is_name(name)


@pytest.mark.parametrize("name", ["", "a b", "a/b", "v1.5", "__base__", "é"])  # PEFT refuses a "." in a module name
def test_names_that_are_no_adapter_names(name):
    assert not adapters.is_name(name)


def test_the_hash_covers_config_and_weights_only(tmp_path):
    path = adapter_dir(tmp_path / "a")
    digest = adapters.files_sha256(path)
    assert len(digest) == 64 and digest == adapters.files_sha256(path)
    (path / "README.md").write_text("a model card changes no generated token")
    assert adapters.files_sha256(path) == digest
    (path / adapters.CONFIG).write_text(json.dumps({**LORA, "lora_alpha": 32}))
    changed = adapters.files_sha256(path)
    assert changed != digest
    save_file({"x.lora_A.weight": np.zeros((8, 64), np.float32)}, str(path / adapters.SAFETENSORS))
    assert adapters.files_sha256(path) not in (digest, changed)


def test_weight_file_prefers_safetensors(tmp_path):
    path = adapter_dir(tmp_path / "a")
    assert adapters.weight_file(path).name == adapters.SAFETENSORS
    (path / adapters.SAFETENSORS).rename(path / adapters.PICKLE)
    assert adapters.weight_file(path).name == adapters.PICKLE
    (path / adapters.PICKLE).unlink()
    assert adapters.weight_file(path) is None


def test_read_config_refuses_what_is_no_object(tmp_path):
    path = adapter_dir(tmp_path / "a")
    assert adapters.read_config(path)["r"] == 8
    (path / adapters.CONFIG).write_text("[1, 2]")
    with pytest.raises(ValueError, match="holds list, not an object"):
        adapters.read_config(path)
    with pytest.raises(FileNotFoundError):
        adapters.read_config(tmp_path / "nothing")


def test_rank_counts_the_rank_pattern():
    assert adapters.rank(LORA) == 8
    assert adapters.rank({**LORA, "rank_pattern": {"v_proj": 24}}) == 24


@pytest.mark.parametrize("ranks, chosen", [([8], 8), ([4], 8), ([1], 1), ([8, 17], 32), ([300], 320), ([512], 512)])
def test_vllm_max_lora_rank_is_the_smallest_that_holds_them(ranks, chosen):
    assert adapters.vllm_max_lora_rank(ranks) == chosen


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"modules_to_save": ["lm_head"]}, "modules_to_save ['lm_head']"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "all"}, "bias 'all'"),
        ({"init_lora_weights": "pissa"}, "init_lora_weights 'pissa'"),
        ({"alora_invocation_tokens": [5]}, "Activated LoRA"),
        ({"layer_replication": [[0, 2]]}, "layer_replication"),
        ({"use_bdlora": {"blocks": 2}}, "block-diagonal LoRA"),
        ({"use_qalora": True}, "QALoRA"),
        ({"r": 1024}, "rank 1024"),
    ],
)
def test_what_vllm_does_not_load(fields, named):
    assert named in adapters.vllm_refusal({**LORA, **fields})


@pytest.mark.parametrize(
    "fields",
    # DoRA is refused for either engine, by jobs/preflight.check_adapters.
    [{}, {"modules_to_save": ["score"]}, {"init_lora_weights": "gaussian"}, {"init_lora_weights": False},
     {"use_rslora": True}, {"rank_pattern": {"q_proj": 64}}, {"use_dora": True}],  # fmt: skip
)
def test_what_vllm_loads(fields):
    assert adapters.vllm_refusal({**LORA, **fields}) is None


def test_lora_shapes_come_from_the_header(tmp_path):
    path = adapter_dir(
        tmp_path / "a",
        tensors={
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.ones((8, 64), np.float32),
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.ones((32, 8), np.float32),
            "base_model.model.model.embed_tokens.lora_embedding_A": np.ones((8, 300), np.float32),
            "base_model.model.model.embed_tokens.lora_embedding_B": np.ones((64, 8), np.float32),
            "base_model.model.lm_head.weight": np.ones((300, 64), np.float32),  # a modules_to_save copy
        },
    )
    assert adapters.lora_shapes(path / adapters.SAFETENSORS) == {
        "model.layers.0.self_attn.q_proj": {"A": (8, 64), "B": (32, 8)},
        "model.embed_tokens": {"A": (8, 300), "B": (64, 8)},
    }


def test_misfit_names_the_module_and_the_sizes():
    shapes = {"model.layers.0.self_attn.q_proj": {"A": (8, 64), "B": (64, 8)}}
    assert adapters.misfit(shapes, {"model.layers.0.self_attn.q_proj": (64, 64)}) is None
    assert adapters.misfit(shapes, {"model.layers.0.self_attn.q_proj": (32, 64)}) == (
        "model.layers.0.self_attn.q_proj takes 32 inputs, the adapter's lora_A expects 64"
    )
    assert adapters.misfit(shapes, {"model.layers.0.self_attn.q_proj": (64, 96)}) == (
        "model.layers.0.self_attn.q_proj gives 96 outputs, the adapter's lora_B gives 64"
    )
    assert "adapts model.layers.0.self_attn.q_proj, which the base model does not have" in adapters.misfit(shapes, {})
