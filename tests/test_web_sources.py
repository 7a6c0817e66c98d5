"""Sources on a web server (``--data http(s)://host/path/shard-{..}.tar``), beyond what test_bucket_sources shows:
their stamps (the HEAD that names each file is its stamp: an unchanged source costs those HEADs and no byte,
a changed file is re-indexed alone) and real TLS (SeaweedFS's gateway over https with a certificate from a
CA made for the session, trusted through SSL_CERT_FILE; untrusted, one line naming the URL and the fix).
All against the real server of tests/s3_support.py; requests and bytes are counted, never timed."""

from __future__ import annotations

import dataclasses
import os
import uuid

import pytest

from pipeline.sources import SampleReader, SourceChanged, SourceError, index_source, stored_manifest, unchanged_source
from pipeline.sources.bucket_files import COUNTS
from storage import open_store
from storage.bucket import as_path

pytestmark = pytest.mark.bucket
SHARDS = "/shard-{000000..000002}.tar"  # write_wds(n=20, per_shard=8): 3 tars
LATER_NS = 60 * 10**9  # a store stamped this long after its source was written: no Last-Modified is racy


def upload(local: str, prefix) -> None:
    for name in sorted(os.listdir(local)):
        with open(os.path.join(local, name), "rb") as f:
            (prefix / name).put(f.read())


def columns(m) -> dict:
    return {c: m.samples.column(c).to_pylist() for c in m.samples.column_names}


@pytest.fixture
def web_copy(tmp_path, s3_env):
    """(local folder, the key prefix of its copy in the public-read bucket): any web server's files to
    plain unsigned GETs with Range, over http at s3_env.endpoint and https at s3_env.https_endpoint."""
    from conftest import write_wds
    from s3_support import OPEN_BUCKET

    local = write_wds(tmp_path / "wds", n=20, per_shard=8, size=(128, 128))
    key = f"{OPEN_BUCKET}/{uuid.uuid4().hex[:12]}"
    upload(local, as_path(f"s3://{key}"))
    return local, key


def counted(fn):
    before = (COUNTS.requests, COUNTS.bytes_read)
    out = fn()
    return out, COUNTS.requests - before[0], COUNTS.bytes_read - before[1]


def make_web_store(url: str, tmp_path) -> str:
    from test_loader import make_store, make_teacher_weights

    return make_store(url + SHARDS, tmp_path / "store", make_teacher_weights(tmp_path / "teacher.pth"))


# ---- stamps ----------------------------------------------------------------------------------------------------
def test_a_store_from_a_web_source_is_stamped_by_its_heads_and_an_unchanged_one_costs_a_head_per_file(
        web_copy, s3_env, tmp_path):
    from student.data import open_train_data

    _, key = web_copy
    url = f"{s3_env.endpoint}/{key}"
    store = make_web_store(url, tmp_path)
    stored = stored_manifest(open_store(store))
    assert [s[0] for s in stored.stamps["files"]] == stored.shards == [f"shard-00000{i}.tar" for i in range(3)]
    heads = [as_path(f"s3://{key}/{name}").head() for name in stored.shards]
    assert [s[1:] for s in stored.stamps["files"]] == [[h["size"], h["e_tag"]] for h in heads]  # the server's ETags
    assert stored.stamps["classes"] == [as_path(f"s3://{key}/classes.txt").head()["size"],
                                        as_path(f"s3://{key}/classes.txt").head()["e_tag"]]
    m, requests, nbytes = counted(lambda: unchanged_source(stored, url + SHARDS))
    assert m is not None and m.root == url
    assert (requests, nbytes) == (3 + 1, 0)  # a HEAD per tar (naming it) and one of classes.txt; no byte read
    assert open_train_data(url + SHARDS, labels=store).manifest.fingerprint == stored.fingerprint


def test_a_changed_web_object_is_reindexed_alone_and_other_labels_are_refused(web_copy, s3_env, tmp_path):
    """The same members with one image byte changed: its ETag differs, that tar alone is re-indexed (its
    headers), the start goes on and its first read is "changed". Other labels under a tar's name: refused."""
    import pyarrow.compute as pc
    from conftest import relabelled_shard

    from student.data import open_train_data
    from student.errors import TrainError

    _, key = web_copy
    url = f"{s3_env.endpoint}/{key}"
    store = make_web_store(url, tmp_path)
    stored = stored_manifest(open_store(store))
    obj = as_path(f"s3://{key}/shard-000001.tar")
    blob = bytearray(obj.read())
    first = stored.samples.filter(pc.equal(stored.samples.column("shard"), 1)).slice(0, 1).to_pylist()[0]
    blob[first["offset"] + first["size"] // 2] ^= 0xFF
    obj.put(bytes(blob))
    m, requests, nbytes = counted(lambda: unchanged_source(stored, url + SHARDS))
    assert m is not None  # names and labels as stored: the start goes on ...
    # ... after the 4 HEADs, that one tar's headers: its HEAD and range reads, at most that tar's bytes
    assert 3 + 1 + 2 <= requests <= 3 + 1 + 1 + 2 * 8 and 0 < nbytes <= len(blob)
    with pytest.raises(SourceChanged, match=r"shard-000001\.tar changed since it was indexed"):
        SampleReader(m).read(1, 0)
    as_path(f"s3://{key}/shard-000002.tar").put(relabelled_shard(tmp_path))
    assert unchanged_source(stored, url + SHARDS) is None
    with pytest.raises(TrainError, match="is not the source the store"):
        open_train_data(url + SHARDS, labels=store)


def test_without_etags_last_modified_stamps_and_a_just_written_file_is_reindexed(web_copy, s3_env, tmp_path):
    """A server that sends no ETag: each file is stamped by its Last-Modified. Whole seconds, so a file
    written within RACY_NS of the stamping proves nothing (re-indexed, as a racy mtime on disk); a store
    stamped later costs the HEADs only, and a file of another size is re-indexed."""
    from s3_support import HeaderStrippingProxy

    from pipeline.sources.bucket_files import LAST_MODIFIED

    _, key = web_copy
    as_path(f"s3://{key}/classes.txt").unlink()  # (names "0".."2": only the tars' stamps are at stake)
    proxy = HeaderStrippingProxy(s3_env.endpoint, drop_response=frozenset({"etag"}))
    try:
        url = f"{proxy.endpoint}/{key}"
        stored = stored_manifest(open_store(make_web_store(url, tmp_path)))
        assert all(s[2].startswith(LAST_MODIFIED) for s in stored.stamps["files"])
        assert stored.stamps["classes"] is None
        # just written: each Last-Modified lies within RACY_NS of the stamping, so each tar is re-indexed
        m, requests, nbytes = counted(lambda: unchanged_source(stored, url + SHARDS))
        assert m is not None and requests >= 3 + 1 + 3 * 2 and nbytes > 0
        later = dataclasses.replace(stored, stamps={**stored.stamps, "at": stored.stamps["at"] + LATER_NS})
        m, requests, nbytes = counted(lambda: unchanged_source(later, url + SHARDS))
        assert m is not None and (requests, nbytes) == (3 + 1, 0)
        obj = as_path(f"s3://{key}/shard-000001.tar")
        obj.put(obj.read() + bytes(1024))  # another size (two zero blocks more: the same members)
        m, requests, nbytes = counted(lambda: unchanged_source(later, url + SHARDS))
        assert m is not None and 3 + 1 + 2 <= requests <= 3 + 1 + 1 + 2 * 8 and nbytes > 0  # that tar alone
    finally:
        proxy.close()


def test_a_server_without_etag_or_last_modified_gives_no_stamps(web_copy, s3_env):
    from s3_support import HeaderStrippingProxy

    _, key = web_copy
    proxy = HeaderStrippingProxy(s3_env.endpoint, drop_response=frozenset({"etag", "last-modified"}))
    try:
        got = index_source(f"{proxy.endpoint}/{key}" + SHARDS, shards="as-is")
        assert got.stamps is None and got.num_samples == 20  # nothing proves it unchanged: re-indexed at each start
    finally:
        proxy.close()


# ---- real TLS --------------------------------------------------------------------------------------------------
@pytest.fixture
def tls(s3_env):
    # (no openssl CLI, no certificate for the test server: a failure that says so, not a skip that checks nothing)
    assert s3_env.tls is not None, "the https tests need the openssl CLI (apt-get install openssl)"
    return s3_env


def test_an_https_source_over_real_tls_is_its_local_copy(web_copy, tls, monkeypatch):
    local, key = web_copy
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.tls["ca"]))
    url = f"{tls.https_endpoint}/{key}"
    want = index_source(local, shards="as-is")
    got = index_source(url + SHARDS, shards="as-is")
    assert got.root == url and got.fingerprint == want.fingerprint and columns(got) == columns(want)
    assert got.stamps is not None
    batch = [(0, 1), (0, 2), (1, 0), (2, 3)]
    assert SampleReader(got).read_many(batch) == SampleReader(want).read_many(batch)


@pytest.mark.parametrize("trust", ["none", "another CA"])
def test_an_untrusted_certificate_is_one_line_naming_the_url_and_ssl_cert_file(web_copy, tls, tmp_path,
                                                                                tiny_teacher, monkeypatch, trust):
    from test_faults import invoke, one_line_error, pconfig, pflags

    _, key = web_copy
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    if trust == "none":
        monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    else:
        monkeypatch.setenv("SSL_CERT_FILE", str(tls.tls["other_ca"]))
    url = f"{tls.https_endpoint}/{key}"
    code, lines, crashed, _ = invoke("precompute", *pflags(pconfig(url + SHARDS, tmp_path / "s", tiny_teacher)))
    one_line_error(code, lines, crashed, 2, f"{url}/shard-00000", "TLS certificate is not trusted (UnknownIssuer",
                   "SSL_CERT_FILE")
    if trust != "none":
        assert f"(UnknownIssuer by SSL_CERT_FILE={tls.tls['other_ca']})" in lines[-1]


def test_an_s3_store_and_source_over_tls(tls, tmp_path, monkeypatch):
    """AWS_ENDPOINT_URL=https://...: a bucket source indexes to its local copy's manifest and precompute
    writes a label store there, all over TLS (the CA trusted through SSL_CERT_FILE)."""
    from conftest import write_wds
    from s3_support import BUCKET

    monkeypatch.setenv("AWS_ENDPOINT_URL", tls.https_endpoint)
    monkeypatch.delenv("AWS_ALLOW_HTTP", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.tls["ca"]))
    local = write_wds(tmp_path / "wds", n=12, per_shard=6)
    prefix = as_path(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}")
    upload(local, prefix / "wds")
    got = index_source(str(prefix / "wds"), shards="as-is")
    assert got.fingerprint == index_source(local, shards="as-is").fingerprint and got.stamps is not None
    from test_loader import make_store, make_teacher_weights

    store = make_store(str(prefix / "wds"), str(prefix / "store"), make_teacher_weights(tmp_path / "t.pth"))
    assert open_store(store).check() == []
    assert unchanged_source(stored_manifest(open_store(store)), str(prefix / "wds")) is not None
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.tls["other_ca"]))  # (a new client: its trust is in the cache key)
    with pytest.raises(SourceError, match=rf"s3://{BUCKET}/\S+: the TLS certificate of {tls.https_endpoint} is not "
                                          r"trusted \(UnknownIssuer by SSL_CERT_FILE="):
        index_source(str(prefix / "wds"))
