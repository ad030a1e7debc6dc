"""Shared fixtures: a tiny real model, prompt datasets, a local Ray cluster, a loopback S3 server."""

from __future__ import annotations

import os
import random
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from tests.tiny_model import save_thinking_model, save_tiny_model, train_lora

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded in tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray runs its workers (our replicas among them) at nice 15 by default. On a machine shared with
# busy processes at nice 0, each then gets about 3% of a core, and a test that generates a few
# shards takes thirty times as long as on a quiet machine: every Ray the tests start (through
# ray.init, `ray start` or `bulkgen run`, which inherit this) runs its workers at nice 0 instead,
# so the suite shares the machine instead of waiting for it to be idle.
os.environ.setdefault("RAY_worker_niceness", "0")
# The drivers the tests run keep their weights hashes (jobs/weights_cache.py) apart from the user's.
os.environ["XDG_CACHE_HOME"] = str(Path(os.environ.get("TMPDIR", "/tmp")) / f"bulkgen-tests-cache-{os.getpid()}")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny Llama checkpoint (safetensors + tokenizer with a chat template)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", arch="llama")


@pytest.fixture(scope="session")
def thinking_model(tmp_path_factory) -> Path:
    """A tiny Llama whose chat template opens <think> and that answers tests.tiny_model.THINKING_ANSWERS."""
    return save_thinking_model(tmp_path_factory.mktemp("models") / "tiny-thinking")


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", arch="gpt2")


ADAPTER_TEXTS = {  # what each of lora_adapters was trained to write
    "poem": "Write a short poem about the sea and the wind.",
    "code": "Raise ValueError if the timeout is negative.",
}


@pytest.fixture(scope="session")
def lora_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Two LoRA adapters of the tiny Llama (PEFT save_pretrained directories), each trained on
    its own text of ADAPTER_TEXTS: either changes the model's greedy text. Tests that change an
    adapter train their own."""
    root = tmp_path_factory.mktemp("adapters")
    return {
        name: train_lora(tiny_model, root / name, text, seed=i) for i, (name, text) in enumerate(ADAPTER_TEXTS.items())
    }


def write_prompts(path: Path | str, n: int, start: int = 0, row_group_size: int | None = None, **extra) -> str:
    """A prompt Parquet file with columns id, prompt, topic, style (+ extra columns)."""
    topics = ["the sea", "a socket", "the wind", "lists", "timeouts"]
    styles = ["short", "sad", "happy"]
    ids = [f"row-{i:05d}" for i in range(start, start + n)]
    columns = {
        "id": ids,
        "prompt": [f"Write a {styles[i % 3]} note {i} about {topics[i % 5]}" + " and more" * (i % 4) for i in range(start, start + n)],
        "topic": [topics[i % 5] for i in range(start, start + n)],
        "style": [styles[i % 3] for i in range(start, start + n)],
        **extra,
    }
    table = pa.table(columns)
    path = str(path)
    if "://" in path:
        import fsspec

        with fsspec.open(path, "wb") as f:
            pq.write_table(table, f, row_group_size=row_group_size)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path, row_group_size=row_group_size)
    return path


# Augmentation templates longer than a prefix key (jobs/core/prefix.py PREFIX_CHARS), in the
# tiny tokenizer's words: about 210 tokens with a row's question (long_context_model fits them).
AUGMENT_TEMPLATES = (
    "Write a short poem about the sea and the wind. " * 7,
    "Return the number of items in the lists and raise ValueError. " * 5,
    "Create a new socket with a timeout, then write a happy note. " * 5,
)


def write_augment(path: Path, per_template: int, seed: int = 0, row_group_size: int = 8) -> dict[str, int]:
    """An "augment" input: per_template rows of each AUGMENT_TEMPLATES, each with its own question
    after the template, shuffled; columns id, prompt, topic. Returns each id's template."""
    rows = [(t, i) for t in range(len(AUGMENT_TEMPLATES)) for i in range(per_template)]
    random.Random(seed).shuffle(rows)
    ids = [f"row-{k:05d}" for k in range(len(rows))]
    prompts = [f"{AUGMENT_TEMPLATES[t]}Row {i}: a note about the sea" for t, i in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": ids, "prompt": prompts, "topic": ["the sea"] * len(rows)}), path,
                   row_group_size=row_group_size)  # fmt: skip
    return {row_id: t for row_id, (t, _) in zip(ids, rows)}


def output_texts(output: str) -> dict:
    """A job output's texts: (id, sample_index) -> text, from every file of its data/."""
    t = ds.dataset(f"{output}/data", format="parquet").to_table(columns=["id", "sample_index", "text"])
    return {(i, s): text for i, s, text in zip(*(t.column(c).to_pylist() for c in ("id", "sample_index", "text")))}


@pytest.fixture(scope="session")
def long_context_model(tmp_path_factory) -> Path:
    """tiny_model's kind with room for write_augment's prompts (256 positions)."""
    return save_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama-256", arch="llama", max_positions=256)


def job_dict(input_uri: str, output_uri: str, model: Path, **sections) -> dict:
    """A small valid job spec as data; `sections` update its sections."""
    spec = {
        "name": "test",
        "input": {"uri": input_uri, "prompt_column": "prompt", "id_column": "id", "pass_through": ["topic"]},
        "model": {"path": str(model), "engine": "transformers"},  # vLLM's own tests ask for it
        "generation": {"max_new_tokens": 8},
        "output": {"uri": output_uri, "report": False},  # tests of the report ask for it (a second each)
        "resources": {"replicas": 1, "batch_size": 8, "num_cpus": 1},
        "shards": {"rows_per_shard": 10},
    }
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(spec.get(section), dict):
            spec[section] = {**spec[section], **values}
        else:
            spec[section] = values
    return spec


def write_job(path: Path, spec: dict) -> Path:
    path.write_text(yaml.safe_dump(spec))
    return path


def start_local_ray(temp_dir: Path, **init_kwargs) -> None:
    """ray.init on loopback with Ray's files under `temp_dir` (keep it short: Unix socket paths)."""
    import ray

    ray.init(
        _node_ip_address="127.0.0.1",
        _temp_dir=str(temp_dir),
        num_cpus=2,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=False,
        **init_kwargs,
    )


@pytest.fixture(scope="session")
def _ray_temp_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ray")


@pytest.fixture
def ray_cluster(_ray_temp_dir, request):
    """A local Ray instance on loopback, shared by the tests that use it.

    Started on first use and kept for the session (a start costs seconds);
    fault tests that need their own instance shut it down, and the next test
    that asks for it starts it again."""
    import ray

    if not ray.is_initialized():
        start_local_ray(_ray_temp_dir)
        request.session.addfinalizer(ray.shutdown)
    return ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-protocol server (moto) on loopback; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A fresh bucket on the loopback server, and the storage options that reach it."""
    import uuid

    import s3fs

    # Credentials only for the fake server; botocore refuses to sign without some.
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"client_kwargs": {"endpoint_url": s3_server}}
    bucket = f"bulkgen-{uuid.uuid4().hex[:8]}"
    fs = s3fs.S3FileSystem(**options)
    fs.mkdir(bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    return {"bucket": bucket, "options": options}
