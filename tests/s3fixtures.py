"""pytest fixtures for S3 tests: a real SeaweedFS server and a fault-injecting proxy.

Registered for the whole test suite by `pytest_plugins` in tests/conftest.py. All fixtures are
synchronous (pytest-trio runs them fine for trio tests). The server starts lazily: only a
session that uses one of these fixtures pays its ~1 s startup.
"""

from __future__ import annotations

import contextlib
import re
import uuid
import zlib
from collections.abc import Iterator

import pytest

from tests.s3server import FaultProxy, SeaweedS3


@pytest.fixture(scope="session")
def seaweed() -> Iterator[SeaweedS3]:
    """One SeaweedFS S3 server for the session (data in a temporary directory, removed at the
    end). Tests may stop() or restart() it; `_seaweed_running` starts it again before the next
    test that asks for it, so one test's outage cannot leak into the next."""
    server = SeaweedS3()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()


@pytest.fixture(autouse=True)
def _seaweed_running(request: pytest.FixtureRequest) -> None:
    # Autouse so that tests requesting `seaweed` directly get the guarantee too; it looks at
    # the requested fixture names first so that tests not using S3 never start the server.
    if "seaweed" in request.fixturenames:
        server: SeaweedS3 = request.getfixturevalue("seaweed")
        server.start()  # no-op when it is running


@pytest.fixture
def s3(seaweed: SeaweedS3, request: pytest.FixtureRequest) -> SeaweedS3:
    """The session's SeaweedFS server, guaranteed to be running when the test starts. A test
    reaching it through getfixturevalue must carry the `s3` marker itself (tests/conftest.py
    adds it to the tests that request these fixtures)."""
    if request.node.get_closest_marker("s3") is None:
        pytest.fail(f"{request.node.nodeid} uses the S3 server but is not marked 's3'")
    seaweed.start()
    return seaweed


@pytest.fixture
def s3_bucket(s3: SeaweedS3, request: pytest.FixtureRequest) -> Iterator[str]:
    """A new, empty bucket for this test; its name carries the test name for easier debugging
    of the server's data directory. Deleted (with contents) afterwards if the server is up,
    which keeps disk use bounded in sessions with large-object tests."""
    slug = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"{slug or 'test'}-{uuid.uuid4().hex[:12]}"
    s3.make_bucket(name)
    yield name
    if s3.running:
        # SeaweedFS deletes non-empty buckets (weed mini runs with allowDeleteBucketNotEmpty).
        # Best effort: a test that broke the server must not fail in teardown for it.
        with contextlib.suppress(Exception):
            s3.client(retries={"total_max_attempts": 1}).delete_bucket(Bucket=name)


@pytest.fixture
def fault_proxy(s3: SeaweedS3, request: pytest.FixtureRequest) -> Iterator[FaultProxy]:
    """A FaultProxy in front of the server's S3 port, with no faults enabled yet. Its RNG is
    seeded from the test id, so each test sees a reproducible fault sequence run to run."""
    proxy = FaultProxy(("127.0.0.1", s3.port), seed=zlib.crc32(request.node.nodeid.encode()))
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def s3_vault_location(s3_bucket: str, seaweed: SeaweedS3, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://BUCKET/vault` in this test's bucket, with this process's environment set to reach
    the server (for tests that drive the vault API in-process rather than through `pqfs`)."""
    for k, val in seaweed.env().items():
        monkeypatch.setenv(k, val)
    return f"s3://{s3_bucket}/vault"
