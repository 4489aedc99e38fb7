"""The fleet soak's processes: a private PostgreSQL 15 cluster, HAProxy, Bastion replicas, the upstream.

Every process started here is stopped by `Fleet.close` (called from `try/finally` and `atexit`),
and the children this process starts get SIGTERM from the kernel if it dies first
(`PR_SET_PDEATHSIG`). PostgreSQL runs as the `postgres` OS user (`runuser`) in a directory of
its own, on a port of its own, so the machine's shared cluster is never touched.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from audit.checkpoint import load_or_create_signing_key
from bench import processes
from gateway.identity.devkeys import DEV_ISSUER, DevKey, ensure_dev_key
from gateway.keyfiles import load_or_create_secret

REPO = processes.REPO
PG_BIN = Path("/usr/lib/postgresql/15/bin")
HAPROXY = "/usr/sbin/haproxy"
BASTION = REPO / ".venv" / "bin" / "bastion"
UPSTREAM = "demo"
"""The upstream entry 2026-07-28 clients, the HTTP API, budgets and approvals use (`protocol: auto`)."""
SESSIONS_UPSTREAM = "demo-sessions"
"""The same server, `protocol: legacy`: every client session has its own upstream session."""
BUDGET_USER = "metered-bob"
BUDGET_NAME = "metered-per-user"
BUDGET_LIMIT = 300
APPROVER = "approver-ann"
FLEET_POLICY = f"""// The fleet soak's additions to the repository's policies (policies/demo.cedar).

@id("developers-use-demo-sessions")
@reason("developers may use the demo tools through legacy sessions too")
permit (
  principal in Group::"developers",
  action in [Action::"call_tool", Action::"list_tools"],
  resource in Upstream::"{SESSIONS_UPSTREAM}"
);

@id("wire-needs-approval")
@reason("every wire transfer needs a human")
@obligation("approval")
permit (
  principal in Group::"developers",
  action == Action::"call_tool",
  resource == Tool::"{UPSTREAM}/wire"
);
"""

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the process that started it dies."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A child process whose output goes to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log = log
        self.env = env
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=REPO,
                preexec_fn=_die_with_parent,
            )

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def stop(self, timeout: float = 15) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.popen.terminate()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _run(argv: Sequence[str], timeout: float = 120) -> str:
    done = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# -- PostgreSQL ---------------------------------------------------------------------------------


class Postgres:
    """A private PostgreSQL 15 cluster: `initdb` into a directory owned by `postgres`, trust auth on
    127.0.0.1, its socket in that directory, a free port."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bastion-fleet-pg-"))
        pw = pwd.getpwnam("postgres")
        os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        self.dir.chmod(0o700)
        self.data = self.dir / "data"
        self.logfile = self.dir / "postgres.log"
        self.port = processes.free_port()
        self.url = f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.running = False
        self._as_pg(
            str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
            "--locale", "C.UTF-8",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# bench.fleet\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nlogging_collector = off\n"
            )

    def _as_pg(self, *argv: str, timeout: float = 120) -> str:
        return _run(["runuser", "-u", "postgres", "--", *argv], timeout)

    def _ctl(self, *args: str) -> None:
        self._as_pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-w", *args)

    def start(self) -> None:
        self._ctl("-o", f"-p {self.port} -k {self.dir}", "start")
        self.running = True

    def restart(self) -> None:
        """`pg_ctl restart -m fast`: every connection is cut, in-flight transactions roll back."""
        self._ctl("-m", "fast", "restart")

    def stop(self) -> None:
        if self.running:
            try:
                self._ctl("-m", "fast", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self._ctl("-m", "immediate", "stop")
            self.running = False

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def pids(self) -> list[int]:
        """The postmaster and every backend of this cluster (for CPU accounting)."""
        try:
            head = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
        except OSError:
            return []
        root = int(head)
        return [root, *processes.children(root)]

    def psql(self, sql: str) -> str:
        return self._as_pg(
            str(PG_BIN / "psql"), "-h", str(self.dir), "-p", str(self.port), "-At", "-c", sql, timeout=60
        )


# -- HAProxy ------------------------------------------------------------------------------------


HAPROXY_CFG = """global
    maxconn 4096
    stats socket {sock} mode 600 level admin
    log stdout format raw local0

defaults
    mode http
    log global
    option httplog
    timeout connect 2s
    timeout client 300s
    timeout server 300s
    timeout http-request 15s
    timeout http-keep-alive 30s
    timeout queue 30s
    timeout check 1s
    retries 2
    option redispatch 1

frontend bastion
    bind 127.0.0.1:{port}
    default_backend replicas

backend replicas
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz ver HTTP/1.1 hdr Host 127.0.0.1
    http-check expect status 200
    http-response set-header X-Fleet-Replica %[srv_name]
{servers}
"""


class HAProxy:
    """Debian's HAProxy in front of the replicas: round robin, `/readyz` checked every second
    (`inter 1s fall 2 rise 2`), long server/client timeouts for SSE answers, connection failures
    retried on another replica (`retries 2`, `option redispatch`: nothing was sent yet)."""

    def __init__(self, work: Path, port: int, replicas: dict[str, int]) -> None:
        self.port = port
        self.sock = work / "haproxy.sock"
        self.cfg = work / "haproxy.cfg"
        servers = "\n".join(
            f"    server {name} 127.0.0.1:{port} check inter 1s fall 2 rise 2"
            for name, port in replicas.items()
        )
        self.cfg.write_text(HAPROXY_CFG.format(sock=self.sock, port=self.port, servers=servers))
        _run([HAPROXY, "-c", "-q", "-f", str(self.cfg)])
        self.child = Child("haproxy", [HAPROXY, "-db", "-f", str(self.cfg)], work / "haproxy.log")
        self.url = f"http://127.0.0.1:{self.port}"

    def command(self, cmd: str) -> str:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(str(self.sock))
            s.sendall(cmd.encode() + b"\n")
            chunks = []
            while data := s.recv(65536):
                chunks.append(data)
        return b"".join(chunks).decode(errors="replace")

    def states(self) -> dict[str, str]:
        """Each replica's state as HAProxy sees it (`UP`, `DOWN`, `MAINT`, `UP 1/2`, ...)."""
        out: dict[str, str] = {}
        for line in self.command("show stat").splitlines():
            cols = line.split(",")
            if len(cols) > 17 and cols[0] == "replicas" and cols[1] not in ("FRONTEND", "BACKEND"):
                out[cols[1]] = cols[17]
        return out

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.command(f"{'enable' if enabled else 'disable'} server replicas/{name}")

    def wait_up(self, names: Sequence[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.child.alive():
                raise RuntimeError(f"haproxy exited:\n{self.child.tail()}")
            try:
                states = self.states()
            except OSError:
                time.sleep(0.1)
                continue
            if all(states.get(n) == "UP" for n in names):
                return
            time.sleep(0.2)
        raise RuntimeError(
            f"HAProxy does not see {', '.join(names)} UP after {timeout:.0f} s: {self.states()}"
        )


# -- Bastion replicas ---------------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    port: int
    config: Path
    child: Child
    restarts: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.child.pid

    def restart(self) -> None:
        self.child.start()
        self.restarts += 1
        self.pids.append(self.child.pid)


def wait_ready(child: Child, url: str, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
        try:
            if httpx.get(url, timeout=2, headers={"host": "127.0.0.1"}).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{child.name} not ready at {url} after {timeout:.0f} s:\n{child.tail()}")


def shared_keys(shared: Path) -> DevKey:
    """Every key the replicas must share, made once before any of them starts (two replicas creating
    the same key file at once could each write their own): the dev issuer's key and JWKS, the audit
    HMAC key, the checkpoint signing key, the session secret, the approval-form and console keys."""
    shared.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ensure_dev_key(shared)
    for name in ("audit-hmac.key", "session.key", "approvals-form.key", "console.key", "delegation.key"):
        load_or_create_secret(shared / name)
    load_or_create_signing_key(shared / "audit-signing.key")
    return key


def policies(work: Path) -> Path:
    """The repository's policy set (policies/: demo.cedar, schema, entities) plus `FLEET_POLICY`."""
    out = work / "policies"
    out.mkdir(exist_ok=True)
    for name in ("demo.cedar", "schema.cedarschema", "entities.json"):
        shutil.copy(REPO / "policies" / name, out / name)
    (out / "fleet.cedar").write_text(FLEET_POLICY)
    return out


def replica_config(
    name: str, port: int, public_url: str, upstream_url: str, db_url: str, shared: Path, policy_dir: Path
) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": port, "public_url": public_url},
        "identity": {"issuers": [{"issuer": DEV_ISSUER, "jwks_file": str(shared / "dev-jwks.json")}]},
        "policy": {"dir": str(policy_dir)},
        "upstreams": {
            UPSTREAM: {"url": upstream_url, "protocol": "auto"},
            SESSIONS_UPSTREAM: {"url": upstream_url, "protocol": "legacy"},
        },
        "budgets": [
            {
                "name": BUDGET_NAME,
                "match": {"tools": [f"{UPSTREAM}/metered"], "users": [BUDGET_USER]},
                "per": ["user"],
                "limit": BUDGET_LIMIT,
                "window": "1d",
            }
        ],
        "audit": {
            "url": db_url,
            "instance": name,
            "hmac_key_file": str(shared / "audit-hmac.key"),
            "signing_key_file": str(shared / "audit-signing.key"),
        },
        "state": {"url": db_url},
        "sessions": {"secret_file": str(shared / "session.key")},
        "admin": {"groups": ["admins"]},
        "data_dir": str(shared),
    }


class Fleet:
    """PostgreSQL, the upstream, N replicas and HAProxy; `close` stops them all (idempotent)."""

    def __init__(self, work: Path, replicas: int, say: Any = print) -> None:
        self.work = work
        self.say = say
        self.pg: Postgres | None = None
        self.upstream: Child | None = None
        self.replicas: dict[str, Replica] = {}
        self.haproxy: HAProxy | None = None
        self.startup_failures: list[str] = []
        """Replicas that exited during the first, simultaneous start (and were started again)."""
        self._closed = False
        atexit.register(self.close)
        try:
            self._start(replicas)
        except BaseException:
            self.close()
            raise

    def _start(self, n: int) -> None:
        work = self.work
        say = self.say
        say("initdb + start of a private PostgreSQL 15 cluster")
        self.pg = Postgres()
        self.pg.start()
        say(f"PostgreSQL on 127.0.0.1:{self.pg.port} ({self.pg.dir})")
        up_port = processes.free_port()
        self.upstream = Child(
            "upstream",
            [sys.executable, "-m", "bench.fleet_upstream", str(up_port)],
            work / "upstream.log",
        )
        self.upstream_url = f"http://127.0.0.1:{up_port}/mcp"
        self.upstream_base = f"http://127.0.0.1:{up_port}"
        shared = work / "shared"
        self.key = shared_keys(shared)
        policy_dir = policies(work)
        ports = {f"replica-{i + 1}": processes.free_port() for i in range(n)}
        public = processes.free_port()
        processes.wait_mcp(self.upstream, self.upstream_url, 120)  # type: ignore[arg-type]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        for name, port in ports.items():
            cfg = replica_config(name, port, f"http://127.0.0.1:{public}", self.upstream_url, self.pg.url,
                                 shared, policy_dir)  # fmt: skip
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            child = Child(name, [str(BASTION), "serve", "--config", str(path)], work / f"{name}.log", env)
            self.replicas[name] = Replica(name, port, path, child, pids=[child.pid])
        say(f"started {n} replicas at once on a fresh database; waiting for /readyz")
        for rep in self.replicas.values():
            try:
                wait_ready(rep.child, f"{rep.base}/readyz")
            except RuntimeError:
                if rep.child.alive():
                    raise
                # As an orchestrator would: start it again, and say why it had to be.
                assert rep.child.popen is not None
                why = next(
                    (ln for ln in reversed(rep.child.tail(40).splitlines()) if ln.startswith("bastion: ")),
                    rep.child.tail(1),
                )
                self.startup_failures.append(
                    f"{rep.name} exited {rep.child.popen.returncode} at start-up: {why}"
                )
                say(f"{rep.name} exited at start-up ({why[:160]}); starting it again")
                rep.restart()
                wait_ready(rep.child, f"{rep.base}/readyz")
        self.haproxy = HAProxy(work, public, ports)
        self.haproxy.wait_up(list(ports))
        say(f"HAProxy on {self.haproxy.url}: {self.haproxy.states()}")

    @property
    def url(self) -> str:
        assert self.haproxy is not None
        return self.haproxy.url

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.haproxy is not None:
            self.haproxy.child.stop()
        for rep in self.replicas.values():
            rep.child.stop()
        if self.upstream is not None:
            self.upstream.stop()
        if self.pg is not None:
            self.pg.stop()
            self.pg.remove()
