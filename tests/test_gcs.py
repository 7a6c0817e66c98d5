"""gs:// against a real GCS emulator (fake-gcs-server, tests/gcs_support.py), never a mock of the API. Label
stores on gs:// are the disk store byte for byte, and a lease's age and take-over go by the server's clock
and generation (test_bucket's store and lease tests run on both servers); here, WebDataset and parquet
sources read from gs:// are their local copies (index and a batch by range requests), a fleet claim is a
create conditional on generation 0 that the server refuses for an existing lease, and a bucket or endpoint
that is not there is one line."""

from __future__ import annotations

import pytest
from conftest import upload
from test_bucket import race_for_a_claim
from test_bucket_sources import columns
from test_storage_support import tiny_spec

from pipeline.sources import SampleReader, index_source
from pipeline.sources.bucket_files import BucketTars
from storage import create_store

pytestmark = pytest.mark.bucket


def test_a_gcs_tar_source_is_its_local_copy_by_range_requests(gcs_root, tmp_path):
    from conftest import write_wds

    local = write_wds(tmp_path / "wds", n=20, per_shard=8, size=(64, 64))
    url = upload(local, gcs_root / "wds")
    want = index_source(local, shards="as-is")
    for src in (url + "/shard-{000000..000002}.tar", url, url + "/*.tar"):
        got = index_source(src, shards="as-is")
        assert got.fingerprint == want.fingerprint and got.root == url, src
        assert columns(got) == columns(want), src  # offsets, sizes and crc32c too
    disk, bucket = SampleReader(want), SampleReader(index_source(url, shards="as-is"))
    assert isinstance(bucket.file_reader, BucketTars)
    batch = [(s, p) for s in (0, 1) for p in range(8)] + [(2, 1), (2, 0)]
    got = bucket.read_many(batch)
    assert got == disk.read_many(batch) and all(got.values())
    assert bucket.file_reader.requests == 3, bucket.file_reader.requests  # one range request per tar


def test_a_gcs_parquet_source_is_its_local_copy(gcs_root, tmp_path):
    from conftest import encode, make_image
    from test_parquet import write_parquet

    from pipeline.sources.hf_parquet import BucketParquet

    local = write_parquet(tmp_path / "pq", n=12, per_file=5, image_of=lambda i: encode(make_image(i % 3, i, (48, 48))))
    url = upload(local, gcs_root / "pq")
    want = index_source(local, shards="as-is")
    for src in (url, url + "/*.parquet", url + "/train-{00000..00002}.parquet"):
        got = index_source(src, shards="as-is")
        assert (got.kind, got.root, got.shards) == ("parquet", url, want.shards), src
        assert got.fingerprint == want.fingerprint and columns(got) == columns(want), src
    disk, bucket = SampleReader(want), SampleReader(index_source(url, shards="as-is"))
    assert isinstance(bucket.file_reader, BucketParquet)
    batch = [(0, 4), (1, 0), (1, 3), (2, 1), (0, 0)]
    got = bucket.read_many(batch)
    assert got == disk.read_many(batch) and all(got.values())


def test_a_claim_is_a_create_on_generation_0_that_the_server_refuses_for_an_existing_lease(gcs_root, gcs_server):
    unit = (2, 1)
    books, winners = race_for_a_claim(gcs_root / "s", unit, 4)
    assert len(winners) == 1 and books[0].read(unit).worker == winners[0]
    lease = gcs_root / "s" / "leases" / "000002_0001.json"
    before = lease.read()
    puts = gcs_server.front.puts
    assert not lease.create(b"{}")  # the server refused it (412): one PUT, the lease unchanged
    assert gcs_server.front.puts == puts + 1 and lease.read() == before


def test_a_missing_gcs_bucket_is_one_line(gcs_root, tmp_path, tiny_teacher):
    from test_faults import invoke, one_line_error, pconfig, pflags

    # (--out only: a source on a missing bucket is listed first, which the emulator answers with a 500 where
    # GCS says NoSuchBucket, so only tests/test_bucket_sources.py's S3 server can show that one)
    code, lines, crashed, _ = invoke("precompute", *pflags(pconfig(tmp_path / "nothing", "gs://no-such-gcs-bucket/s",
                                                                   tiny_teacher)))
    one_line_error(code, lines, crashed, 2, "gs://no-such-gcs-bucket: no such bucket")


def test_a_delete_of_nothing_is_refused_unless_missing_ok(gcs_root):
    """GCS answers a DELETE of a missing object with 404 (S3 with success): missing_ok must still hold."""
    gone = gcs_root / "never-written"
    gone.unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError):
        gone.unlink()


def test_an_unreachable_gcs_endpoint_is_one_line_naming_it(gcs_root, tmp_path, monkeypatch):
    import json
    import socket

    from storage import bucket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    account = tmp_path / "dead.json"
    account.write_text(json.dumps({"gcs_base_url": f"http://127.0.0.1:{port}", "disable_oauth": True,
                                   "client_email": "", "private_key": "", "private_key_id": ""}))
    monkeypatch.setenv("GOOGLE_SERVICE_ACCOUNT", str(account))  # (a new client: the environment is its key)
    monkeypatch.setattr(bucket, "RETRY_SECONDS", 0.5)
    monkeypatch.setattr(bucket, "RETRIES", 1)
    with pytest.raises(bucket.BucketError) as e:
        create_store(gcs_root / "s", tiny_spec())
    line = str(e.value)
    assert str(gcs_root / "s") in line and f"the endpoint http://127.0.0.1:{port} does not answer" in line, line
    assert "gcs_base_url" in line and "\n" not in line
