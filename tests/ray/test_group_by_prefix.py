"""shards.group_by_prefix on a real run: a shuffled "augment" input's rows land in shards of
one template each, and every row's seeded text is the one an ungrouped run gives it."""

from __future__ import annotations

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from jobs.core.spec import spec_from_dict
from jobs.driver import run_job
from tests.conftest import job_dict, output_texts, write_augment

pytestmark = pytest.mark.ray

PER_TEMPLATE = 12


def _templates_per_part(out: str, template_of: dict) -> list[set[int]]:
    parts = sorted((ds.dataset(f"{out}/data").files))
    return [{template_of[i] for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()} for p in parts]


def test_grouped_shards_hold_one_template_each_and_texts_do_not_change(tmp_path, long_context_model, ray_cluster):
    template_of = write_augment(tmp_path / "in" / "augment.parquet", PER_TEMPLATE)
    outs = {}
    for grouping in ("off", "on"):
        out = outs[grouping] = str(tmp_path / f"out-{grouping}")
        spec = spec_from_dict(job_dict(
            str(tmp_path / "in"), out, long_context_model,
            generation={"max_new_tokens": 6, "do_sample": True, "temperature": 0.9, "num_return_sequences": 2,
                        "seed": 11},
            resources={"replicas": 2, "batch_size": 4},
            shards={"rows_per_shard": 10, "group_by_prefix": grouping},
        ))  # fmt: skip
        record = run_job(spec, progress=False)
        assert record.state.value == "succeeded"
        assert record.counts.rows_done == 3 * PER_TEMPLATE * 2 and record.counts.rows_failed == 0

    grouped = _templates_per_part(outs["on"], template_of)
    assert all(len(templates) == 1 for templates in grouped), grouped
    # Each template's 12 rows in two shards of 6 (at most rows_per_shard 10, as even as they go).
    assert len(grouped) == 6 and sorted(t for (t,) in grouped) == [0, 0, 1, 1, 2, 2]
    # The same input cut into ranges mixes templates in its parts: the grouping did the work.
    assert any(len(templates) > 1 for templates in _templates_per_part(outs["off"], template_of))
    # Same ids, same seeds, same texts, wherever a row was.
    on, off = output_texts(outs["on"]), output_texts(outs["off"])
    assert on.keys() == off.keys() and len(on) == 3 * PER_TEMPLATE * 2
    assert [k for k in on if on[k] != off[k]] == []
