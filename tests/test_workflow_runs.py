"""bench/workflow_runs.py: the jobs behind docs/results.md, and the tables it reports."""

import json
from pathlib import Path

import pytest

from bench.workflow_runs import long_table, pretrain_table, retrieval_table, selected_jobs, workflow_jobs
from sparsetrain.eval.__main__ import parse_args


@pytest.mark.parametrize("tiny", [False, True])
def test_every_job_names_an_existing_config_or_a_run_an_earlier_job_trains(tiny):
    for workflow in ("pretrain", "long"):
        trained = set()
        for job in workflow_jobs(workflow, tiny):
            if job.evaluation:
                assert job.run in trained, job
                parse_args(list(job.argv[2:]))   # the evaluation command accepts its arguments
            else:
                assert Path(job.argv[2]).exists(), job
                trained.add(job.run)
    names = [job.name for job in workflow_jobs("long", tiny)]
    assert names.index("long_tiny_seer" if tiny else "long_seer") > names.index("long_tiny_dense" if tiny else "long_dense")


def _write(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))


def test_report_tables_hold_the_collected_numbers(tmp_path):
    first, second = tmp_path / "call1", tmp_path / "call2"
    for name, loss, speed in [("pretrain_dense", 2.0, 1000.0), ("pretrain_moba", 2.01, 1500.0)]:
        records = [{"step": 10, "tokens_per_sec": speed}, {"step": 600, "val/loss": loss}]
        _write(first / name / "metrics.jsonl", "\n".join(json.dumps(r) for r in records))
    _write(first / "pretrain_moba" / "metrics.jsonl", '{"step": 10, "tokens_per_sec": 1.0}')   # stale call
    _write(second / "pretrain_moba" / "metrics.jsonl",
           "\n".join(json.dumps(r) for r in [{"step": 10, "tokens_per_sec": 1500.0}, {"step": 600, "val/loss": 2.01}]))
    _write(first / "eval_pretrain_moba" / "results.json",
           {"loss": {"sparse": {"8192": {"loss": 1.5}}, "dense": {"8192": {"loss": 1.6}}}})
    table = "\n".join(pretrain_table([first, second]))
    assert "| pretrain_dense | 600 | 2.0000 | +0.00% | 1,000 | 1.00x |" in table
    assert "| pretrain_moba | 600 | 2.0100 | +0.50% | 1,500 | 1.50x | 1.5000 / 1.6000 (8192) |" in table
    assert "| pretrain_nsa | not run |" in table

    _write(first / "rope_yarn" / "results.json", {
        "loss": {"dense": {"2048": {"loss": 1.2}, "16384": {"loss": 1.9}}},
        "retrieval": {"passkey": {"dense": {"2048": {"0.0": {"exact": 1.0}, "1.0": {"exact": 0.5}},
                                            "16384": {"0.0": {"exact": 0.0}, "1.0": {"exact": 0.0}}}}},
        "layers": {}})
    table = "\n".join(long_table([first]))
    assert "| rope_yarn | dense | 1.200 | 1.900 | 75% | 0% | — |" in table
    assert "| no_adaptation | not run |" in table
    _write(first / "eval_long_infllm_v2" / "results.json", {
        "loss": {"sparse": {"2048": {"loss": 1.1}}}, "layers": {"2048": {"density": {"0": 0.2, "1": 0.4}}},
        "retrieval": {"passkey": {"sparse": {"2048": {"0.0": {"exact": 1.0}, "1.0": {"exact": 0.5}}}},
                      "mqar": {"sparse": {"2048": {"-": {"exact": 0.25}}}}}})
    table = "\n".join(retrieval_table([first]))
    assert "| eval_long_infllm_v2 | sparse | 2048 | 1.1000 | 0.300 | 75% | skipped | skipped | skipped | 25% | skipped |" in table


def test_only_runs_the_named_jobs_in_workflow_order_and_names_unknown_ones():
    names = [job.name for job in selected_jobs("long", False, ("eval_long_seer", "pretrain_short_dense"))]
    assert names == ["pretrain_short_dense", "eval_long_seer"]
    assert len(selected_jobs("long", False)) == len(workflow_jobs("long"))
    with pytest.raises(SystemExit, match="--only: long_nsa not in workflow long; its jobs: pretrain_short_dense"):
        selected_jobs("long", False, ("long_nsa",))
