"""A team's shared servers on loopback: PostgreSQL, an S3-compatible store (moto), MLflow (PostgreSQL
backend, S3 artifacts, basic auth) and Prefect (PostgreSQL). The same code serves `make infra-up`
and tests/infra, so what the README tells a team to run is what the tests run.

Each server is a child process in its own session (killed by process group, never by name), waited
for by a readiness check with a bounded timeout. Credentials go to the servers through environment
variables and files, never on a command line (`ps` shows those) and never into ssdopt's logs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ssdopt.errors import SsdoptError

PG_BIN_DIRS = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
START_TIMEOUT_S = 120.0
BUCKET = "mlflow"
PG_USER = "ssdopt"
INSTALL_PG = "install PostgreSQL's server binaries: `apt-get install -y postgresql` (Debian)"
HEARTBEAT_S = 30  # a flow run's heartbeat period (Prefect's minimum) where a worker runs it
ZOMBIE_AUTOMATION = "ssdopt: crash flow runs whose heartbeats stopped"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pg_bin(tool: str) -> Path:
    """A PostgreSQL server binary (initdb, pg_ctl, postgres): Debian keeps them off PATH."""
    for folder in PG_BIN_DIRS:
        if (folder / tool).is_file():
            return folder / tool
    found = shutil.which(tool)
    if found:
        return Path(found)
    raise SsdoptError(
        f"PostgreSQL's `{tool}`", "the server binaries under /usr/lib/postgresql/*/bin", INSTALL_PG
    )


def _venv_tool(name: str) -> str:
    local = Path(sys.executable).with_name(name)
    return str(local) if local.exists() else name


def wait_until(
    ready: Callable[[], bool], what: str, log: Path, proc: subprocess.Popen | None, timeout: float
) -> None:
    """Poll `ready()` until true; a dead process or the timeout is an SsdoptError with the log's tail."""
    deadline = time.monotonic() + timeout
    while not ready():
        tail = log.read_text(errors="replace")[-1500:] if log.is_file() else ""
        if proc is not None and proc.poll() is not None:
            raise SsdoptError(what, f"a running server (it exited {proc.returncode}):\n{tail}", f"see {log}")
        if time.monotonic() > deadline:
            raise SsdoptError(what, f"ready within {timeout:.0f} s:\n{tail}", f"see {log}")
        time.sleep(0.2)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status < 500
    except urllib.error.HTTPError as exc:
        return exc.code < 500
    except OSError:
        return False


def stop_group(pid: int | None, timeout: float = 20.0) -> None:
    """SIGTERM the process group `pid` leads (a server started here and its workers), SIGKILL after
    `timeout`; nothing else is signalled."""
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _spawn(command: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


@dataclass
class Infra:
    """Ports, credentials and process ids of one set of servers under `root` (state in infra.json)."""

    root: str
    pg_port: int = field(default_factory=free_port)
    s3_port: int = field(default_factory=free_port)
    mlflow_port: int = field(default_factory=free_port)
    prefect_port: int = field(default_factory=free_port)
    pg_password: str = field(default_factory=lambda: "pg-" + secrets.token_urlsafe(18))
    s3_key: str = field(default_factory=lambda: "AK" + secrets.token_hex(8).upper())
    s3_secret: str = field(default_factory=lambda: "s3-" + secrets.token_urlsafe(24))
    admin_password: str = field(default_factory=lambda: "ml-" + secrets.token_urlsafe(18))
    pids: dict[str, int] = field(default_factory=dict)
    # a flow run RUNNING without a heartbeat for this long is marked CRASHED by the Prefect server
    # (its worker, or the worker's machine, died with it); > HEARTBEAT_S, so healthy runs never are
    zombie_after_s: int = 90
    # the cluster lives outside `root`: its owner (`postgres` where we are root) must reach it, and
    # pytest's and mktemp's folders are private to root
    pg_root: str = ""

    # -- where things are -------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return Path(self.root)

    @property
    def mlflow_url(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def s3_url(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def pg_uri(self, database: str, driver: str = "postgresql") -> str:
        return f"{driver}://{PG_USER}:{self.pg_password}@127.0.0.1:{self.pg_port}/{database}"

    def client_env(self) -> dict[str, str]:
        """What a team member exports to log to the shared MLflow and run on the shared Prefect."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.admin_password,
            "PREFECT_API_URL": self.prefect_api,
            # a worker started with this passes it to its flow runs: their heartbeats stop when the
            # worker's machine dies, and the server's zombie automation marks them CRASHED
            "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_S),
            "SSDOPT_SERVER_ARTIFACTS": "1",  # artifacts into the server's S3 bucket
        }

    def secrets(self) -> list[str]:
        return [self.pg_password, self.s3_secret, self.admin_password]

    def save(self) -> Path:
        state = self.path / "infra.json"
        tmp = state.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.chmod(0o600)
        tmp.replace(state)
        return state

    @classmethod
    def load(cls, root: Path | str) -> Infra:
        state = Path(root) / "infra.json"
        if not state.is_file():
            raise SsdoptError(state, "the state `make infra-up` writes", "run `make infra-up` first")
        return cls(**json.loads(state.read_text()))

    # -- PostgreSQL ------------------------------------------------------------------------------
    def _pg_owner(self) -> list[str]:
        """initdb and postgres refuse root: run them as the `postgres` user where we are root."""
        if os.geteuid() != 0:
            return []
        try:
            pwd.getpwnam("postgres")
        except KeyError as exc:
            raise SsdoptError(
                "user `postgres`", "an unprivileged user to own the cluster", INSTALL_PG
            ) from exc
        return ["runuser", "-u", "postgres", "--"]

    @property
    def pg_dir(self) -> Path:
        if not self.pg_root:
            import tempfile

            self.pg_root = tempfile.mkdtemp(prefix="ssdopt-pg-")
            if self._pg_owner():
                shutil.chown(self.pg_root, "postgres")
        return Path(self.pg_root)

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    def start_postgres(self, timeout: float = START_TIMEOUT_S) -> None:
        pg = self.pg_dir
        pwfile = pg / "pwfile"
        if not self.pg_data.is_dir():
            pwfile.write_text(self.pg_password + "\n")
            if self._pg_owner():
                shutil.chown(pwfile, "postgres")
            done = subprocess.run(
                [*self._pg_owner(), str(pg_bin("initdb")), "-D", str(self.pg_data), "-U", PG_USER,
                 f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8", "--no-sync"],
                capture_output=True, text=True, timeout=timeout,
            )  # fmt: skip
            pwfile.unlink()
            if done.returncode != 0:
                raise SsdoptError(
                    "initdb", f"a new cluster in {self.pg_data} ({done.stderr[-800:]})", INSTALL_PG
                )
        self.restart_postgres(timeout)
        for database in ("mlflow", "prefect"):
            self._psql(f"CREATE DATABASE {database}", check_exists=database)

    def restart_postgres(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start (or start again after `stop_postgres`) the cluster; returns when it accepts logins."""
        options = f"-c listen_addresses=127.0.0.1 -p {self.pg_port} -k {self.pg_dir} -c fsync=off"
        log = self.pg_dir / "postgres.log"
        done = subprocess.run(
            [*self._pg_owner(), str(pg_bin("pg_ctl")), "-D", str(self.pg_data), "-l", str(log),
             "-o", options, "-w", "-t", str(int(timeout)), "start"],
            capture_output=True, text=True, timeout=timeout + 10,
        )  # fmt: skip
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-800:] if log.is_file() else done.stderr
            raise SsdoptError(
                f"PostgreSQL on 127.0.0.1:{self.pg_port}", f"a started server ({tail})", f"see {log}"
            )

    def stop_postgres(self, mode: str = "fast") -> None:
        if (self.pg_data / "postmaster.pid").is_file():
            subprocess.run(
                [*self._pg_owner(), str(pg_bin("pg_ctl")), "-D", str(self.pg_data), "-m", mode, "-w", "stop"],
                capture_output=True, timeout=60, check=False,
            )  # fmt: skip

    def _psql(self, sql: str, check_exists: str | None = None) -> None:
        import psycopg2

        conn = psycopg2.connect(self.pg_uri("postgres"))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                if check_exists:
                    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (check_exists,))
                    if cur.fetchone():
                        return
                cur.execute(sql)
        finally:
            conn.close()

    # -- S3 (moto's standalone server) -----------------------------------------------------------
    def start_s3(self, timeout: float = START_TIMEOUT_S) -> None:
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.s3_key, "AWS_SECRET_ACCESS_KEY": self.s3_secret}
        log = self.path / "s3.log"
        proc = _spawn(
            [_venv_tool("moto_server"), "-H", "127.0.0.1", "-p", str(self.s3_port)], log, env, self.path
        )
        self.pids["s3"] = proc.pid
        wait_until(
            lambda: http_ok(f"{self.s3_url}/moto-api/"), f"S3 server {self.s3_url}", log, proc, timeout
        )
        self._s3_client().create_bucket(Bucket=BUCKET)

    def _s3_client(self):  # noqa: ANN202 - boto3 type
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.s3_url, aws_access_key_id=self.s3_key,
            aws_secret_access_key=self.s3_secret, region_name="us-east-1",
        )  # fmt: skip

    def s3_objects(self) -> list[str]:
        pages = self._s3_client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    # -- MLflow ----------------------------------------------------------------------------------
    def start_mlflow(self, timeout: float = START_TIMEOUT_S) -> None:
        folder = self.path / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        config = folder / "basic_auth.ini"
        config.write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.pg_uri('mlflow', 'postgresql+psycopg2')}\n"
            f"admin_username = admin\nadmin_password = {self.admin_password}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 300\n"
        )
        config.chmod(0o600)
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))},
            "MLFLOW_BACKEND_STORE_URI": self.pg_uri("mlflow", "postgresql+psycopg2"),  # env: `ps` shows argv
            "MLFLOW_AUTH_CONFIG_PATH": str(config),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": self.s3_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        command = [
            _venv_tool("mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
            "--workers", "1", "--app-name", "basic-auth", "--artifacts-destination", f"s3://{BUCKET}/",
        ]  # fmt: skip
        log = folder / "server.log"
        proc = _spawn(command, log, env, folder)
        self.pids["mlflow"] = proc.pid
        wait_until(
            lambda: http_ok(f"{self.mlflow_url}/health"),
            f"MLflow server {self.mlflow_url}",
            log,
            proc,
            timeout,
        )

    # -- Prefect ---------------------------------------------------------------------------------
    def prefect_env(self) -> dict[str, str]:
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")},
            "PREFECT_HOME": str(self.path / "prefect"),
            "PREFECT_API_URL": self.prefect_api,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "WARNING",
        }

    def start_prefect(self, timeout: float = START_TIMEOUT_S) -> None:
        (self.path / "prefect").mkdir(parents=True, exist_ok=True)
        env = {
            **self.prefect_env(),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.pg_uri("prefect", "postgresql+asyncpg"),
        }
        env.pop("PREFECT_API_URL")
        log = self.path / "prefect" / "server.log"
        command = [
            _venv_tool("prefect"),
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.prefect_port),
        ]
        proc = _spawn(command, log, env, self.path / "prefect")
        self.pids["prefect"] = proc.pid
        wait_until(
            lambda: http_ok(f"{self.prefect_api}/health"),
            f"Prefect server {self.prefect_api}",
            log,
            proc,
            timeout,
        )
        self.create_zombie_automation()

    def create_zombie_automation(self) -> None:
        """The Prefect automation that marks a flow run CRASHED once its heartbeats stop for
        `zombie_after_s` (Prefect's own zombie detection: a SIGKILLed worker, or its machine gone,
        reports nothing). Created once; `up` again finds it."""
        existing = self._prefect_request("POST", "/automations/filter", {"limit": 200})
        if any(a.get("name") == ZOMBIE_AUTOMATION for a in existing):
            return
        terminal = ("Completed", "Failed", "Cancelled", "Crashed")
        self._prefect_request(
            "POST",
            "/automations/",
            {
                "name": ZOMBIE_AUTOMATION,
                "description": f"no heartbeat for {self.zombie_after_s} s (beats every {HEARTBEAT_S} s)",
                "enabled": True,
                "trigger": {
                    "type": "event",
                    "posture": "Proactive",
                    "match": {"prefect.resource.id": "prefect.flow-run.*"},
                    # Running too: a run killed before its first heartbeat reached the server
                    "after": ["prefect.flow-run.Running", "prefect.flow-run.heartbeat"],
                    "expect": ["prefect.flow-run.heartbeat", *(f"prefect.flow-run.{t}" for t in terminal)],
                    "for_each": ["prefect.resource.id"],
                    "threshold": 1,
                    "within": self.zombie_after_s,
                },
                "actions": [
                    {
                        "type": "change-flow-run-state",
                        "state": "CRASHED",
                        "message": f"no heartbeat for {self.zombie_after_s} s: its worker died",
                    }
                ],
            },
        )

    def _prefect_request(self, method: str, path: str, body: dict | None = None):  # noqa: ANN202 - JSON
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            f"{self.prefect_api}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"null")

    # -- all together ----------------------------------------------------------------------------
    def up(self, prefect: bool = True) -> Infra:
        """Start every server (PostgreSQL, S3, MLflow, then Prefect); on any failure stop those
        already started, so a failed `up` leaves no process behind."""
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            self.start_postgres()
            self.start_s3()
            self.start_mlflow()
            if prefect:
                self.start_prefect()
        except BaseException:
            self.down()
            raise
        self.save()
        return self

    def down(self, purge: bool = False) -> None:
        """Stop what `up` started, servers first, then PostgreSQL; `purge` also deletes the cluster."""
        for name in ("prefect", "mlflow", "s3"):
            stop_group(self.pids.pop(name, None))
        if self.pg_root:
            self.stop_postgres()
            if purge:
                shutil.rmtree(self.pg_root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m ssdopt.infra up|down [ROOT]`: the servers of `make infra-up` / `make infra-down`."""
    args = argv if argv is not None else sys.argv[1:]
    if not args or args[0] not in ("up", "down"):
        print("usage: python -m ssdopt.infra up|down [ROOT]", file=sys.stderr)
        return 2
    root = Path(args[1] if len(args) > 1 else ".infra").resolve()
    try:
        if args[0] == "up":
            infra = Infra(str(root)).up()
            print(f"# servers under {root}; stop them with `make infra-down`")
            for name, value in infra.client_env().items():
                print(f"export {name}={value}")
        else:
            Infra.load(root).down(purge=True)  # the next `up` starts a fresh cluster
            print(f"stopped the servers of {root}")
    except SsdoptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
