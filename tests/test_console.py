"""fcot.console: during `fcot run`, fcot's own lines on the console and everything in the run's log."""

import subprocess
import sys

SCRIPT = r'''
import subprocess, sys
from fcot.console import to_log
with to_log(sys.argv[1]) as say:
    say("task coin_flip: 350 train questions")
    print("[teacher] 16/32 samples (50%)", file=sys.stderr)
    print("\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.2)\x1b[0m [train] 1/2 steps (50%)")
    print("\x1b[36m(RayTrainWorker pid=12)\x1b[0m DeepSpeed op built successfully")
    print("[2026-12-07 05:04:23,951 E 31113 31113] core_worker.cc:2465: Actor with class name", file=sys.stderr)
    subprocess.run(["bash", "-c", "echo wandb: Run history; echo 'fcot: warning: from a child' >&2"])
    sys.stdout.write("a last line without its newline")
print("after", file=sys.stderr)
'''


def test_fcot_lines_reach_the_console_and_every_line_the_log(tmp_path):
    log = tmp_path / "run" / "output.log"
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"fcot: the output of Ray, DeepSpeed, vLLM and W&B goes to {log}", "task coin_flip: 350 train questions",
        "[teacher] 16/32 samples (50%)", "[train] 1/2 steps (50%)", "fcot: warning: from a child", "after"]
    lines = log.read_text().splitlines()
    assert lines[1:] == ["task coin_flip: 350 train questions", "[teacher] 16/32 samples (50%)",
                         "\x1b[36m(RayTrainWorker pid=12, ip=10.0.0.2)\x1b[0m [train] 1/2 steps (50%)",
                         "\x1b[36m(RayTrainWorker pid=12)\x1b[0m DeepSpeed op built successfully",
                         "[2026-12-07 05:04:23,951 E 31113 31113] core_worker.cc:2465: Actor with class name",
                         "wandb: Run history", "fcot: warning: from a child", "a last line without its newline"]
