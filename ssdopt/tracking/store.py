"""Where runs and engines are logged: the MLflow store (a local SQLite file or a team's tracking
server), its client, the lock that serialises this machine's writers, and the errors an unreachable,
refusing or full store turns into (one SsdoptError, credentials redacted)."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ssdopt.errors import SsdoptError

# Bounded HTTP retries against a tracking server (MLflow's defaults: 7 retries, backoff factor 2,
# about 4 minutes per request). Set only when the user has not set them.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
# "1": experiments keep artifacts in the tracking server's store (`--artifacts-destination`, S3 for
# a team; `make infra-up` exports it), not under a client-side path
SERVER_ARTIFACTS = "SSDOPT_SERVER_ARTIFACTS"
_T = TypeVar("_T")


@dataclass(frozen=True)
class Store:
    tracking_uri: str
    artifact_root: str
    lock_file: Path | None = None  # serialises logging/promotion of the processes of this machine


def local_store(root: Path | str = "mlflow") -> Store:
    """The store to use: $MLFLOW_TRACKING_URI if set, else SQLite under `root` (absolute)."""
    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    lock = root / ".ssdopt-tracking.lock"
    if uri and os.environ.get(SERVER_ARTIFACTS) == "1":  # a team's server: its artifact store (S3)
        return Store(uri, "", lock)
    if uri:
        return Store(uri, (root / "artifacts").as_uri(), lock)
    root.mkdir(parents=True, exist_ok=True)
    return Store(f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri(), lock)


def existing_store(root: Path | str | None = None) -> Store:
    """local_store for reading: $MLFLOW_TRACKING_URI, or the SQLite store under `root` (params.yaml
    optimize.mlflow_root) that must exist already. Reading from another directory must not create an
    empty store there and then report that the model is not registered."""
    from ssdopt.config import section

    root = Path(root if root is not None else section("optimize").get("mlflow_root", "mlflow")).resolve()
    if not os.environ.get("MLFLOW_TRACKING_URI") and not (root / "mlflow.db").is_file():
        raise SsdoptError(
            root / "mlflow.db",
            "an MLflow store with the registered engines",
            "run from the project directory that ran the optimize flow (or `make run`), or set "
            "MLFLOW_TRACKING_URI to the tracking server",
        )
    return local_store(root)


def redact_uri(text: str) -> str:
    """`text` with the password of every scheme://user:password@host replaced by ***."""
    return re.sub(r"(\w+://[^/\s:@]+):[^/\s@]+@", r"\1:***@", text)


def _unreachable(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) says the server could not be reached, or went away in the
    middle of a response (a killed server: "Connection broken: IncompleteRead")."""
    import requests

    lost = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
    )
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, lost):
            return True
        seen = seen.__cause__ or seen.__context__
    hints = (
        "Max retries exceeded",
        "Connection refused",
        "Connection broken",
        "Connection aborted",
        "timeout",
    )
    return any(s in str(exc) for s in hints)


def _refused(exc: BaseException) -> bool:
    """True for an authentication / permission refusal by the server (HTTP 401/403)."""
    code = str(getattr(exc, "error_code", ""))
    return code in ("UNAUTHENTICATED", "PERMISSION_DENIED") or any(
        s in str(exc) for s in ("401", "403", "You are not authenticated", "Permission denied")
    )


def server_errors(func: Callable[..., _T]) -> Callable[..., _T]:
    """Turn an unreachable or refusing tracking server, or a full disk, into one SsdoptError (the
    function's first argument is the Store).

    The Prefect tasks retry it; the message names the server, never its credentials.
    """

    @functools.wraps(func)
    def wrapper(store: Store, *args: Any, **kwargs: Any) -> _T:
        try:
            return func(store, *args, **kwargs)
        except SsdoptError:
            raise
        except Exception as exc:
            where = f"MLflow tracking server {redact_uri(store.tracking_uri)}"
            reason = redact_uri(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)[:300]
            if "/mlflow-artifacts/" in str(exc):  # the server is up; its artifact store (S3) is not
                raise SsdoptError(
                    f"the artifact store behind {where} (its --artifacts-destination)",
                    f"uploads proxied through the server to succeed ({reason[:160]})",
                    "start the S3-compatible store, or fix the server's MLFLOW_S3_ENDPOINT_URL and "
                    "credentials, then rerun: the engine is kept on disk, the cut-short run is marked "
                    "FAILED and no registry version points at it",
                ) from None
            # 503: MLflow's answer when its database refuses (TEMPORARILY_UNAVAILABLE)
            if re.search(r"too many 503 error responses|TEMPORARILY_UNAVAILABLE", str(exc)):
                retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
                code = "503"
                raise SsdoptError(
                    f"the database behind {where} (its --backend-store-uri: PostgreSQL for a team)",
                    f"a database that answers (the server answered HTTP {code} to each request, "
                    f"retried up to {retries} times)",
                    "start the tracking server's database (`pg_ctl start` on the team's PostgreSQL; "
                    "here `make infra-up`) or see the tracking server's log, then rerun: the engine is "
                    "kept on disk, no registry version is made without its finished run and "
                    "artifacts, and the rerun registers a run that finished once",
                ) from None
            if _unreachable(exc):
                retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
                cause = re.search(
                    r"\[Errno -?\d+\][^'\")]*|Connection broken[^'\"]*|Read timed out", str(exc)
                )
                reason = cause.group(0).strip() if cause else reason
                raise SsdoptError(
                    where,
                    f"a reachable server (each request retried up to {retries} times: {reason})",
                    "start the server or fix MLFLOW_TRACKING_URI, then rerun; built engines are kept "
                    "on disk and reused, and nothing already logged is logged twice",
                ) from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SsdoptError(
                    exc.filename2 or exc.filename or store.artifact_root or store.tracking_uri,
                    f"free space for the run's artifacts ({exc.strerror})",
                    "free disk space and rerun: the cut-short run is marked FAILED and the engine is "
                    "logged again",
                ) from exc
            if _refused(exc):
                raise SsdoptError(
                    where,
                    f"credentials it accepts ({reason})",
                    "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD of a user with "
                    "permission on the experiment and the registered model",
                ) from None
            raise

    return wrapper


@contextmanager
def exclusive(store: Store) -> Iterator[None]:
    """Hold the store's lock file (flock: released by the kernel even when the holder is killed)."""
    if store.lock_file is None:
        yield
        return
    store.lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(store.lock_file, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def mlflow_client(store: Store):  # noqa: ANN202 - mlflow type kept out of the signature
    # MLflow draws a "Downloading artifacts" bar per logged model (it reads the model back to validate
    # it): noise between our own progress bars and the table. The user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    import logging

    import mlflow

    # "Creating initial MLflow database tables..." and friends: INFO chatter on every fresh store
    if "MLFLOW_LOGGING_LEVEL" not in os.environ:
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)

    if store.tracking_uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
    mlflow.set_tracking_uri(store.tracking_uri)
    mlflow.set_registry_uri(store.tracking_uri)
    return mlflow.MlflowClient(store.tracking_uri, store.tracking_uri)


def experiment_id(store: Store, name: str) -> str:
    """Create the experiment (artifacts under the store's artifact root) or return it."""
    client = mlflow_client(store)
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    # a tracking server keeps artifacts where its --artifacts-destination says (S3 for a team's
    # server): a client-side file path would put them on this machine's disk, out of the team's reach
    location = f"{store.artifact_root}/{name}" if store.artifact_root else None
    return client.create_experiment(name, artifact_location=location)
