import os
import time

from fcot.train.ds_ops import clear_stale_locks


def test_stale_build_locks_are_removed_fresh_ones_kept(tmp_path):
    """A process killed while loading a DeepSpeed op leaves its lock; torch would then wait forever."""
    built, building = tmp_path / "op_a", tmp_path / "op_b"
    for folder in (built, building):
        folder.mkdir()
        (folder / "lock").write_text("")
    (built / "op_a.so").write_text("")
    old = time.time() - 120
    os.utime(built / "lock", (old, old))
    os.utime(building / "lock", (old, old))  # a build may legitimately take minutes
    assert clear_stale_locks(tmp_path) == [built / "lock"]
    assert (building / "lock").exists()
    ancient = time.time() - 3600
    os.utime(building / "lock", (ancient, ancient))
    assert clear_stale_locks(tmp_path) == [building / "lock"]
