"""`fcot data download` against a real HTTP server on 127.0.0.1 that serves a mirror of the public files."""

import functools
import http.server
import shutil
import threading

import pytest

from fcot.tasks import load_split
from tests.conftest import run_fcot


@pytest.fixture
def mirror(tmp_path, shared_data):
    root = tmp_path / "mirror"
    shutil.copytree(shared_data / "splits", root / "splits")
    shutil.copytree(shared_data / "teacher_logs", root / "teacher_logs")
    for folder in ("MultiArith", "coin_flip", "AQuA"):
        shutil.copytree(shared_data / "datasets" / folder, root / "datasets" / folder)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_checks_sha256_writes_atomically_and_skips_what_is_there(tmp_path, mirror):
    root, url = mirror
    dest = tmp_path / "data"
    proc = run_fcot("data", "download", "--task", "multiarith", "--task", "coin_flip", "--mirror", url,
                    "--data-dir", dest, check=True)
    assert "downloaded   datasets/MultiArith/MultiArith.json" in proc.stdout
    assert "downloaded   splits/multiarith__template.json" in proc.stdout
    assert "downloaded   teacher_logs/multiarith_zero_shot_cot.log" in proc.stdout  # the recorded 175B teacher
    assert len(load_split("multiarith", "train", root=dest)) == 420
    assert not list(dest.rglob(".*.tmp"))

    again = run_fcot("data", "download", "--task", "multiarith", "--mirror", url, "--data-dir", dest, check=True)
    assert "downloading" not in again.stderr and again.stdout.count("present") == 4

    # A corrupted source is refused, and the good local copy stays untouched.
    (dest / "datasets" / "coin_flip" / "coin_flip.json").unlink()
    (root / "datasets" / "coin_flip" / "coin_flip.json").write_text('{"examples": []}')
    bad = run_fcot("data", "download", "--task", "coin_flip", "--mirror", url, "--data-dir", dest)
    assert bad.returncode == 2 and "does not match the expected 68cf2017" in bad.stderr
    assert not (dest / "datasets" / "coin_flip" / "coin_flip.json").exists()


def test_unpinned_file_is_recorded_and_an_unreachable_source_named(tmp_path, mirror):
    root, url = mirror
    (root / "datasets" / "AQuA" / "train.json").write_text("")  # stands in for the 97k-record file
    (root / "teacher_logs" / "aqua_zero_shot_cot.log").write_text("")  # and for its log (not in ../shared)
    dest = tmp_path / "data"
    proc = run_fcot("data", "download", "--task", "aqua", "--mirror", url, "--data-dir", dest, check=True)
    assert "downloaded (sha256 e3b0c442" in proc.stdout  # not pinned: its sha256 is printed
    gone = run_fcot("data", "download", "--task", "svamp", "--mirror", url, "--data-dir", dest)
    assert gone.returncode == 2 and f"{url}/datasets/SVAMP/SVAMP.json: download failed" in gone.stderr
