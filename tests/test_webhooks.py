"""Webhook delivery hardening: internal destinations are refused without a request, the POST goes to
the address that was checked, deliveries are signed (and `verify_signature` checks them), redirects
are not followed, the receiver's answer is bounded. No network: receivers are an
`httpx.MockTransport` or servers on 127.0.0.1 (allow-listed), and names resolve through a stub."""

import asyncio
import contextlib
import datetime
import json
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from pydantic import ValidationError

from configs.app_args import JobsConfig
from serve_app.jobs import webhooks

SECRET = "whsec-test-0123456789abcdef"
PAYLOAD = {"id": "job-1", "object": "job", "status": "succeeded", "note": "naïve ✓"}


def _deliver(url, **options):
    options = {"attempts": 3, "backoff_s": 0.01, "timeout_s": 5, **options}
    return asyncio.run(webhooks.deliver(url, PAYLOAD, **options))


class _Recorder:
    """A mock receiver: records each request and answers `status` (with `headers`)."""

    def __init__(self, status=200, headers=None):
        self.status, self.headers, self.requests = status, headers or {}, []
        self.transport = httpx.MockTransport(self._answer)

    def _answer(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return httpx.Response(self.status, headers=self.headers)


@pytest.fixture
def resolver(monkeypatch):
    """Names resolve through this table (host -> addresses); every lookup is counted."""
    table, lookups = {}, []

    async def resolve(host, port):
        lookups.append(host)
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "not in the test table")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in table[host]]

    monkeypatch.setattr(webhooks, "_resolve", resolve)
    return table, lookups


# --- refused destinations: no request at all, no retry ---------------------------------------------


@pytest.mark.parametrize(
    "url, reason",
    [
        ("http://127.0.0.1/hook", "loopback"),
        ("http://127.1.2.3:8080/hook?token=s3cret", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://10.0.0.1/hook", "private"),
        ("http://192.168.1.20/hook", "private"),
        ("http://172.16.0.5/hook", "private"),
        ("http://100.64.0.1/hook", "carrier-grade NAT"),
        ("http://0.0.0.0:8000/hook", "unspecified"),
        ("http://224.0.0.1/hook", "multicast"),
        ("http://240.0.0.1/hook", "reserved"),
        ("http://[::1]/hook", "loopback"),
        ("http://[::ffff:127.0.0.1]/hook", "loopback"),
        ("http://[::ffff:169.254.169.254]/hook", "link-local"),
        ("http://[fe80::1]/hook", "link-local"),
        ("http://[fd00::1]/hook", "private"),
        ("http://[64:ff9b::a00:1]/hook", "private"),
        ("http://localhost:8080/hook", "loopback"),
        ("http://2130706433/hook", "loopback"),  # 127.0.0.1 as one number
        ("http://0x7f.0.0.1/hook", "loopback"),
    ],
)
def test_internal_destinations_are_refused_without_a_request(url, reason, caplog):
    receiver = _Recorder()
    with caplog.at_level("WARNING", logger="ray.serve"):
        started = time.monotonic()
        delivered = _deliver(url, transport=receiver.transport, secret=SECRET, backoff_s=5)
    assert delivered is False and receiver.requests == []
    assert time.monotonic() - started < 4  # not retried (the backoff would be 5 s)
    refusals = [record.getMessage() for record in caplog.records]
    assert len(refusals) == 1 and "refused" in refusals[0] and reason in refusals[0], refusals
    assert "s3cret" not in caplog.text and SECRET not in caplog.text


def test_a_name_resolving_to_any_internal_address_is_refused(resolver, caplog):
    table, lookups = resolver
    table["hooks.example"] = ["93.184.216.34", "10.1.2.3"]  # one public, one private: refused
    table["metadata.example"] = ["169.254.169.254"]
    receiver = _Recorder()
    with caplog.at_level("ERROR", logger="ray.serve"):
        assert _deliver("https://hooks.example/cb", transport=receiver.transport) is False
        assert _deliver("https://metadata.example/cb", transport=receiver.transport) is False
    assert receiver.requests == [] and lookups == ["hooks.example", "metadata.example"]
    assert "hooks.example resolves to 10.1.2.3: private" in caplog.text
    assert "metadata.example resolves to 169.254.169.254: link-local" in caplog.text


def test_address_refusal_names_each_kind():
    from ipaddress import ip_address

    assert webhooks.address_refusal(ip_address("93.184.216.34")) is None
    assert webhooks.address_refusal(ip_address("2606:4700::1111")) is None
    assert webhooks.address_refusal(ip_address("::ffff:93.184.216.34")) is None  # IPv4-mapped public
    assert webhooks.address_refusal(ip_address("::")) == "unspecified"
    assert webhooks.address_refusal(ip_address("ff02::1")) == "multicast"
    assert webhooks.address_refusal(ip_address("2002:a00:1::1")).startswith("private")  # 6to4 of 10.0.0.1
    assert webhooks.address_refusal(ip_address("fec0::1")) in {"private", "site-local", "reserved"}


# --- allowed destinations: pinned to the checked address, signed ----------------------------------


def test_the_post_goes_to_the_checked_address_and_is_signed(resolver):
    table, lookups = resolver
    table["hooks.example"] = ["93.184.216.34"]
    receiver = _Recorder()
    assert _deliver("https://hooks.example:8443/cb?token=x", transport=receiver.transport, secret=SECRET) is True
    (request,) = receiver.requests
    # Connected to the address that was checked (no second lookup), named as the URL says.
    assert request.url.host == "93.184.216.34" and request.url.port == 8443 and request.url.query == b"token=x"
    assert request.headers["host"] == "hooks.example:8443"
    assert request.extensions["sni_hostname"] == "hooks.example"
    assert lookups == ["hooks.example"]
    timestamp, signature = request.headers["x-webhook-timestamp"], request.headers["x-webhook-signature"]
    assert abs(int(timestamp) - time.time()) < 60 and signature.startswith("v1=")
    assert webhooks.verify_signature(SECRET, timestamp, request.content, signature)
    assert json.loads(request.content) == PAYLOAD and request.headers["content-type"] == "application/json"


def test_without_a_secret_nothing_is_signed(resolver):
    resolver[0]["hooks.example"] = ["93.184.216.34"]
    receiver = _Recorder()
    assert _deliver("http://hooks.example/cb", transport=receiver.transport) is True
    (request,) = receiver.requests
    assert "x-webhook-signature" not in request.headers and "x-webhook-timestamp" not in request.headers


def test_every_try_resolves_again(resolver):
    table, lookups = resolver
    table["hooks.example"] = ["93.184.216.34"]
    receiver = _Recorder(status=503)
    assert _deliver("http://hooks.example/cb", transport=receiver.transport, attempts=3) is False
    assert len(receiver.requests) == 3 and lookups == ["hooks.example"] * 3


def test_redirects_are_not_followed(resolver):
    resolver[0]["hooks.example"] = ["93.184.216.34"]
    receiver = _Recorder(status=302, headers={"location": "http://169.254.169.254/latest/meta-data/"})
    assert _deliver("http://hooks.example/cb", transport=receiver.transport, attempts=2) is False
    assert [request.url.path for request in receiver.requests] == ["/cb", "/cb"]
    assert {request.url.host for request in receiver.requests} == {"93.184.216.34"}


@pytest.mark.parametrize(
    "allow, url",
    [
        (["127.0.0.1"], "http://127.0.0.1:{port}/hook"),
        (["127.0.0.0/8"], "http://127.0.0.1:{port}/hook"),
        (["localhost"], "http://localhost:{port}/hook"),
        (["LocalHost."], "http://localhost:{port}/hook"),
    ],
)
def test_an_allow_listed_receiver_gets_a_signed_post(allow, url):
    with _server(_Receiver) as server:
        assert _deliver(url.format(port=server.server_port), allow=allow, secret=SECRET) is True
    ((path, headers, body),) = server.received
    assert path == "/hook" and json.loads(body) == PAYLOAD
    assert webhooks.verify_signature(SECRET, headers["X-Webhook-Timestamp"], body, headers["X-Webhook-Signature"])


def test_allowing_one_address_does_not_allow_another():
    receiver = _Recorder()
    assert _deliver("http://10.0.0.2/hook", transport=receiver.transport, allow=["10.0.0.1", "hooks.internal"]) is False
    assert _deliver("http://10.0.0.2/hook", transport=receiver.transport, allow=["10.0.0.0/30"]) is True
    assert [request.url.host for request in receiver.requests] == ["10.0.0.2"]


def test_https_to_a_pinned_address_still_checks_the_certificate_of_the_name(tmp_path, resolver):
    pytest.importorskip("cryptography")
    ca, chain = _certificates(tmp_path, "hooks.test")
    server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_tls.load_cert_chain(*chain)
    names = []
    server_tls.sni_callback = lambda sock, name, context: names.append(name)
    resolver[0]["hooks.test"] = ["127.0.0.1"]
    resolver[0]["other.test"] = ["127.0.0.1"]
    client_tls = ssl.create_default_context(cafile=ca)
    with _server(_Receiver, tls=server_tls) as server:
        port = server.server_port

        def deliver(host):
            transport = httpx.AsyncHTTPTransport(verify=client_tls)
            return _deliver(f"https://{host}:{port}/hook", allow=["127.0.0.1"], secret=SECRET, transport=transport, attempts=1)

        assert deliver("hooks.test") is True
        assert deliver("other.test") is False  # the certificate is for hooks.test: refused by TLS
    ((_, headers, _),) = server.received
    assert headers["Host"] == f"hooks.test:{port}" and names[:2] == ["hooks.test", "other.test"]


# --- the receiver's answer is bounded ----------------------------------------------------------------


def test_the_answer_body_is_not_read():
    with _server(_EndlessBody) as server:
        started = time.monotonic()
        assert _deliver(f"http://127.0.0.1:{server.server_port}/hook", allow=["127.0.0.1"], timeout_s=20) is True
        assert time.monotonic() - started < 10


def test_a_receiver_dripping_its_answer_is_cut_at_the_timeout(caplog):
    with _server(_Drip) as server, caplog.at_level("WARNING", logger="ray.serve"):
        started = time.monotonic()
        url = f"http://127.0.0.1:{server.server_port}/hook"
        assert _deliver(url, allow=["127.0.0.1"], timeout_s=0.5, attempts=1) is False
        assert time.monotonic() - started < 5
    assert "no answer within 0.5 s" in caplog.text


# --- signatures ----------------------------------------------------------------------------------------


def test_verify_signature_accepts_only_the_exact_body_and_a_fresh_timestamp():
    body = json.dumps(PAYLOAD).encode()
    now = 1_800_000_000
    header = webhooks.sign(SECRET, now, body)
    assert header == "v1=" + __import__("hmac").new(SECRET.encode(), f"{now}.".encode() + body, "sha256").hexdigest()
    assert webhooks.verify_signature(SECRET, str(now), body, header, now=now + 10)
    assert webhooks.verify_signature(SECRET, now, body.decode(), header, now=now - 10)  # str body, int timestamp
    assert not webhooks.verify_signature(SECRET, now, body + b" ", header, now=now)  # tampered body
    assert not webhooks.verify_signature(SECRET, now, body.replace(b"succeeded", b"failed"), header, now=now)
    assert not webhooks.verify_signature(SECRET, now + 1, body, header, now=now)  # another timestamp
    assert not webhooks.verify_signature("another-secret", now, body, header, now=now)
    assert not webhooks.verify_signature(SECRET, now, body, header, now=now + 301)  # stale: a replay
    assert webhooks.verify_signature(SECRET, now, body, header, tolerance_s=600, now=now + 301)
    assert not webhooks.verify_signature(SECRET, now, body, header, now=now - 301)  # from the future
    assert webhooks.verify_signature(SECRET, now, body, "v1=00ff, " + header, now=now)  # any one of several
    for bad in ("", "v1=", header.removeprefix("v1="), "v0=" + header[3:], header.upper(), "v1=ünïcode"):
        assert not webhooks.verify_signature(SECRET, now, body, bad, now=now), bad
    for bad_timestamp in ("", "soon", None, "1e9"):
        assert not webhooks.verify_signature(SECRET, bad_timestamp, body, header, now=now)


def test_the_environment_secret_wins_over_the_config():
    assert webhooks.resolve_secret("from-yaml", {}) == "from-yaml"
    assert webhooks.resolve_secret("from-yaml", {webhooks.SECRET_ENV: "from-env"}) == "from-env"
    assert webhooks.resolve_secret(None, {webhooks.SECRET_ENV: ""}) is None
    assert webhooks.resolve_secret(None, {}) is None


# --- submit time, config -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, allow, refused",
    [
        ("http://169.254.169.254/latest/meta-data/", [], True),
        ("http://[::1]:9000/x", [], True),
        ("http://[::ffff:10.0.0.1]/x", [], True),
        ("http://localhost/x", [], True),
        ("http://api.localhost./x", [], True),
        ("http://localhost/x", ["localhost"], False),
        ("http://localhost/x", ["127.0.0.0/8", "::1"], False),
        ("http://localhost/x", ["127.0.0.0/8"], True),  # ::1 is not allowed
        ("http://10.1.2.3/x", ["10.0.0.0/8"], False),
        ("http://93.184.216.34/x", [], False),
        ("https://hooks.example.com/x", [], False),  # names are checked when delivering
    ],
)
def test_literal_internal_hosts_are_refused_at_submit(url, allow, refused):
    assert (webhooks.literal_refusal(url, allow) is not None) is refused
    if refused:
        from deployments.types import InvalidRequestError

        with pytest.raises(InvalidRequestError) as caught:
            webhooks.check_submitted(url, allow)
        assert caught.value.param == "webhook_url" and caught.value.code == "webhook_url_refused"
    else:
        assert webhooks.check_submitted(url, allow) == url


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_submitting_an_internal_webhook_is_400(tmp_path, anyio_backend):
    from tests.fakes import FakeEngine, local_app

    job = {"kind": "txt2img", "params": {"prompt": "x"}, "webhook_url": "http://169.254.169.254/latest/meta-data/"}
    batch = {"prompts": ["x"], "async": True, "webhook_url": "http://[::1]:8080/x"}
    numeric = {**job, "webhook_url": "http://2130706433/x"}  # 127.0.0.1 once the URL is normalised
    async with local_app(FakeEngine(), tmp_path) as client:
        for path, body in (("/v1/jobs", job), ("/v1/images/batch", batch), ("/v1/jobs", numeric)):
            response = await client.post(path, json=body)
            assert response.status_code == 400, response.text
            assert response.json()["error"]["param"] == "webhook_url"
            assert response.json()["error"]["code"] == "webhook_url_refused"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_job_webhook_arrives_signed(tmp_path, anyio_backend, monkeypatch):
    from tests.fakes import FakeEngine, local_app

    monkeypatch.delenv(webhooks.SECRET_ENV, raising=False)
    jobs = {"webhook_allow": ["127.0.0.1"], "webhook_secret": SECRET, "webhook_backoff_s": 0.1}
    with _server(_Receiver) as server:
        async with local_app(FakeEngine(), tmp_path, jobs=jobs) as client:
            body = {"kind": "txt2img", "params": {"prompt": "x"}, "webhook_url": f"http://127.0.0.1:{server.server_port}/hook"}
            view = (await client.post("/v1/jobs", json=body)).json()
            deadline = time.time() + 30
            while not server.received and time.time() < deadline:
                await asyncio.sleep(0.05)
    ((_, headers, received),) = server.received
    assert json.loads(received)["id"] == view["id"] and json.loads(received)["status"] == "succeeded"
    assert webhooks.verify_signature(SECRET, headers["X-Webhook-Timestamp"], received, headers["X-Webhook-Signature"])


def test_config_checks_the_allow_list():
    config = JobsConfig(webhook_allow=["10.0.0.0/8", "127.0.0.1", "::1", "fd00::/8", "hooks.internal", "receiver"])
    assert config.webhook_secret is None
    for bad in ("http://hooks.internal", "hooks internal", "10.0.0.0/33", "-bad.example", ""):
        with pytest.raises(ValidationError):
            JobsConfig(webhook_allow=[bad])
    with pytest.raises(ValidationError):
        JobsConfig(webhook_secret="")
    assert "s3cret-value" not in repr(JobsConfig(webhook_secret="s3cret-value"))


# --- receivers on 127.0.0.1 ------------------------------------------------------------------------------


class _Quiet(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Receiver(_Quiet):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, dict(self.headers), body))
        self.send_response(204)
        self.end_headers()


class _EndlessBody(_Quiet):
    """Answers 200 and a body of a claimed gigabyte, written until the client goes away."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", str(10**9))
        self.end_headers()
        chunk = b"x" * 65536
        with contextlib.suppress(OSError):
            for _ in range(10**9 // len(chunk)):
                self.wfile.write(chunk)


class _Drip(_Quiet):
    """Answers one header line every 0.1 s, never finishing: each read is quick, the whole is not."""

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        with contextlib.suppress(OSError):
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            for i in range(100):
                self.wfile.write(f"X-Drip-{i}: .\r\n".encode())
                self.wfile.flush()
                time.sleep(0.1)


@contextlib.contextmanager
def _server(handler, tls=None):
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.received = []
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _certificates(tmp_path, name):
    """A test CA's PEM path, and (certificate, key) PEM paths of a server certificate for `name`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "webhook test CA")])

    def builder(subject, public_key):
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(ca_name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        )

    usage = dict(content_commitment=False, key_encipherment=False, data_encipherment=False, key_agreement=False,
                 encipher_only=False, decipher_only=False)
    ca = (
        builder(ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, **usage), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key.public_key())
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False, **usage), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = [tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"]
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(paths[0]), (str(paths[1]), str(paths[2]))
