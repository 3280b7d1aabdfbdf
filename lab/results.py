"""Artifacts: pydantic models with schema_version and the environment fingerprint, atomic writes,
and a tolerant reader that names a corrupt file and says why.

Every step's artifact subclasses `Artifact` and registers itself with `@register`, so one reader
(`read_artifact`) returns the right model for any file and the dashboard and gate never guess.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lab.env import Fingerprint, fingerprint
from lab.errors import LabError

SCHEMA_VERSION = 1
Status = Literal["ok", "failed", "skipped"]
Scalar = float | int | bool | str | None

# File names inside a drill report (reports/<run-id>/): one artifact per step.
STEP_FILES = {
    "health": "health.json",
    "warmup": "warmup.json",
    "compare": "compare.json",
    "loadtest": "load_test.json",
    "tiers": "tiers.json",  # lab compare-tiers: the fallback as a fraction of the multi-GPU tier
}
MANIFEST_FILE = "manifest.json"
EXPECTATIONS_FILE = "expectations.json"

_REGISTRY: dict[str, type[Artifact]] = {}
A = TypeVar("A", bound="Artifact")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Artifact(BaseModel):
    """Fields every artifact carries (MEASUREMENT.md, 'Every artifact')."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    schema_version: int = SCHEMA_VERSION
    kind: str
    status: Status = "ok"
    reason: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    environment: Fingerprint
    started_at: datetime
    finished_at: datetime | None = None
    # Flat, alerting-friendly numbers; null where not measurable (the reason is in `unavailable`).
    summary: dict[str, Scalar] = Field(default_factory=dict)
    unavailable: dict[str, str] = Field(default_factory=dict)


class ArtifactError(LabError):
    """A file that is missing, not JSON, or not a valid artifact; the message names the file."""


def register(cls: type[A]) -> type[A]:
    """Class decorator: map the model's default `kind` to the class for `read_artifact`."""
    kind = cls.model_fields["kind"].default
    if not isinstance(kind, str):
        raise TypeError(f"{cls.__name__} needs a default kind")
    _REGISTRY[kind] = cls
    return cls


def registered_kinds() -> dict[str, type[Artifact]]:
    return dict(_REGISTRY)


def new_artifact(cls: type[A], params: dict[str, Any], **fields: Any) -> A:
    """Start an artifact: fingerprint and start time now, status ok until told otherwise."""
    return cls(params=_jsonable(params), environment=fingerprint(), started_at=utcnow(), **fields)


def _jsonable(params: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(params, default=str))


def finish(artifact: A, status: Status | None = None, reason: str | None = None) -> A:
    artifact.finished_at = utcnow()
    if status is not None:
        artifact.status = status
    if reason is not None:
        artifact.reason = reason
    return artifact


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write via a temp file in the same directory and rename: a reader never sees half a file,
    and a failed write leaves any earlier file at `path` intact."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise LabError(
            f"cannot write {path}: {e.strerror or e}; choose a writable output directory"
        ) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise LabError(
            f"cannot write {path}: {e.strerror or e}; free space or choose a writable output directory"
        ) from None
    return path


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, default=str, allow_nan=False) + "\n")


def write_artifact(path: str | os.PathLike[str], artifact: Artifact) -> Path:
    if artifact.finished_at is None:
        artifact.finished_at = utcnow()
    text = artifact.model_dump_json(indent=2)
    return atomic_write_text(path, text + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found; check the path") from None
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror or e}); check permissions") from None
    except UnicodeDecodeError:
        raise ArtifactError(f"{path}: not a text file; expected a JSON artifact") from None
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ArtifactError(
            f"{path}: corrupt JSON at line {e.lineno} column {e.colno} ({e.msg}); re-run the step that wrote it"
        ) from None


def read_artifact(path: str | os.PathLike[str], expect: type[A] | None = None) -> A | Artifact:
    """Read and validate any registered artifact; raise ArtifactError naming the file and why."""
    data = read_json(path)
    if not isinstance(data, dict) or "kind" not in data:
        raise ArtifactError(f"{path}: not a lab artifact (no 'kind' field)")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ArtifactError(f"{path}: no integer schema_version; not a lab artifact")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: schema_version {version} is newer than this lab understands ({SCHEMA_VERSION}); upgrade lab"
        )
    cls = expect or _REGISTRY.get(data["kind"], Artifact)
    if expect is not None and data["kind"] != expect.model_fields["kind"].default:
        raise ArtifactError(
            f"{path}: is a '{data['kind']}' artifact, expected '{expect.model_fields['kind'].default}'"
        )
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ArtifactError(f"{path}: invalid {data['kind']} artifact at '{where}': {first['msg']}") from None


@contextmanager
def recording(artifact: Artifact, path: str | os.PathLike[str] | None) -> Iterator[Artifact]:
    """Run a step; on an exception the artifact is written as failed with the reason, then re-raised."""
    try:
        yield artifact
    except BaseException as e:
        finish(artifact, "failed", f"{type(e).__name__}: {e}")
        if path is not None:
            write_artifact(path, artifact)
        raise
    else:
        finish(artifact)
        if path is not None:
            write_artifact(path, artifact)
