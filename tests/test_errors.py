"""A user error raised inside a Ray worker reaches the user as its own one line, not a Ray traceback: through a
Ray task, an actor, Ray Data's actor pool, Ray Train's workers, and the CLI; and a run that fails says what it
kept and how to resume."""

import json
import sys

import pytest
import ray.cloudpickle
import yaml

from fcot.errors import FcotError, user_error
from tests.conftest import run_fcot

MESSAGE = "data/units.jsonl, line 3, key 'solution': missing"
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import the tests package


def _raise(*_):
    raise FcotError(MESSAGE)


def _found(exc_info) -> str:
    found = user_error(exc_info.value)
    assert found is not None, f"no FcotError behind {type(exc_info.value).__name__}"
    return str(found)


def test_the_message_comes_through_ray_tasks_actors_and_ray_data(ray_local):
    import ray

    with pytest.raises(Exception) as task:
        ray.get(ray.remote(_raise).remote())
    assert _found(task) == MESSAGE and str(task.value) != MESSAGE  # Ray's own text is the remote traceback

    class Worker:
        def run(self):
            _raise()

    with pytest.raises(Exception) as actor:
        ray.get(ray.remote(Worker).remote().run.remote())
    assert _found(actor) == MESSAGE

    class Failing:
        def __call__(self, batch):
            _raise()

    with pytest.raises(Exception) as data:
        ray.data.range(4).map_batches(Failing, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
    assert _found(data) == MESSAGE


def _train_loop(config):
    _raise()


def test_the_message_comes_through_ray_train_workers(ray_local, tmp_path):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    run_config = RunConfig(storage_path=str(tmp_path), failure_config=FailureConfig(max_failures=0))
    trainer = TorchTrainer(_train_loop, scaling_config=ScalingConfig(num_workers=1), run_config=run_config)
    with pytest.raises(Exception) as train:
        trainer.fit()
    assert _found(train) == MESSAGE


def test_the_cli_prints_a_worker_s_error_as_one_line(tmp_path, tiny_llama, ray_local):
    """The evaluation's replicas (Ray Data actors) read the curated stats for the generation length: a broken
    file fails there, inside a worker, and the user sees that file named in one line."""
    stats = tmp_path / "stats.json"
    stats.write_text('{"completion_length_max": ')
    cfg = {"engine": {"model": str(tiny_llama)}, "tasks": "multiarith", "subset": 2, "curated": str(stats),
           "output_dir": str(tmp_path / "eval")}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(cfg))
    proc = run_fcot("eval", tmp_path / "eval.yaml", cluster=ray_local)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fcot: error: {stats}: invalid JSON") and "Traceback" not in last


def test_a_failed_stage_keeps_what_the_run_finished_and_says_how_to_resume(tmp_path, tiny_llama, shared_data,
                                                                          ray_local):
    config = {"tasks": "multiarith", "output_dir": str(tmp_path / "run"), "methods": ["vanilla"], "baselines": [],
              "teacher": {"subset": 30}, "wandb_mode": "disabled",
              "train": {"model": str(tiny_llama), "batch_size": 64, "num_workers": 1}}  # 20 pairs < one batch
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    proc = run_fcot("run", tmp_path / "run.yaml", cluster=ray_local)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "stage train-vanilla failed:" in last and "fewer than batch_size=64" in last
    assert "finished stages kept" in last and "curate-vanilla" in last and "run the same command again" in last
    log = tmp_path / "run" / "output.log"  # the console said where the rest went; the log keeps the traceback
    assert last.endswith(f" (full output and traceback: {log})") and "Traceback" not in proc.stderr
    assert "Traceback (most recent call last)" in log.read_text()
    marker = json.loads((tmp_path / "run" / "stages" / "curate-vanilla.json").read_text())
    assert marker["result"]["kept"] == 20
