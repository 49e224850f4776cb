"""The README's two commands, as written: CI runs the second; the first runs here from a fresh clone of this
repository with nothing beside it (its relative default run directory included), and again, resuming."""

import os
import re
import subprocess
import time
import zipfile

import pytest

from tests.conftest import ROOT


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_ci_runs_exactly_the_readme_test_command():
    main, tests = readme_commands()
    assert main.startswith("bash scripts/setup.sh && ") and "fcot run experiments/quickstart.yaml" in main
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == tests


def _wheel(folder, name: str, version: str):
    """A minimal valid pure-Python wheel: what pip reads to resolve a pin, nothing else."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}/__init__.py": "",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as whl:
        for path, text in files.items():
            whl.writestr(path, text)
        whl.writestr(f"{dist}/RECORD", "".join(f"{p},,\n" for p in [*files, f"{dist}/RECORD"]))


def test_setup_takes_torch_from_the_index_that_has_the_right_build(tmp_path):
    """GPU: PyPI's torch (CUDA). CPU: PyTorch's CPU index, unless the pin installs from local disk with no index."""
    gpu_bin, wheelhouse = tmp_path / "bin", tmp_path / "wheels"
    gpu_bin.mkdir()
    wheelhouse.mkdir()
    (gpu_bin / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (gpu_bin / "nvidia-smi").chmod(0o755)
    _wheel(wheelhouse, "torch", "2.13.0")
    # No pip configuration of this machine's (its wheelhouse of torch's CPU build); then one of ours, or a GPU.
    bare = {k: v for k, v in os.environ.items() if k != "PIP_FIND_LINKS"} | {"PIP_CONFIG_FILE": os.devnull}
    cases = {"cpu": bare, "cpu, torch in a local wheelhouse": bare | {"PIP_FIND_LINKS": str(wheelhouse)},
             "gpu": bare | {"PATH": f"{gpu_bin}{os.pathsep}{os.environ['PATH']}"}}
    printed = {}
    for case, env in cases.items():
        proc = subprocess.run(["bash", "scripts/setup.sh", "--print-torch-command"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        printed[case] = proc.stdout.strip()
    plain = ".venv/bin/python -m pip install -q torch==2.13.0"
    assert printed == {"cpu": f"{plain} --index-url https://download.pytorch.org/whl/cpu",
                       "cpu, torch in a local wheelhouse": plain, "gpu": plain}


@pytest.mark.slow
def test_the_main_command_runs_the_quickstart_from_a_fresh_clone_with_nothing_beside_it(tmp_path):
    """As a new user: a clone with no ../shared beside it, no FCOT_DATA_DIR and no data dir in the user cache."""
    from fcot.models import models_dir
    from fcot.train.ds_ops import torch_extensions_dir

    main, _ = readme_commands()
    clone = tmp_path / "fcot"
    # The clone shares this checkout's .venv (below): set it up for this pyproject first, or the clone's setup.sh
    # (on a changed pyproject.toml) would reinstall fcot editable from the clone, which is deleted afterwards.
    subprocess.run(["bash", "scripts/setup.sh"], cwd=ROOT, check=True, capture_output=True)
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    assert not (clone.parent / "shared").exists()
    # The environment `bash scripts/setup.sh` made here (a clone of the same commit has the same
    # pyproject.toml and setup.sh, so its setup.sh finds it set up); CI itself starts from a fresh one.
    (clone / ".venv").symlink_to(ROOT / ".venv")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FCOT_DATA_DIR", "RAY_"))}
    # An empty user cache (no ~/.cache/fcot/data); the models and DeepSpeed's op where this machine keeps them.
    env |= {"XDG_CACHE_HOME": str(tmp_path / "cache"), "FCOT_MODELS_DIR": str(models_dir()),
            "FCOT_TORCH_EXTENSIONS_DIR": str(torch_extensions_dir())}
    started = time.time()
    first = subprocess.run(["bash", "-c", main], cwd=clone, env=env, capture_output=True, text=True, timeout=1800)
    assert first.returncode == 0, first.stderr[-3000:]
    report = (clone / "runs" / "quickstart" / "report.md").read_text()
    print(f"quickstart from a fresh clone: {time.time() - started:.0f} s")
    # Its verdict comes first: the paper's effect, with its interval; then the majority row and the live teacher.
    assert re.search(r"\*\*coin_flip: Fine-tune-CoT beats vanilla fine-tuning by \+\d+\.\d points \[\+\d+\.\d, ",
                     report.splitlines()[2]), report.splitlines()[2]
    assert re.search(r"\| coin_flip \| fine_tune_cot \| \d+\.\d% \[\d+\.\d, \d+\.\d\]", report)
    assert "| coin_flip | majority (`" in report and "teacher-smollm2-135m" in report
    # The console: fcot's lines; Ray's, DeepSpeed's and W&B's in the log it names once.
    log = clone / "runs" / "quickstart" / "output.log"
    assert first.stderr.count(str(log)) == 1 and "core_worker" in log.read_text()
    assert not re.search(r"core_worker|built successfully|wandb:|pid=\d+", first.stderr), first.stderr
    assert "[train] " in first.stderr and "report: " in first.stderr
    again = subprocess.run(["bash", "-c", main], cwd=clone, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and again.stderr.count("done before, skipped") == 8, again.stderr[-2000:]
