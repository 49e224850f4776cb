"""`fcot run --dry-run` on every run config in experiments/, and config errors that name the key."""


import pytest

from tests.conftest import ROOT, run_fcot

RUN_CONFIGS = sorted(p for p in (ROOT / "experiments").rglob("*.yaml")
                     if "sweeps" not in p.parts and "prompts" not in p.parts)


def test_experiments_has_the_papers_36_configs_and_a_quickstart():
    names = {p.name for p in RUN_CONFIGS}
    assert "quickstart.yaml" in names
    assert len([p for p in RUN_CONFIGS if p.parent.name == "paper"]) == 36
    # Each finds its data through the data dir or `log: TASK`, never a path to this project's ../shared/data.
    for p in RUN_CONFIGS:
        assert not [ln for ln in p.read_text().splitlines() if "shared/" in ln.split("#")[0]], p


@pytest.mark.parametrize("config", RUN_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_run_config_dry_runs(config, shared_data, tmp_path):
    from fcot.config import load_config
    from fcot.run import RunConfig, dry_run

    notes = dry_run(load_config(RunConfig, config, [f"output_dir={tmp_path / 'run'}"]))
    assert any(n.startswith("task ") for n in notes)
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_dry_run_from_the_cli(shared_data, tmp_path):
    proc = run_fcot("run", ROOT / "experiments" / "quickstart.yaml", "--dry-run", f"output_dir={tmp_path / 'run'}")
    assert proc.returncode == 0 and '"valid": true' in proc.stdout, proc.stderr


@pytest.mark.parametrize("override,message", [
    ("teacher.engine.replica=2", "key 'teacher.engine.replica': unknown key"),
    ("train.epochs=many", "key 'train.epochs': input should be a valid integer"),
    ("teacher.engine.kind=gpt", "key 'teacher.engine.kind': input should be 'hf', 'vllm', 'openai' or 'recorded'"),
    ("train.model=./no/such/model", "key 'train.model': model folder"),
    ("train.num_workers=4", "key 'train.num_workers': 4 training workers x 2 CPUs > 2 CPUs"),
    ("tasks=[multiarithmetic]", "unknown task 'multiarithmetic'"),
    ("output_dir=s3://bucket/runs/q", "key 'output_dir': s3://bucket/runs/q: object storage URIs are not supported; "
                                      "use a path every node mounts"),
])
def test_config_errors_stop_before_any_work_and_name_the_key(override, message, tmp_path, shared_data):
    quickstart = ROOT / "experiments" / "quickstart.yaml"
    proc = run_fcot("run", quickstart, "--dry-run", f"output_dir={tmp_path / 'run'}", override)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_fcot("run", ROOT / "experiments" / "quickstart.yaml", f"output_dir={tmp_path / 'run'}", override)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tasks: [coin_flip\nteacher: {")
    proc = run_fcot("run", bad, "--dry-run")
    assert proc.returncode == 2 and f"{bad}: invalid YAML" in proc.stderr


@pytest.mark.parametrize("config", sorted((ROOT / "experiments" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_sweep_config_dry_runs(config, shared_data, tmp_path, monkeypatch):
    from fcot.config import load_config
    from fcot.sweep import SweepConfig, dry_run_sweep

    monkeypatch.chdir(ROOT)  # sweep configs name their base run config relative to the repository root
    notes = dry_run_sweep(load_config(SweepConfig, config, [f"output_dir={tmp_path / 'sweep'}"]))
    assert "teacher at D = " in notes[0]


def test_sweep_run_section_merges_into_its_base_config(shared_data, tmp_path, monkeypatch):
    """`run.train.epochs` in a sweep changes that key only: the base's student, batch and workers stay."""
    from fcot.config import load_config, read_yaml
    from fcot.run import RunConfig
    from fcot.sweep import SweepConfig, base_run, trial_dict

    monkeypatch.chdir(ROOT)
    cfg = load_config(SweepConfig, ROOT / "experiments" / "sweeps" / "cpu.yaml",
                      [f"output_dir={tmp_path}", "run.train.epochs=3", "run.curate.max_length=384"])
    quickstart = read_yaml(ROOT / "experiments" / "quickstart.yaml")
    run = load_config(RunConfig, base=trial_dict(base_run(cfg), {"train.lr": 0.003, "train.seed": 2}, 1))
    assert run.train.epochs == 3 and run.train.model.endswith(quickstart["train"]["model"])
    assert run.train.packing == quickstart["train"]["packing"] and run.train.lr == 0.003 and run.train.seed == 2
    assert run.train.batch_size == quickstart["train"]["batch_size"] and run.train.num_workers == 1
    assert run.extra_teachers == {} and run.baselines == []
    assert run.teacher.engine.kind == "recorded" and run.curate.max_length == 384
    assert run.curate.train_questions == quickstart["curate"]["train_questions"]
    assert run.eval.engine.batch_size == quickstart["eval"]["engine"]["batch_size"]
