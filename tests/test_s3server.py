"""Tests of the S3 test infrastructure itself (tests/s3server.py, tests/s3fixtures.py), through
boto3 only: if these fail, failures in the S3 backend tests say nothing about pqfs."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    IncompleteReadError,
    ResponseStreamingError,
)

from tests.s3server import (
    RESET_BEFORE_REQUEST,
    RESET_BEFORE_RESPONSE,
    RESET_MID_RESPONSE,
    FaultProxy,
    SeaweedS3,
)

pytestmark = pytest.mark.s3

# What a dropped connection looks like to a boto3 caller: a failed call, or (for a reset in the
# middle of a GetObject body) a failed read of the returned stream.
NETWORK_ERRORS = (
    ConnectionClosedError,
    EndpointConnectionError,
    ResponseStreamingError,
    IncompleteReadError,
)


def test_put_and_get(s3: SeaweedS3, s3_bucket: str) -> None:
    client = s3.client()
    data = os.urandom(100_000)
    client.put_object(Bucket=s3_bucket, Key="dir/obj", Body=data)
    assert client.get_object(Bucket=s3_bucket, Key="dir/obj")["Body"].read() == data
    ranged = client.get_object(Bucket=s3_bucket, Key="dir/obj", Range="bytes=10-19")
    assert ranged["ContentRange"] == "bytes 10-19/100000"
    assert ranged["Body"].read() == data[10:20]


def test_credentials_are_checked(s3: SeaweedS3, s3_bucket: str) -> None:
    # The server must not run open: backend tests of auth errors depend on it.
    client = boto3.client(
        "s3",
        endpoint_url=s3.endpoint,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key="not-the-secret",
        region_name="us-east-1",
        config=Config(proxies={}, retries={"total_max_attempts": 1}),
    )
    with pytest.raises(ClientError) as e:
        client.list_objects_v2(Bucket=s3_bucket)
    assert e.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_env_describes_the_server(s3: SeaweedS3) -> None:
    env = s3.env()
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint
    assert env["AWS_ACCESS_KEY_ID"] == s3.access_key
    assert env["AWS_SECRET_ACCESS_KEY"] == s3.secret_key
    assert env["AWS_EC2_METADATA_DISABLED"] == "true"
    assert s3.endpoint.startswith("http://127.0.0.1:")


def test_objects_survive_restart(s3: SeaweedS3, s3_bucket: str) -> None:
    data = os.urandom(50_000)
    s3.client().put_object(Bucket=s3_bucket, Key="kept", Body=data)
    port = s3.port
    s3.restart()
    assert s3.port == port
    assert s3.client().get_object(Bucket=s3_bucket, Key="kept")["Body"].read() == data


def test_a_test_may_leave_the_server_stopped(seaweed: SeaweedS3) -> None:
    seaweed.stop()
    assert not seaweed.running
    with pytest.raises(EndpointConnectionError):
        seaweed.client(connect_timeout=1, retries={"total_max_attempts": 1}).list_buckets()


def test_the_next_test_finds_it_running_again(seaweed: SeaweedS3) -> None:
    # Runs after the test above (file order): the autouse guard restarted the server.
    assert seaweed.running
    seaweed.client().list_buckets()


def test_proxy_without_faults_is_transparent(
    s3: SeaweedS3, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    client = s3.client(fault_proxy.endpoint, retries={"total_max_attempts": 1})
    big = os.urandom(1_000_000)
    client.put_object(Bucket=s3_bucket, Key="big", Body=big)
    for i in range(10):
        client.put_object(Bucket=s3_bucket, Key=f"k{i}", Body=b"x" * i)
        assert client.get_object(Bucket=s3_bucket, Key="big")["Body"].read() == big
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert len(keys) == 11
    assert fault_proxy.dropped == 0
    assert fault_proxy.exchanges >= 22
    # Keep-alive: the client reused its connection instead of opening one per request.
    assert fault_proxy.accepted < 5


def test_proxy_handles_concurrent_connections(
    s3: SeaweedS3, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    data = os.urandom(200_000)
    s3.client().put_object(Bucket=s3_bucket, Key="shared", Body=data)
    client = s3.client(fault_proxy.endpoint, max_pool_connections=32)  # boto3 is thread-safe

    def fetch(_: int) -> bytes:
        return client.get_object(Bucket=s3_bucket, Key="shared")["Body"].read()

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(fetch, range(128)))
    assert all(r == data for r in results)
    assert fault_proxy.exchanges == 128
    assert fault_proxy.accepted >= 8  # really concurrent, over several connections


@pytest.mark.parametrize(
    ("mode", "get_error", "put_executed"),
    [
        (RESET_BEFORE_REQUEST, ConnectionClosedError, False),
        (RESET_BEFORE_RESPONSE, ConnectionClosedError, True),
        # The cut point is uniform over the ~300 KB response, so the headers arrive, get_object
        # returns, and reading the body fails; a PUT's response has no body to cut into.
        (RESET_MID_RESPONSE, ResponseStreamingError, True),
    ],
)
def test_proxy_drop_modes(
    s3: SeaweedS3,
    s3_bucket: str,
    fault_proxy: FaultProxy,
    mode: str,
    get_error: type[Exception],
    put_executed: bool,
) -> None:
    direct = s3.client()
    direct.put_object(Bucket=s3_bucket, Key="big", Body=os.urandom(300_000))
    fault_proxy.drop_rate = 1.0
    fault_proxy.drop_modes = (mode,)
    client = s3.client(fault_proxy.endpoint, retries={"total_max_attempts": 1})
    with pytest.raises(ConnectionClosedError):
        client.put_object(Bucket=s3_bucket, Key="put-through-proxy", Body=b"payload")
    with pytest.raises(get_error):
        client.get_object(Bucket=s3_bucket, Key="big")["Body"].read()
    assert fault_proxy.dropped == 2
    listing = direct.list_objects_v2(Bucket=s3_bucket).get("Contents", [])
    assert ("put-through-proxy" in [o["Key"] for o in listing]) == put_executed


def test_proxy_partial_drops_are_survivable_with_retries(
    s3: SeaweedS3, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    fault_proxy.drop_rate = 0.3
    # botocore retries failed calls itself; a reset while reading a GetObject body surfaces
    # from read(), after the call returned, so the loop retries that part by hand.
    client = s3.client(fault_proxy.endpoint, retries={"mode": "standard", "total_max_attempts": 10})
    for i in range(20):
        data = os.urandom(20_000 + i)
        client.put_object(Bucket=s3_bucket, Key=f"obj{i}", Body=data)
        for _attempt in range(10):
            try:
                got = client.get_object(Bucket=s3_bucket, Key=f"obj{i}")["Body"].read()
                break
            except (ResponseStreamingError, IncompleteReadError):
                continue
        else:
            pytest.fail("GetObject body kept failing")
        assert got == data
    print(f"{fault_proxy.dropped} of {fault_proxy.exchanges} exchanges dropped")
    assert fault_proxy.dropped > 0


def test_proxy_latency_delays_each_response(
    s3: SeaweedS3, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    client = s3.client(fault_proxy.endpoint)
    client.head_bucket(Bucket=s3_bucket)  # connection set up outside the timing
    fault_proxy.latency = 0.2
    for _ in range(2):
        t0 = time.monotonic()
        client.head_bucket(Bucket=s3_bucket)
        assert time.monotonic() - t0 >= 0.2


def test_proxy_down_fails_fast_then_recovers(
    s3: SeaweedS3, s3_bucket: str, fault_proxy: FaultProxy
) -> None:
    client = s3.client(fault_proxy.endpoint, connect_timeout=2, retries={"total_max_attempts": 1})
    client.head_bucket(Bucket=s3_bucket)  # leaves an open keep-alive connection to be cut
    fault_proxy.down = True
    for _ in range(2):  # the cut pooled connection, then a refused new one
        t0 = time.monotonic()
        with pytest.raises(NETWORK_ERRORS):
            client.head_bucket(Bucket=s3_bucket)
        assert time.monotonic() - t0 < 1.0
    fault_proxy.down = False
    client.head_bucket(Bucket=s3_bucket)
