"""Checkpoint files: only files the service wrote are served or resumed from, only after their
sha256 matches, and every `torch.load` in the code base passes `weights_only=True`.

test_artifacts.py covers a replaced file (409) and a missing one (410); here: a single flipped
byte, records whose path escapes `settings.artifact_dir` (written straight into the database, as
an attacker with database access or a bug would), and the resume path of the worker.
"""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
from sqlalchemy import insert

from jobstore import jobs
from jobstore.tables import Checkpoint, utcnow

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("jumpout", "api", "worker", "tests", "benchmarks", "scripts", "migrations")


def insert_checkpoint(session, job_id: str, path: Path, epoch: int = 1) -> int:
    """A checkpoint row written directly, bypassing the service, with the file's true sha256."""
    content = path.read_bytes() if path.is_file() else b""
    row_id = session.execute(
        insert(Checkpoint)
        .values(
            job_id=job_id,
            path=str(path),
            epoch=epoch,
            size_bytes=len(content),
            sha256=hashlib.sha256(content).hexdigest(),
            is_best=False,
            created_at=utcnow(),
        )  # fmt: skip
        .returning(Checkpoint.id)
    ).scalar_one()
    session.commit()
    return row_id


@pytest.fixture
def job_dir(settings, make_job) -> tuple[str, Path]:
    job_id = make_job()
    directory = settings.artifact_dir / "jobs" / job_id
    directory.mkdir(parents=True)
    return job_id, directory


def test_a_single_flipped_byte_is_refused(client, session, job_dir):
    job_id, directory = job_dir
    path = directory / "checkpoint-epoch0001.pt"
    content = bytes(range(256)) * 64
    path.write_bytes(content)
    checkpoint_id = insert_checkpoint(session, job_id, path)
    url = f"/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/file"
    assert client.get(url).status_code == 200

    corrupted = bytearray(content)
    corrupted[len(corrupted) // 2] ^= 0x01
    path.write_bytes(bytes(corrupted))
    response = client.get(url)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "checksum_mismatch"
    assert jobs.newest_valid_checkpoint(session, job_id) is None


def _escapes(settings, tmp_path) -> dict[str, Path]:
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.pt"
    secret.write_bytes(b"not the service's file")
    root = settings.artifact_dir
    sibling = Path(str(root) + "-evil")  # shares the artifact dir's name as a string prefix
    sibling.mkdir()
    (sibling / "x.pt").write_bytes(b"prefix trick")
    link_dir = root / "jobs" / "links"
    link_dir.mkdir(parents=True)
    (link_dir / "checkpoint-epoch0001.pt").symlink_to(secret)
    passwd = Path("/etc/passwd")
    return {
        "absolute outside": secret,
        "system file": passwd,
        "dot-dot": root / "jobs" / ".." / ".." / "outside" / "secret.pt",
        "string prefix": sibling / "x.pt",
        "symlink out": link_dir / "checkpoint-epoch0001.pt",
    }


@pytest.mark.parametrize(
    "case", ["absolute outside", "system file", "dot-dot", "string prefix", "symlink out"]
)
def test_a_record_pointing_outside_the_artifact_dir_is_never_served(
    client, session, settings, job_dir, tmp_path, caplog, case
):
    job_id, _ = job_dir
    path = _escapes(settings, tmp_path)[case]
    assert path.is_file()
    checkpoint_id = insert_checkpoint(session, job_id, path)  # its sha256 matches the file

    response = client.get(f"/v1/jobs/{job_id}/checkpoints/{checkpoint_id}/file")
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["code"] == "checkpoint_refused"
    assert "artifact directory" in error["message"]
    assert str(path) not in response.text and str(tmp_path) not in response.text
    assert path.read_bytes()[:8] not in response.content
    # The operator is told which record and which path, in the log.
    assert any(str(path) in record.getMessage() for record in caplog.records)
    # Nor does the worker resume from it (it would torch.load the file).
    assert jobs.newest_valid_checkpoint(session, job_id) is None


def test_the_worker_resumes_from_the_newest_file_inside_the_artifact_dir(
    session, settings, job_dir, tmp_path
):
    job_id, directory = job_dir
    inside = directory / "checkpoint-epoch0001.pt"
    inside.write_bytes(b"epoch 1")
    good = insert_checkpoint(session, job_id, inside, epoch=1)
    insert_checkpoint(session, job_id, _escapes(settings, tmp_path)["absolute outside"], epoch=2)
    assert jobs.newest_valid_checkpoint(session, job_id).id == good


def _torch_load_calls(tree: ast.AST):
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        if name in ("torch.load", "load", "torch.serialization.load") or name.endswith(
            ".torch.load"
        ):
            yield name, node


def test_every_torch_load_passes_weights_only_true():
    found = []
    for directory in SOURCE_DIRS:
        for path in sorted((REPO / directory).rglob("*.py")):
            source = path.read_text(encoding="utf-8")
            tree = ast.parse(source, filename=str(path))
            # A bare `load(...)` only counts where torch's load was imported under that name.
            imports_torch_load = any(
                isinstance(node, ast.ImportFrom)
                and node.module in ("torch", "torch.serialization")
                and any(alias.name == "load" for alias in node.names)
                for node in ast.walk(tree)
            )
            for name, call in _torch_load_calls(tree):
                if name == "load" and not imports_torch_load:
                    continue
                weights_only = [kw for kw in call.keywords if kw.arg == "weights_only"]
                where = f"{path.relative_to(REPO)}:{call.lineno}"
                found.append(where)
                assert weights_only, f"{where}: torch.load without weights_only=True"
                value = weights_only[0].value
                assert isinstance(value, ast.Constant) and value.value is True, (
                    f"{where}: weights_only must be the literal True"
                )
            # No plain unpickling anywhere either.
            unpickles = [
                node.lineno
                for node in ast.walk(tree)
                if isinstance(node, ast.Call)
                and ast.unparse(node.func) in ("pickle.load", "pickle.loads", "pickle.Unpickler")
            ]
            assert not unpickles, f"{path.relative_to(REPO)}:{unpickles} unpickles"
    # The scan sees the known call sites (the engine's load_checkpoint at least).
    assert any(where.startswith("jumpout/engine.py") for where in found), found
