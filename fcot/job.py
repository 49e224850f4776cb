"""A Ray job's entry point (`fcot submit` starts `python -m fcot.job COMMAND CONFIG ...`): report which secrets
arrived (never their values), then run `fcot COMMAND CONFIG ...`."""

from __future__ import annotations

import os
import shlex
import sys

from fcot.cli import main


def job_main(argv: list[str]) -> int:
    names = [n for n in os.environ.get("FCOT_JOB_SECRETS", "").split(",") if n]
    state = ", ".join(f"{n} {'set' if os.environ.get(n) else 'not set'}" for n in names) or "none expected"
    print(f"fcot job: fcot {' '.join(shlex.quote(a) for a in argv[:2])} in {os.getcwd()}; secrets: {state}",
          file=sys.stderr, flush=True)
    return main(argv)


if __name__ == "__main__":
    sys.exit(job_main(sys.argv[1:]))
