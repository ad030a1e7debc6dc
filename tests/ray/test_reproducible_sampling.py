"""A row's sampled text depends on the job seed, its id and its sample_index only:
not on the shard, batch or replica it landed in."""

import pytest

from jobs.driver import run_job
from jobs.core.spec import spec_from_dict
from tests.conftest import job_dict, output_texts, write_prompts

LAYOUTS = [
    # rows_per_shard, batch_size, max_batch_tokens, replicas
    (7, 3, None, 1),
    (40, 16, None, 2),
    (13, 5, 300, 2),  # a small token budget: batches split and refill differently
]


@pytest.mark.ray
def test_sampled_text_is_the_same_for_any_shard_batch_and_replica_layout(tmp_path, tiny_model, ray_cluster):
    source = write_prompts(tmp_path / "in" / "prompts.parquet", 40)
    results = []
    for k, (rows_per_shard, batch_size, budget, replicas) in enumerate(LAYOUTS):
        spec = spec_from_dict(
            job_dict(
                source,
                str(tmp_path / f"out{k}"),
                tiny_model,
                generation={"max_new_tokens": 12, "do_sample": True, "temperature": 0.9, "top_p": 0.95,
                            "num_return_sequences": 2, "seed": 7},
                resources={"replicas": replicas, "batch_size": batch_size, "max_batch_tokens": budget},
                shards={"rows_per_shard": rows_per_shard},
            )
        )
        run_job(spec, progress=False)
        results.append(output_texts(str(tmp_path / f"out{k}")))

    assert len(results[0]) == 80
    for other in results[1:]:
        assert other.keys() == results[0].keys()
        differing = [key for key in results[0] if results[0][key] != other[key]]
        assert not differing, f"{len(differing)} of {len(other)} rows changed with the layout, e.g. {differing[:3]}"
    # Sampling really happened: the two samples of a row differ somewhere.
    assert any(results[0][(i, 0)] != results[0][(i, 1)] for i, _ in results[0])


@pytest.mark.ray
def test_another_seed_gives_other_text(tmp_path, tiny_model, ray_cluster):
    source = write_prompts(tmp_path / "in" / "prompts.parquet", 10)
    outs = []
    for seed in (1, 2):
        out = str(tmp_path / f"seed{seed}")
        spec = spec_from_dict(
            job_dict(source, out, tiny_model, generation={"max_new_tokens": 10, "do_sample": True, "seed": seed})
        )
        run_job(spec, progress=False)
        outs.append(output_texts(out))
    assert sum(outs[0][k] != outs[1][k] for k in outs[0]) >= 8
