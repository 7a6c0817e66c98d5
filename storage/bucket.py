"""Label stores on buckets (s3://, gs://): the one seam between the store code and an object store.

``as_path(p)`` gives a ``pathlib.Path`` for a local path and an ``ObjPath`` for a URL. ObjPath has the
part of Path's interface the store code uses (``/``, name, parent, exists, is_dir, unlink, glob, mkdir)
plus what only an object store can do in one request: ``read`` (one GET, refused past a size limit
before a byte of the body is read), ``put`` (one PUT: an object appears whole or not at all, which is
what a temporary and a rename give on a disk) and ``create`` (a conditional PUT that fails when the
object exists: ``If-None-Match: *`` on S3, ``ifGenerationMatch=0`` on GCS). fsutil routes its reads and
writes here for an ObjPath, so the backends, the leases and the API keep one code path.

The client is obstore (Rust's object_store): it signs, retries with backoff and speaks both S3 and GCS.
Where the S3 endpoint is comes the standard way: ``AWS_ENDPOINT_URL``, else the ``endpoint_url`` of the
profile (``AWS_PROFILE``, default ``default``) in ``~/.aws/config``; the keys from ``AWS_ACCESS_KEY_ID``
/ ``AWS_SECRET_ACCESS_KEY`` (/ ``AWS_SESSION_TOKEN``), else the profile's in ``~/.aws/credentials``. So the
same code works with AWS, MinIO, R2 and SeaweedFS (the tests). Over https (an ``https://`` endpoint, a web
source) the server's certificate is checked against the system's roots or, where ``SSL_CERT_FILE`` (or
``SSL_CERT_DIR``) is set, against the CAs it names instead: the variable OpenSSL and curl read, which
obstore's client (rustls with the platform's roots) reads too. That is how a private CA is trusted (the
tests: SeaweedFS over TLS with a CA made for the session). GCS is configured by obstore from its
environment (``GOOGLE_SERVICE_ACCOUNT``, application default credentials); another endpoint is the
``gcs_base_url`` of the service-account file (tests/gcs_support.py points it at fake-gcs-server that way).

Every failure a user can fix is one line naming the URL (BucketError, exit 2): no such bucket, no
credentials, access denied, an endpoint that does not answer (after a bounded retry with backoff), a
certificate that is not trusted.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime
import errno
import fnmatch
import functools
import os
import posixpath
import re
import time
import uuid

from .errors import UserError

SCHEMES = ("s3", "gs")
# A source (--data) may also be files on a web server: read-only, by range requests, never listed (HTTP
# has no listing), so named by a brace pattern. Never a store: ``is_url`` (stores) leaves them out.
WEB_SCHEMES = ("http", "https")
# Transient errors (a dropped connection, a 5xx, a throttle) are retried with exponential backoff
# for at most this long, then reported: a fleet member must not hang on a dead endpoint.
RETRY_SECONDS = 15.0
RETRIES = 8
TRUST_VARS = ("SSL_CERT_FILE", "SSL_CERT_DIR")  # the CAs a client trusts over https (module doc)


class BucketError(UserError, OSError):
    """A bucket that cannot be used as given: one line naming the URL, the cause and the fix."""


def is_url(path) -> bool:
    return isinstance(path, ObjPath) or (isinstance(path, str) and path.split("://", 1)[0] in SCHEMES
                                         and "://" in path)


def is_source_url(path) -> bool:
    """A source URL: a bucket's (``is_url``) or a web server's (http://, https://: read-only, by range)."""
    return is_url(path) or is_web_url(path)


def is_web_url(path) -> bool:
    return (isinstance(path, ObjPath) and path.scheme in WEB_SCHEMES) or (
        isinstance(path, str) and "://" in path and path.split("://", 1)[0] in WEB_SCHEMES)


def source_path(url: str) -> ObjPath:
    """An ObjPath for a source URL: a bucket's as ``as_path``, a web server's with its host (and port) for a
    bucket: the client is then obstore's HTTPStore, which reads (GET with Range, HEAD) and never lists."""
    if isinstance(url, ObjPath) or not is_web_url(url):
        return as_path(url)
    scheme, rest = url.split("://", 1)
    host, _, key = rest.partition("/")
    if not host:
        raise BucketError(f"{url}: no host name; write {scheme}://HOST/PATH")
    return ObjPath(scheme, host, key.strip("/"))


def as_path(path):
    """An ObjPath for an s3:// or gs:// URL (or an ObjPath), else a pathlib.Path."""
    from pathlib import Path

    if isinstance(path, ObjPath):
        return path
    text = os.fspath(path) if not isinstance(path, str) else path
    if is_url(text):
        scheme, rest = text.split("://", 1)
        bucket, _, key = rest.partition("/")
        if not bucket:
            raise BucketError(f"{text}: no bucket name; write {scheme}://BUCKET/PATH")
        return ObjPath(scheme, bucket, key.strip("/"))
    return Path(path)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _profile() -> tuple[dict, dict]:
    """(config, credentials) of the AWS profile in use, each {} when absent."""
    name = os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE") or "default"
    out = []
    config_section = name if name == "default" else f"profile {name}"
    for var, default, section in (("AWS_CONFIG_FILE", "~/.aws/config", config_section),
                                  ("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials", name)):
        parser = configparser.ConfigParser()
        try:
            parser.read(os.path.expanduser(os.environ.get(var, default)))
        except configparser.Error:
            out.append({})
            continue
        out.append(dict(parser[section]) if parser.has_section(section) else {})
    return out[0], out[1]


def s3_settings() -> dict:
    """endpoint, region and keys for S3 from the environment, else the profile (module doc)."""
    config, creds = _profile()
    env = os.environ.get
    out = {"endpoint": env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL") or config.get("endpoint_url"),
           "region": env("AWS_REGION") or env("AWS_DEFAULT_REGION") or config.get("region") or "us-east-1"}
    if _truthy("AWS_SKIP_SIGNATURE"):  # a public bucket: unsigned requests (object_store's own setting)
        out["skip_signature"] = True
    elif env("AWS_ACCESS_KEY_ID") and env("AWS_SECRET_ACCESS_KEY"):
        out["access_key_id"], out["secret_access_key"] = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
        if env("AWS_SESSION_TOKEN"):
            out["session_token"] = env("AWS_SESSION_TOKEN")
    elif creds.get("aws_access_key_id") and creds.get("aws_secret_access_key"):
        out["access_key_id"], out["secret_access_key"] = creds["aws_access_key_id"], creds["aws_secret_access_key"]
        if creds.get("aws_session_token"):
            out["session_token"] = creds["aws_session_token"]
    return {k: v for k, v in out.items() if v}


def gcs_settings() -> tuple:
    """The GOOGLE_* variables obstore reads for GCS (the service-account file, whose ``gcs_base_url`` may name
    another endpoint, ADC, allow_http), as a client's cache key: a changed environment gets a new client."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("GOOGLE_")))


def gcs_endpoint() -> str:
    """Where GCS requests go: the ``gcs_base_url`` of the service-account file (object_store's way to name
    another endpoint: an emulator), else Google's."""
    import json
    from pathlib import Path

    env = os.environ.get
    try:
        if env("GOOGLE_SERVICE_ACCOUNT_KEY"):
            account = json.loads(env("GOOGLE_SERVICE_ACCOUNT_KEY"))
        else:
            path = env("GOOGLE_SERVICE_ACCOUNT") or env("GOOGLE_SERVICE_ACCOUNT_PATH")
            account = json.loads(Path(path).read_bytes()) if path else {}
    except (OSError, ValueError):
        account = {}
    return (account.get("gcs_base_url") if isinstance(account, dict) else None) or "https://storage.googleapis.com"


def _retry():
    return {"max_retries": RETRIES, "retry_timeout": datetime.timedelta(seconds=RETRY_SECONDS),
            "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                        "max_backoff": datetime.timedelta(seconds=4), "base": 2}}


def client(scheme: str, bucket: str, prefix: str | None = None):
    """An obstore store for the bucket (and key prefix), configured from the environment as it is now."""
    settings = tuple(sorted(s3_settings().items())) if scheme == "s3" else gcs_settings() if scheme == "gs" else ()
    # a client reads its roots when it is made: one made before SSL_CERT_FILE changed trusts the old ones
    settings += tuple((v, os.environ[v]) for v in TRUST_VARS if os.environ.get(v))
    # per process: a DataLoader worker forked from a process that used a client makes its own (the
    # parent's connection pool is no one's to share)
    return _client(scheme, bucket, prefix or None, settings, os.getpid())


def used_in_this_process() -> bool:
    """Whether this process has made an object-store client: its runtime's threads (and the locks they may
    hold) do not survive a fork, so a process that used one must start workers by forkserver or spawn."""
    return any(key[-1] == os.getpid() for key in _made)


def worker_start(workers: int) -> str | None:
    """The DataLoader ``multiprocessing_context`` for ``workers`` workers: "forkserver" once this process used
    a bucket (a worker forked then could wait forever on a lock of the client's runtime; forkserver workers
    start clean and, persistent, start once), else the platform's default (fork on Linux)."""
    return "forkserver" if workers and used_in_this_process() else None


_made: list[tuple] = []  # the keys of the clients made (with the pid that made them)


@functools.lru_cache(maxsize=64)
def _client(scheme: str, bucket: str, prefix: str | None, settings: tuple, pid: int):
    from obstore.store import GCSStore, HTTPStore, S3Store

    _made.append((scheme, bucket, pid))
    url = f"{scheme}://{bucket}"
    if scheme in WEB_SCHEMES:  # (bucket: the host and port) a read-only source on a web server
        return HTTPStore.from_url(url, retry_config=_retry(), client_options={
            "timeout": datetime.timedelta(seconds=60), "connect_timeout": datetime.timedelta(seconds=5),
            "allow_http": scheme == "http"})
    if scheme == "gs":
        return GCSStore(bucket, prefix=prefix, retry_config=_retry())
    s = {k: v for k, v in settings if k not in TRUST_VARS}
    if "access_key_id" not in s and "skip_signature" not in s and _truthy("AWS_EC2_METADATA_DISABLED") and not (
            os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE") or os.environ.get("AWS_CONTAINER_CREDENTIALS_FULL_URI")
            or os.environ.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI")):
        raise BucketError(f"{url}: no credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY are not set and "
                          "no profile in ~/.aws/credentials has keys); set them, or AWS_PROFILE")
    options = {"timeout": datetime.timedelta(seconds=60), "connect_timeout": datetime.timedelta(seconds=5)}
    if str(s.get("endpoint", "")).startswith("http://"):
        options["allow_http"] = True
    return S3Store(bucket, prefix=prefix, client_options=options, retry_config=_retry(), **s)


def _explain(url: str, e: Exception) -> Exception:
    """obstore's error for an operation on url as what the store code expects: FileNotFoundError for a
    missing key (the store code asks for keys that may not be there), a BucketError line for anything a
    user must fix, the error itself otherwise."""
    from obstore import exceptions as ox

    text = str(e)
    if "NoSuchBucket" in text:
        return _no_bucket(url)
    if isinstance(e, FileNotFoundError):
        return FileNotFoundError(errno.ENOENT, "no such object", url)
    if isinstance(e, ox.PermissionDeniedError | ox.UnauthenticatedError) or "InvalidAccessKeyId" in text \
            or "SignatureDoesNotMatch" in text:
        where = "GOOGLE_SERVICE_ACCOUNT / GOOGLE_APPLICATION_CREDENTIALS" if url.startswith("gs:") else \
            "AWS_ACCESS_KEY_ID / AWS_PROFILE"
        return BucketError(f"{url}: access denied ({_code(text)}); check the credentials ({where}) and the "
                           "bucket's permissions")
    untrusted = re.search(r"InvalidCertificate\(\s*(\w+)", text)
    if untrusted or "invalid peer certificate" in text:
        server = f"the TLS certificate of {s3_settings().get('endpoint')}" if url.startswith("s3:") else \
            "the server's TLS certificate"
        trusting = " and ".join(f"{v}={os.environ[v]}" for v in TRUST_VARS if os.environ.get(v))
        return BucketError(f"{url}: {server} is not trusted ({untrusted.group(1) if untrusted else 'invalid'}"
                           f"{' by ' + trusting if trusting else ''}); if your own CA signed it, set SSL_CERT_FILE "
                           "to a PEM file holding that CA, and check that the URL's host is the one it names")
    if isinstance(e, ox.GenericError) and any(w in text for w in ("error sending request", "connect", "timed out",
                                                                   "dns", "Connection refused")):
        cause = " ".join(text.split())[-100:]
        if url.split("://", 1)[0] in WEB_SCHEMES:
            return BucketError(f"{url}: the server does not answer (retried for up to {RETRY_SECONDS:.0f}s; "
                               f"...{cause}); check the URL and the network")
        if url.startswith("s3:"):
            endpoint, setting = s3_settings().get("endpoint", "the default endpoint"), "AWS_ENDPOINT_URL"
        else:
            endpoint, setting = gcs_endpoint(), "the gcs_base_url of GOOGLE_SERVICE_ACCOUNT's file"
        if re.search(r"\bretries: 0\b", text) and any(w in text for w in _DROPPED):
            # A connection dropped before the answer to a conditional write (store.json, a lease: If-None-Match
            # / If-Match) came, its body half sent or whole. obstore sends such a request once only, since the
            # first may have landed and a second would then be refused as if another writer held the key
            # (tests/test_bucket_torn.py); ObjPath.create retries creates itself and says how often. The endpoint
            # was there, so "does not answer; check AWS_ENDPOINT_URL" would name the wrong cause and fix. (A plain
            # PUT gets here too if its first try alone outlasted RETRY_SECONDS: the line does not say which.)
            return BucketError(f"{url}: the connection to {endpoint} was dropped before it answered (a "
                               "conditional write: it may or may not have landed); run the command again: it "
                               "resumes")
        return BucketError(f"{url}: the endpoint {endpoint} does not answer (retried for up to "
                           f"{RETRY_SECONDS:.0f}s; ...{cause}); check {setting} and the network")
    failed = re.search(r"status code: (5\d\d[^:<]*)", text)
    if isinstance(e, ox.GenericError) and (failed or "SlowDown" in text):
        # a server error or throttling that outlasted the retries: the service's trouble, not the user's input
        status = failed.group(1).strip() if failed else "SlowDown"
        return BucketError(f"{url}: the server kept failing ({status}) after retries for up to "
                           f"{RETRY_SECONDS:.0f}s; try again later, or check the service's status")
    return e


def _transport_error(e: Exception) -> bool:
    """No answer came: the connection was refused, timed out or dropped (not an answer the server gave)."""
    from obstore import exceptions as ox

    text = str(e)
    return isinstance(e, ox.GenericError) and any(w in text for w in ("error sending request", "connect", "timed out",
                                                                      "Connection refused", *_DROPPED))


# obstore's texts for a connection that went away mid-request (the endpoint answered, then dropped it)
_DROPPED = ("ConnectionReset", "ConnectionAborted", "BrokenPipe", "connection closed before message completed",
            "IncompleteMessage")


def _no_bucket(url: str) -> BucketError:
    """A PUT answered 404: no key is ever missing for a write, so the bucket is (GCS and some S3 servers say
    only "Not Found" where AWS says NoSuchBucket)."""
    bucket_url = "/".join(url.split("/")[:3])
    return BucketError(f"{bucket_url}: no such bucket; create it, or check the name in {url}")


def _code(text: str) -> str:
    """The S3 error code in an error's text (<Code>AccessDenied</Code>), else the HTTP status line."""
    if "<Code>" in text:
        return text.split("<Code>", 1)[1].split("</Code>", 1)[0]
    for status in ("403 Forbidden", "401 Unauthorized"):
        if status in text:
            return status
    return "refused"


class ObjPath:
    """A key in a bucket with the pathlib-like interface the store code uses (module doc)."""

    def __init__(self, scheme: str, bucket: str, key: str):
        self.scheme, self.bucket, self.key = scheme, bucket, key.strip("/")

    # -- naming, as pathlib does it
    def __truediv__(self, other) -> ObjPath:
        return ObjPath(self.scheme, self.bucket, posixpath.join(self.key, str(other)) if self.key else str(other))

    def __str__(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"

    __repr__ = __str__

    def __eq__(self, other) -> bool:
        return isinstance(other, ObjPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __lt__(self, other: ObjPath) -> bool:
        return str(self) < str(other)

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def stem(self) -> str:
        n = self.name
        return n.rsplit(".", 1)[0] if "." in n[1:] else n

    @property
    def parent(self) -> ObjPath:
        return ObjPath(self.scheme, self.bucket, posixpath.dirname(self.key))

    def with_name(self, name: str) -> ObjPath:
        return self.parent / name

    def relative_to(self, other: ObjPath) -> str:
        return self.key[len(other.key):].lstrip("/")

    def is_symlink(self) -> bool:
        return False

    @property
    def store(self):
        return client(self.scheme, self.bucket)

    def _call(self, fn, *args, **kwargs):
        try:
            return fn(self.store, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 (mapped to what the store code expects, or re-raised)
            raise _explain(str(self), e) from None

    # -- objects
    def get(self):
        """(size, body) of one GET: the size is known before body() reads the bytes, so a caller can refuse
        an object larger than it can hold unread (fsutil.read_regular). FileNotFoundError if absent."""
        import obstore

        result = self._call(obstore.get, self.key)
        return result.meta["size"], lambda: bytes(result.bytes())

    def read(self, limit: int | None = None) -> bytes:
        """The object's bytes in one GET; refused unread (EFBIG) past limit bytes."""
        size, body = self.get()
        if limit is not None and size > limit:
            raise OSError(errno.EFBIG, f"{size} bytes, more than the {limit} it can hold", str(self))
        return body()

    def put(self, data: bytes) -> None:
        """One PUT: the object is replaced whole (what write-then-rename gives on a disk)."""
        import obstore

        try:
            self._call(obstore.put, self.key, data)
        except FileNotFoundError:
            raise _no_bucket(str(self)) from None

    def create(self, data: bytes) -> bool:
        """A conditional PUT: True if this call created the object, False if it was there already.

        obstore never sends a conditional write twice (the first may have landed, and a second would then be
        refused as if another writer held the key), so a dropped connection or a refused connect is retried
        here, with backoff, for up to RETRY_SECONDS as plain requests are. After a lost answer the retry may be
        refused by our own first create: False, and every caller reads back what is there and knows its own
        (a lease names its worker; store.json and the store's other files are compared by their bytes).
        """
        import obstore
        from obstore import exceptions as ox

        start, tries = time.monotonic(), 0
        while True:
            tries += 1
            try:
                obstore.put(self.store, self.key, data, mode="create")
            except (ox.AlreadyExistsError, ox.PreconditionError):
                return False
            except FileNotFoundError:
                raise _no_bucket(str(self)) from None
            except Exception as e:  # noqa: BLE001
                wait = min(0.1 * 2 ** tries, 2.0)
                if _transport_error(e) and time.monotonic() - start + wait <= RETRY_SECONDS:
                    time.sleep(wait)
                    continue
                err = _explain(str(self), e)
                if tries > 1 and isinstance(err, BucketError):
                    err = BucketError(f"{err} (this create was tried {tries} times over "
                                      f"{time.monotonic() - start:.0f}s)")
                raise err from None
            return True

    def replace_if(self, data: bytes, e_tag: str, version: str = "") -> bool:
        """A PUT conditional on the version read: its ETag on S3 (``If-Match``), its generation on GCS
        (``x-goog-if-generation-match``; object_store refuses a GCS update without one). True if it replaced
        that very version, False if the object changed or went since (then nothing is written)."""
        import obstore
        from obstore import exceptions as ox

        if not (version if self.scheme == "gs" else e_tag):
            return False
        try:
            mode = {k: v for k, v in (("e_tag", e_tag), ("version", version)) if v}  # (obstore refuses None)
            obstore.put(self.store, self.key, data, mode=mode)
        except (ox.PreconditionError, ox.AlreadyExistsError, FileNotFoundError):
            return False
        except Exception as e:  # noqa: BLE001
            raise _explain(str(self), e) from None
        return True

    def head(self) -> dict | None:
        """{size, last_modified (server clock, datetime), e_tag} or None when there is no such object."""
        import obstore

        try:
            return self._call(obstore.head, self.key)
        except FileNotFoundError:
            return None

    def mtime(self) -> float:
        """The object's Last-Modified (the server's clock), epoch seconds; FileNotFoundError if absent."""
        meta = self.head()
        if meta is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(self))
        return meta["last_modified"].timestamp()

    def unlink(self, missing_ok: bool = False) -> None:
        import obstore

        if not missing_ok and self.head() is None:
            raise FileNotFoundError(errno.ENOENT, "no such object", str(self))
        try:
            self._call(obstore.delete, self.key)
        except FileNotFoundError:  # S3 answers a delete of nothing with success, GCS with 404
            if not missing_ok:
                raise

    # -- "directories": key prefixes
    def listdir(self) -> list[str]:
        """Names directly under this key (objects and prefixes), like os.listdir; [] when none."""
        import obstore

        prefix = self.key + "/" if self.key else None
        found = self._call(obstore.list_with_delimiter, prefix)
        names = [posixpath.basename(p.rstrip("/")) for p in found["common_prefixes"]]
        names += [posixpath.basename(o["path"]) for o in found["objects"]]
        return sorted(set(names))

    def walk_objects(self) -> list[dict]:
        """Every object under this key, at any depth ({path, size, last_modified, ...})."""
        import obstore

        out = []
        for batch in self._call(obstore.list, self.key + "/" if self.key else None):
            out += batch
        return out

    def is_dir(self) -> bool:
        return bool(self.listdir())

    def exists(self) -> bool:
        """An object at this key (one HEAD; the store asks this of files only, is_dir of prefixes)."""
        return self.head() is not None

    def is_file(self) -> bool:
        return self.head() is not None

    def mkdir(self, *args, **kwargs) -> None:
        """Nothing to make: a prefix exists as soon as an object is under it."""

    def glob(self, pattern: str) -> list[ObjPath]:
        return [self / n for n in self.listdir() if fnmatch.fnmatchcase(n, pattern)]

    def server_now(self, read_only: bool = False) -> float:
        """The server's clock now (epoch seconds): an object written and read back at this prefix. A lease's
        age is this minus its Last-Modified, both the server's, so no host's clock enters it. read_only: a
        key that may not write (`inspect` with a read-only key) gets this host's clock instead."""
        probe = self / f".clock-{uuid.uuid4().hex}"
        try:
            probe.put(b"")
        except BucketError:
            if read_only:
                import time

                return time.time()
            raise
        try:
            return probe.mtime()
        finally:
            probe.unlink(missing_ok=True)


@contextlib.contextmanager
def object_errors(path):
    """Around calls another library makes through obstore (zarr's ObjectStore, zarr_store) on path: its
    errors as ObjPath's own (_explain), so a dead endpoint is the one-line BucketError, not obstore's
    multi-line report as a traceback. Nothing for a local path."""
    if not isinstance(path, ObjPath):
        yield
        return
    from obstore.exceptions import BaseError

    try:
        yield
    except BaseError as e:
        raise _explain(str(path), e) from None


def zarr_store(path: ObjPath):
    """zarr's ObjectStore for the zarr hierarchy at path: chunks and zarr.json as single PUTs."""
    from zarr.storage import ObjectStore

    return ObjectStore(client(path.scheme, path.bucket, path.key))


def conditional_writes_honoured(root: ObjPath) -> bool:
    """Create one probe object twice: a server that honours conditional writes refuses the second."""
    probe = root / f".conditional-probe-{uuid.uuid4().hex}"
    try:
        if not probe.create(b"1"):
            return True  # someone else's object of our random name: the refusal is what we want to see
        return not probe.create(b"2")
    finally:
        probe.unlink(missing_ok=True)


def require_conditional_writes(root: ObjPath) -> None:
    """Refuse the fleet (leases) on a server that ignores If-None-Match: two workers would both hold a unit."""
    if not conditional_writes_honoured(root):
        raise BucketError(f"{root}: the server ignores conditional writes (a second If-None-Match: * PUT of "
                          "the same key succeeded), so leases cannot keep two workers apart; run precompute with "
                          "--no-claim (the static --rank/--world-size split, no --join), or use a server that "
                          "honours them")
