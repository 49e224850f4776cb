"""`fcot submit` and `fcot jobs`: fcot's stages as Ray Jobs on a cluster, from a laptop.

    fcot submit experiments/quickstart.yaml --address http://127.0.0.1:8265            # the whole run
    fcot submit teach.yaml --address http://HOST:8265 --command teach engine.replicas=4
    fcot jobs status|logs|stop JOB_ID --address http://HOST:8265

The working dir (default: the current directory, i.e. the repository) is uploaded with the job's runtime
env, so the job runs the code and the config you have here; the config's path inside the job is its path
relative to the working dir. Secrets (WANDB_API_KEY, OPENAI_API_KEY, HF_TOKEN, the teacher's
`engine.api_key_env`) go to the job as runtime-env env vars taken from your environment at submit time: they
are never written to a file, and they are redacted wherever fcot echoes the runtime env or the job's logs.
Ray itself keeps a job's runtime env: anyone holding the cluster's token can read it through the Jobs API,
and the head's runtime_env_agent.log records it. On shared clusters give the nodes the secrets instead
(Kubernetes Secrets, see cluster/kuberay) and submit with --no-secrets.
Before submitting, the config's resource asks (engine replicas x GPUs, training workers x GPUs, ...) are
compared with the cluster's nodes; a config the cluster can never run is refused, naming the config key.

Ray's token authentication (on by default in Ray 2.60): the dashboard wants `Authorization: Bearer TOKEN`.
Ray's own client adds it only when RAY_AUTH_MODE=token is set in the client's environment; fcot sends it
itself whenever a token is found ($RAY_AUTH_TOKEN, the file at $RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token),
unless RAY_AUTH_MODE=disabled.

Inside the job, `python -m fcot.job COMMAND CONFIG ...` prints which secrets arrived (set / not set,
never a value) and then runs `fcot COMMAND CONFIG ...`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import time
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import yaml

from fcot.config import SECRET_WORDS, apply_override, load_config, read_yaml
from fcot.contracts.teacher import TeachConfig
from fcot.curate import CurateConfig
from fcot.errors import FcotError
from fcot.evaluate import EvalConfig
from fcot.ray_utils import auth_headers, auth_token
from fcot.resources import AUTH_HELP, check_resources
from fcot.rollout import RolloutConfig
from fcot.run import RunConfig
from fcot.sweep import SweepConfig
from fcot.train.config import TrainConfig

COMMANDS = ("run", "teach", "curate", "train", "eval", "rollout", "sweep")
# Forwarded from the submitter's environment when set, plus the teacher's `engine.api_key_env`.
SECRET_ENV = ("WANDB_API_KEY", "OPENAI_API_KEY", "HF_TOKEN")
# fcot.ray_utils.init_ray passes these to ray.init(runtime_env=...) inside the job; Ray refuses to merge a
# job runtime env that sets the same variables, so a job may not set them.
RESERVED_ENV = ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM")
# gitwildmatch patterns relative to the working dir; no trailing slash, so whole folders are pruned.
DEFAULT_EXCLUDES = ["/.venv", "/venv", "/runs", "/.git", "/wandb", "/build", "/.cache", "/.whl", "/.pytest_cache",
                    "__pycache__", "*.egg-info", "*.pyc"]
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
CONFIGS = {"run": RunConfig, "teach": TeachConfig, "curate": CurateConfig, "train": TrainConfig, "eval": EvalConfig,
           "rollout": RolloutConfig, "sweep": SweepConfig}


# ---------------------------------------------------------------------------------------------- auth, client

def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or (
        os.environ.get("RAY_ADDRESS", "") if os.environ.get("RAY_ADDRESS", "").startswith("http") else None)
    if not address:
        raise FcotError("--address http://HOST:8265 (the Ray dashboard) is needed, or $RAY_API_SERVER_ADDRESS")
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def make_client(address: str):
    """A JobSubmissionClient that carries the auth token; connection and auth errors become FcotError."""
    from ray.exceptions import AuthenticationError  # heavy: only where a cluster is asked
    from ray.job_submission import JobSubmissionClient

    logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)  # "WebSocket closed ..." noise
    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except AuthenticationError as e:
        raise FcotError(f"{address}: {str(e).splitlines()[0]}; {AUTH_HELP}") from None
    except ConnectionError:
        raise FcotError(f"cannot reach the Ray dashboard at {address}: is the cluster up and the port forwarded "
                        f"(`ray dashboard cluster/ray-cluster.yaml`, "
                        f"`kubectl port-forward svc/fcot-head-svc 8265`)?") from None


def _call(fn, *args, what: str):
    from ray.exceptions import AuthenticationError  # heavy: only where a cluster is asked

    try:
        return fn(*args)
    except AuthenticationError as e:
        raise FcotError(f"{what}: {str(e).splitlines()[0]}; {AUTH_HELP}") from None
    except RuntimeError as e:
        raise FcotError(f"{what}: {str(e).strip()[:300]}") from None


# ---------------------------------------------------------------------------------------------- secrets

def secret_names(cfg: dict, extra: list[str] | tuple = ()) -> list[str]:
    """Environment variables forwarded as secrets: the usual ones, the teacher's api_key_env, `extra`."""
    names = list(SECRET_ENV)
    teacher = cfg.get("teacher") if isinstance(cfg.get("teacher"), dict) else {}
    for engine in (cfg.get("engine"), teacher.get("engine")):
        if isinstance(engine, dict) and engine.get("api_key_env"):
            names.append(str(engine["api_key_env"]))
    names += list(extra)
    return list(dict.fromkeys(names))


def _looks_secret(name: str) -> bool:
    return any(w in name.lower() for w in SECRET_WORDS)


def redact_runtime_env(runtime_env: dict, secrets: set[str] | tuple = ()) -> dict:
    """A copy for printing: values of secret env vars (named in `secrets` or secret-looking) as ***."""
    out = json.loads(json.dumps(runtime_env, default=str))
    env = out.get("env_vars") or {}
    for k in list(env):
        if (k in secrets or _looks_secret(k)) and k != "FCOT_JOB_SECRETS":  # that one holds names only
            env[k] = "***"
    return out


class Redactor:
    """Replaces secret values in streamed text; holds back an unfinished line so a value split across
    chunks is still caught."""

    def __init__(self, values):
        self.values = sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)
        self.pending = ""

    def _clean(self, text: str) -> str:
        for v in self.values:
            text = text.replace(v, "***")
        return text

    def feed(self, chunk: str) -> str:
        text = self.pending + chunk
        cut = text.rfind("\n") + 1
        self.pending = text[cut:]
        return self._clean(text[:cut])

    def flush(self) -> str:
        text, self.pending = self.pending, ""
        return self._clean(text)


def _secret_values(names) -> list[str]:
    return [os.environ[n] for n in names if os.environ.get(n)] + ([auth_token()] if auth_token() else [])


# ---------------------------------------------------------------------------------------------- submit

def load_job_config(command: str, path: Path, overrides: list[str]):
    """The config as the job will see it, validated here (its paths resolved against this directory)."""
    return load_config(CONFIGS[command], path, overrides)


def _relative_output_dirs(cfg: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            out += _relative_output_dirs(v, f"{prefix}{k}.")
        elif k == "output_dir" and isinstance(v, str) and not os.path.isabs(v) and "://" not in v:
            out.append(f"{prefix}{k}={v}")
    return out


def build_runtime_env(working_dir: Path, runtime_env_file: str | None, env: list[str], secrets: list[str],
                      forward_secrets: bool = True) -> tuple[dict, list[str]]:
    """The job's runtime env (working dir, excludes, env vars incl. secrets) and the secret names sent."""
    base: dict[str, Any] = {}
    if runtime_env_file:
        try:
            base = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise FcotError(f"{runtime_env_file}: cannot read the runtime env ({str(e).splitlines()[0]})") from None
        if not isinstance(base, dict):
            raise FcotError(f"{runtime_env_file}: expected a mapping (working_dir, excludes, env_vars, ...)")
    env_vars = {str(k): str(v) for k, v in (base.get("env_vars") or {}).items()}
    for item in env:
        if "=" not in item:
            raise FcotError(f"--env {item!r}: expected NAME=VALUE")
        k, v = item.split("=", 1)
        env_vars[k] = v
    where = runtime_env_file or "--env"
    for k in env_vars:
        if k in RESERVED_ENV:
            raise FcotError(f"{where}: env var {k} is set by fcot itself inside the job (Ray refuses to merge it)")
        if k in secrets or k in SECRET_ENV or _looks_secret(k):
            raise FcotError(f"{where}: env var {k} looks like a secret; secrets are taken from your environment at "
                            f"submit time (export {k}=...; --secret {k}), never from files or the command line")
    sent = []
    for name in secrets if forward_secrets else ():
        if os.environ.get(name):
            env_vars[name] = os.environ[name]
            sent.append(name)
    env_vars["FCOT_JOB_SECRETS"] = ",".join(secrets)  # names only: the job reports which arrived
    runtime_env = {k: v for k, v in base.items() if k not in ("working_dir", "excludes", "env_vars")}
    runtime_env["working_dir"] = str(working_dir)
    runtime_env["excludes"] = list(dict.fromkeys(DEFAULT_EXCLUDES + list(base.get("excludes") or [])))
    runtime_env["env_vars"] = env_vars
    return runtime_env, sent


def submit(config: str, address: str | None = None, command: str = "run", overrides: list[str] | None = None,
           follow: bool = True, working_dir: str | None = None, runtime_env_file: str | None = None,
           env: list[str] | None = None, secrets: list[str] | None = None, python: str = "python",
           job_id: str | None = None, skip_resource_check: bool = False, forward_secrets: bool = True,
           log=None, out=None) -> str:
    """Submit `fcot COMMAND CONFIG OVERRIDES` as a Ray job; follow its logs unless `follow` is False.

    Returns the job id; raises FcotError if the job fails (or cannot be submitted)."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = out or sys.stdout
    overrides = list(overrides or [])
    if command not in COMMANDS:
        raise FcotError(f"--command {command!r}: expected one of {', '.join(COMMANDS)}")
    address = resolve_address(address)
    wd = Path(working_dir or ".").resolve()
    if not wd.is_dir():
        raise FcotError(f"--working-dir {wd}: not a directory")
    cfg_path = Path(config).resolve()
    if not cfg_path.is_file():
        raise FcotError(f"{config}: config file not found")
    try:
        rel = cfg_path.relative_to(wd).as_posix()
    except ValueError:
        raise FcotError(f"{config}: the config is outside the working dir {wd}; the job sees only the working dir "
                        f"(move the config inside it or pass --working-dir)") from None
    parts = rel.split("/")
    for pattern in DEFAULT_EXCLUDES:
        p = pattern.lstrip("/")
        if any(fnmatch(part, p) for part in (parts[:1] if pattern.startswith("/") else parts)):
            raise FcotError(f"{config}: inside {parts[0]}/, which is not uploaded with the job; put it elsewhere "
                            f"in the working dir (e.g. experiments/)")
    cfg = load_job_config(command, cfg_path, overrides)
    raw = read_yaml(cfg_path)
    for o in overrides:
        apply_override(raw, o)
    for item in _relative_output_dirs(raw):
        log(f"note: {item} is relative: the job writes it inside its copy of the working dir on the cluster "
            f"(deleted with the job's runtime env); use a path on shared storage, e.g. output_dir=/mnt/fcot/runs/NAME")
    client = make_client(address)
    if not skip_resource_check:
        for note in check_resources(cfg.demands(), address):
            log(f"resources: {note}")
    names = secret_names(cfg.model_dump(), secrets or [])
    runtime_env, sent = build_runtime_env(wd, runtime_env_file, list(env or []), names, forward_secrets)
    entrypoint = " ".join([python, "-m", "fcot.job", command, shlex.quote(rel), *map(shlex.quote, overrides)])
    log(f"submitting to {address}: {entrypoint}")
    log(f"runtime env: {json.dumps(redact_runtime_env(runtime_env, set(names)), sort_keys=True)}")
    if forward_secrets:
        log(f"secrets from your environment: {', '.join(sent) or 'none'} "
            f"(not set here: {', '.join(n for n in names if n not in sent) or 'none'})")
    else:
        log("secrets: none forwarded (--no-secrets: the cluster provides them)")
    try:
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=job_id,
                                   metadata={"fcot_command": command, "fcot_config": rel})
    except FcotError:
        raise
    except Exception as e:  # packaging errors (size limit), RuntimeError from the server
        msg = Redactor(_secret_values(names))
        raise FcotError(f"submitting to {address} failed: {msg.feed(str(e).strip()[:400] + chr(10)).strip()}") from None
    print(job_id, file=out, flush=True)
    log(f"job {job_id} submitted; logs: fcot jobs logs {job_id} --address {address}; "
        f"stop: fcot jobs stop {job_id} --address {address}")
    if follow:
        follow_job(client, job_id, names, out=out, log=log)
    return job_id


def follow_job(client, job_id: str, secret_env: list[str] | None = None, out=None, log=None) -> str:
    """Stream the job's logs (secrets redacted) until it ends; FcotError unless it SUCCEEDED."""
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    out = out or sys.stdout
    redactor = Redactor(_secret_values(list(secret_env or SECRET_ENV)))

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            text = redactor.feed(chunk)
            if text:
                out.write(text)
                out.flush()

    try:
        asyncio.run(tail())
    except KeyboardInterrupt:
        log(f"stopped following; job {job_id} goes on (fcot jobs stop {job_id} --address ...)")
        raise
    except Exception as e:  # a dropped websocket: fall back to polling
        log(f"log stream ended early ({type(e).__name__}); waiting for the job to finish")
    rest = redactor.flush()
    if rest:
        out.write(rest + "\n")
        out.flush()
    status = wait_job(client, job_id)
    info = _call(client.get_job_info, job_id, what=f"job {job_id}")
    if status != "SUCCEEDED":
        message = Redactor(_secret_values(list(secret_env or SECRET_ENV))).feed((info.message or "") + "\n").strip()
        message = message.splitlines()[0].split(", last available logs")[0] if message else "no message"
        raise FcotError(f"job {job_id} {status}: {message} (logs above; fcot jobs logs {job_id})")
    log(f"job {job_id} SUCCEEDED")
    return status


def wait_job(client, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> str:
    started = time.time()
    while True:
        status = str(_call(client.get_job_status, job_id, what=f"job {job_id}").value)
        if status in TERMINAL:
            return status
        if timeout_s is not None and time.time() - started > timeout_s:
            return status
        time.sleep(poll_s)


# ---------------------------------------------------------------------------------------------- CLI

def cmd_submit(args) -> None:
    submit(args.config, args.address, command=args.command_name, overrides=args.overrides, follow=not args.no_follow,
           working_dir=args.working_dir, runtime_env_file=args.runtime_env, env=args.env, secrets=args.secret,
           python=args.python, job_id=args.job_id, skip_resource_check=args.skip_resource_check,
           forward_secrets=not args.no_secrets)


def cmd_jobs(args) -> None:
    address = resolve_address(args.address)
    client = make_client(address)
    what = f"job {args.job_id}"
    if args.jobs_command == "status":
        info = _call(client.get_job_info, args.job_id, what=what)
        message = Redactor(_secret_values(SECRET_ENV)).feed((info.message or "") + "\n").rstrip("\n")
        row = {"job_id": args.job_id, "status": str(info.status.value), "message": message,
               "entrypoint": info.entrypoint, "start_time": info.start_time, "end_time": info.end_time,
               "metadata": info.metadata, "runtime_env": redact_runtime_env(info.runtime_env or {}, set(SECRET_ENV))}
        print(json.dumps(row, indent=2, default=str))
    elif args.jobs_command == "logs":
        if args.follow:
            follow_job(client, args.job_id)
        else:
            redactor = Redactor(_secret_values(SECRET_ENV))
            sys.stdout.write(redactor.feed(_call(client.get_job_logs, args.job_id, what=what)) + redactor.flush())
    elif args.jobs_command == "stop":
        stopped = _call(client.stop_job, args.job_id, what=what)
        print(f"job {args.job_id}: " + ("stop requested" if stopped else "already finished"))


def add_parsers(sub) -> None:
    """`fcot submit` and `fcot jobs` (called from fcot.cli.build_parser)."""
    p = sub.add_parser("submit", help="run a stage (default: the whole run) as a Ray job on a cluster")
    p.add_argument("config", help="YAML config inside the working dir (its path in the job is relative to it)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, passed to the job")
    p.add_argument("--address", help="Ray dashboard, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)")
    p.add_argument("--command", dest="command_name", choices=COMMANDS, default="run",
                   help="the fcot stage (default: run)")
    p.add_argument("--no-follow", action="store_true", help="print the job id and return at once")
    p.add_argument("--working-dir", help="folder uploaded with the job (default: the current directory)")
    p.add_argument("--runtime-env", help="runtime env YAML (e.g. cluster/runtime_env.yaml): env_vars, excludes, pip")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="a non-secret env var for the job")
    p.add_argument("--secret", action="append", default=[], metavar="NAME",
                   help="forward this variable from your environment as a secret (besides WANDB_API_KEY, "
                        "OPENAI_API_KEY, HF_TOKEN and the teacher's engine.api_key_env)")
    p.add_argument("--no-secrets", action="store_true",
                   help="forward no secret (the cluster's pods/nodes have them, e.g. from a Kubernetes Secret)")
    p.add_argument("--python", default="python", help="the cluster's Python that runs the job (default: python)")
    p.add_argument("--job-id", help="submission id (default: Ray's raysubmit_...)")
    p.add_argument("--skip-resource-check", action="store_true",
                   help="submit even if the cluster's nodes now cannot hold what the config asks (autoscaling)")
    p.set_defaults(func=cmd_submit)

    jobs = sub.add_parser("jobs", help="status, logs or stop of a submitted job")
    jobs = jobs.add_subparsers(dest="jobs_command", required=True)
    for name, text in (("status", "the job's status, message and runtime env (secrets redacted)"),
                       ("logs", "the job's logs so far (--follow: until it ends)"), ("stop", "stop the job")):
        q = jobs.add_parser(name, help=text)
        q.add_argument("job_id")
        q.add_argument("--address", help="Ray dashboard, e.g. http://127.0.0.1:8265 (default: $RAY_API_SERVER_ADDRESS)")
        if name == "logs":
            q.add_argument("--follow", action="store_true")
        q.set_defaults(func=cmd_jobs)
