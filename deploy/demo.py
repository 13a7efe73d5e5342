"""Sigil in one minute: a server, an agent, two workloads and a mutual TLS call.

Run it with ``python3 dev.py demo`` from the repository root. It works in a fresh
temporary folder, explains each step, stops everything it started and exits 0
(or 1, with the logs, if a step fails). Nothing is left behind.

What happens:
 1. ``sigil-server run`` starts a CA for the trust domain ``demo.sigil.test`` on the
    embedded SQLite default.
 2. ``sigil-server token generate`` makes a single-use join token.
 3. ``sigil-agent run --join-token ...`` attests to the server with it and opens the
    SPIFFE Workload API on a Unix socket.
 4. ``sigil-server entry create`` registers two workloads, ``frontend`` and
    ``backend``, under that agent, selected by the Unix user they run as.
 5. Two workload processes fetch their X.509-SVIDs and a JWT-SVID over the Workload
    API with py-spiffe, then talk mutual TLS; each checks the other's SPIFFE ID.
 6. Two unmodified plain-HTTP programs (python's http.server and curl) talk through
    two ``sigil-proxy`` sidecars that do the mutual TLS for them; a third sidecar
    with an identity not on the allow list is refused, and the log line says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
TRUST_DOMAIN = "demo.sigil.test"
BIN = Path(sys.executable).parent


class DemoError(Exception):
    pass


def step(n: int, text: str) -> None:
    print(f"\n{n}. {text}", flush=True)


def info(text: str) -> None:
    print(f"   {text}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def run(cmd: list[str], *, what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise DemoError(f"{what} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def wait_until(check, *, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}")


class Stack:
    """Owns every process the demo starts, and stops them all on exit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], **kw) -> subprocess.Popen[bytes]:  # type: ignore[no-untyped-def]
        log = open(self.root / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, **kw)
        self.procs.append((name, proc))
        return proc

    def stop(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    info(f"{name} did not stop on SIGTERM; killed")

    def tail_logs(self) -> None:
        for name, _ in self.procs:
            path = self.root / f"{name}.log"
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-15:]
                print(f"--- last lines of {name}.log ---", file=sys.stderr)
                for line in lines:
                    print(f"    {line}", file=sys.stderr)


def _others_can_enter(path: Path) -> bool:
    """True when every folder on the way to ``path`` lets other users through."""
    import stat

    for folder in [path, *path.parents]:
        with contextlib.suppress(OSError):
            if not folder.stat().st_mode & stat.S_IXOTH:
                return False
    return True


def workload_users() -> tuple[int, int] | None:
    """Two distinct UIDs for the workloads, when we may switch users.

    That takes root, and an interpreter and code that other users can reach (a
    Python installed under /root, say, is not).
    """
    if os.geteuid() != 0:
        return None
    needed = [Path(sys.executable).resolve().parent, Path(sys.base_prefix), Path(sys.prefix), HERE]
    if not all(_others_can_enter(p) for p in needed):
        return None
    return (65534, 65533)


@contextlib.contextmanager
def demo_dir() -> Iterator[Path]:
    # Short path: Unix socket paths are limited to about 100 bytes.
    root = Path(tempfile.mkdtemp(prefix="sigil-demo-", dir="/tmp"))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def demo(root: Path, stack: Stack) -> None:
    server_sock = root / "server" / "admin.sock"
    agent_sock = root / "agent-socket" / "api.sock"
    port = free_port()
    server_cli = [tool("sigil-server")]

    def admin(*args: str) -> str:
        return run([*server_cli, *args, "--socket-path", str(server_sock)], what=args[0])

    step(1, f"Start the server: the certificate authority of trust domain {TRUST_DOMAIN}")
    stack.start(
        "server",
        [*server_cli, "run", "--trust-domain", TRUST_DOMAIN, "--data-dir", str(root / "server"),
         "--bind-address", f"127.0.0.1:{port}", "--socket-path", str(server_sock),
         "--health-address", "127.0.0.1:0"],
    )
    wait_until(
        lambda: subprocess.run(
            [*server_cli, "healthcheck", "--socket-path", str(server_sock)],
            capture_output=True,
        ).returncode == 0,
        timeout=30, what="the server to become healthy",
    )
    info(f"agent API (TLS) on 127.0.0.1:{port}; admin API on the Unix socket {server_sock}")
    info("datastore: SQLite in the server's data directory; CA key: EC P-256, self-signed root")
    bundle_pem = admin("bundle", "show", "--format", "pem")
    (root / "bundle.pem").write_text(bundle_pem)
    info("the trust bundle (the CA certificate agents and workloads trust) is in bundle.pem")

    step(2, "Make a single-use join token for the agent")
    token = json.loads(admin("token", "generate", "--output", "json"))
    agent_id = token["agent_id"]
    info(f"token expires at {token['expires_at']}; the agent will be {agent_id}")

    step(3, "Start the agent: it attests with the token and opens the Workload API")
    agent_sock.parent.mkdir(mode=0o755)
    (root / "agent.toml").write_text('sync_interval = "1s"\n')
    stack.start(
        "agent",
        [tool("sigil-agent"), "run", "--config", str(root / "agent.toml"),
         "--trust-domain", TRUST_DOMAIN,
         "--server-address", f"127.0.0.1:{port}", "--data-dir", str(root / "agent"),
         "--socket-path", str(agent_sock), "--join-token", token["token"],
         "--trust-bundle", str(root / "bundle.pem")],
    )
    wait_until(agent_sock.exists, timeout=30, what="the agent's Workload API socket")
    info(f"agent attested; Workload API listening on {agent_sock}")
    second = subprocess.run(
        [tool("sigil-agent"), "run", "--trust-domain", TRUST_DOMAIN,
         "--server-address", f"127.0.0.1:{port}", "--data-dir", str(root / "agent2"),
         "--socket-path", str(root / "agent2.sock"), "--join-token", token["token"],
         "--trust-bundle", str(root / "bundle.pem")],
        capture_output=True, text=True, timeout=60,
    )
    if second.returncode == 0:
        raise DemoError("a second agent attested with a used join token")
    reason = (second.stderr.strip().splitlines() or ["(no message)"])[-1]
    info(f"a second agent trying the same token is refused: {reason}")

    step(4, "Register two workloads under that agent")
    users = workload_users()
    if users:
        uids = {"frontend": users[0], "backend": users[1]}
        info("running as root, so each workload gets a Unix user of its own; "
             "the unix:uid selector tells them apart")
    else:
        uids = {"frontend": os.getuid(), "backend": os.getuid()}
        info("the workloads cannot get Unix users of their own here (that takes root and a "
             "Python other users can run), so both run as you and both are entitled to both "
             "identities; each picks its own. With distinct users, or pods in Kubernetes, "
             "selectors keep them apart.")
    ids = {}
    for name, uid in uids.items():
        spiffe_id = f"spiffe://{TRUST_DOMAIN}/{name}"
        entry = json.loads(admin(
            "entry", "create", "--spiffe-id", spiffe_id, "--parent-id", agent_id,
            "--selector", f"unix:uid:{uid}", "--x509-svid-ttl", "600", "--hint", name,
            "--output", "json",
        ))
        ids[name] = spiffe_id
        info(f"entry {entry['id'][:8]}…: {spiffe_id} for processes with unix:uid:{uid}")

    step(5, "Start the workloads: SVIDs over the Workload API, then mutual TLS")
    env = dict(os.environ, SPIFFE_ENDPOINT_SOCKET=f"unix://{agent_sock}")
    wl_port = free_port()
    script = str(HERE / "demo_workload.py")

    def as_user(uid: int):  # type: ignore[no-untyped-def]
        if not users:
            return None

        def drop() -> None:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)

        return drop

    if users:
        root.chmod(0o755)  # the workloads (other users) must reach the agent socket
    backend = subprocess.Popen(
        [sys.executable, script, "serve", "--port", str(wl_port), "--hint", "backend",
         "--peer-id", ids["frontend"]],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=as_user(uids["backend"]), cwd="/",
    )
    stack.procs.append(("backend", backend))  # type: ignore[arg-type]
    assert backend.stdout is not None
    backend_lines: list[str] = []
    deadline = time.monotonic() + 60
    for line in backend.stdout:
        if line.strip() == "READY":
            break
        backend_lines.append(line)
        print(line, end="", flush=True)
        if time.monotonic() > deadline:
            break
    else:
        raise DemoError(
            "the backend workload exited before it was ready:\n" + "".join(backend_lines)
        )
    frontend = subprocess.run(
        [sys.executable, script, "call", "--port", str(wl_port), "--hint", "frontend",
         "--peer-id", ids["backend"]],
        env=env, capture_output=True, text=True, timeout=60,
        preexec_fn=as_user(uids["frontend"]), cwd="/",
    )
    print(frontend.stdout, end="", flush=True)
    rest, _ = backend.communicate(timeout=30)
    print(rest, end="", flush=True)
    if frontend.returncode != 0 or backend.returncode != 0:
        raise DemoError(
            f"the mutual TLS exchange failed (frontend exit {frontend.returncode}, backend exit "
            f"{backend.returncode}):\n{frontend.stderr}"
        )

    proxy_step(root, stack, admin, agent_id, agent_sock)

    print("\nDone: both workloads proved their SPIFFE IDs to each other with certificates "
          "the agent issued and rotates, and the backend checked the frontend's JWT-SVID; "
          "two plain-HTTP programs did the same through sigil-proxy without a line of TLS. "
          "Everything started here is now stopped.", flush=True)


def proxy_command() -> tuple[list[str], dict[str, str]]:
    """``sigil-proxy``, or ``python -m proxy`` from this checkout if it is not installed."""
    installed = BIN / "sigil-proxy"
    if installed.exists():
        return [str(installed)], dict(os.environ)
    path = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    return [sys.executable, "-m", "proxy"], dict(os.environ, PYTHONPATH=path)


def proxy_step(root: Path, stack: Stack, admin, agent_id: str, agent_sock: Path) -> None:  # type: ignore[no-untyped-def]
    step(6, "Plain HTTP through two sigil-proxy sidecars: mutual TLS without changing a line")
    ids = {n: f"spiffe://{TRUST_DOMAIN}/sidecar/{n}" for n in ("web", "client", "stranger")}
    for spiffe_id in ids.values():
        admin("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", agent_id,
              "--selector", f"unix:uid:{os.getuid()}", "--output", "json")
    info("registered three sidecar identities: " + ", ".join(ids.values()))
    info("(they all run as you, so each picks its own with --spiffe-id; with distinct "
         "users or pods each gets only its own)")
    site = root / "site"
    site.mkdir()
    (site / "index.html").write_text("hello from an unmodified HTTP server\n")
    http_port, in_port, out_port, bad_port = (free_port() for _ in range(4))
    stack.start("http-server", [sys.executable, "-m", "http.server", str(http_port),
                                "--bind", "127.0.0.1", "--directory", str(site)])
    info(f"backend: python3 -m http.server on 127.0.0.1:{http_port} (plain HTTP, no TLS)")
    cmd, env = proxy_command()
    sock = ["--socket-path", str(agent_sock)]
    sidecars = {
        "proxy-web": [*cmd, "run", *sock, "--spiffe-id", ids["web"],
                      "--inbound", f"127.0.0.1:{in_port}=127.0.0.1:{http_port}",
                      "--allow", ids["client"]],
        "proxy-client": [*cmd, "run", *sock, "--spiffe-id", ids["client"],
                         "--outbound", f"127.0.0.1:{out_port}=127.0.0.1:{in_port}",
                         "--expect", ids["web"]],
        "proxy-stranger": [*cmd, "run", *sock, "--spiffe-id", ids["stranger"],
                           "--outbound", f"127.0.0.1:{bad_port}=127.0.0.1:{in_port}",
                           "--expect", ids["web"]],
    }
    for name, args in sidecars.items():
        stack.start(name, args, env=env)
    for name in sidecars:
        log = root / f"{name}.log"
        wait_until(lambda log=log: "info listening" in log.read_text(errors="replace"),
                   timeout=60, what=f"{name} to get its SVID and listen")
    info(f"sigil-proxy inbound  127.0.0.1:{in_port} (mTLS) -> http.server; allows only "
         f"{ids['client']}")
    info(f"sigil-proxy outbound 127.0.0.1:{out_port} (plain) -> mTLS to the inbound one, "
         f"expects {ids['web']}")
    info(f"sigil-proxy outbound 127.0.0.1:{bad_port} (plain), presenting {ids['stranger']}")

    body = http_get(f"http://127.0.0.1:{out_port}/")
    if body is None or "hello from an unmodified HTTP server" not in body:
        raise DemoError(f"the request through the two sidecars failed: {body!r}")
    info(f"curl http://127.0.0.1:{out_port}/  ->  {body.strip()}")
    refused = http_get(f"http://127.0.0.1:{bad_port}/")
    if refused is not None:
        raise DemoError(f"the stranger's request got through: {refused!r}")
    info(f"curl http://127.0.0.1:{bad_port}/  ->  refused (the connection is closed)")
    log = root / "proxy-web.log"
    wait_until(lambda: "connection denied" in log.read_text(errors="replace"), timeout=30,
               what="the inbound sidecar's log line about the refusal")
    line = next(ln for ln in log.read_text(errors="replace").splitlines()
                if "connection denied" in ln)
    info("the inbound sidecar says why:")
    info(f"  {line}")


def http_get(url: str) -> str | None:
    """The body at ``url`` with curl (or urllib without it); None when refused."""
    curl = shutil.which("curl")
    if curl:
        done = subprocess.run([curl, "-sS", "--max-time", "20", url], capture_output=True,
                              text=True, timeout=60)
        return done.stdout if done.returncode == 0 else None
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=20) as resp:  # noqa: S310 - our http URL
            return str(resp.read().decode())
    except OSError:
        return None


def main() -> int:
    print(__doc__.split("\n\n")[0])
    with demo_dir() as root:
        stack = Stack(root)
        try:
            demo(root, stack)
        except (DemoError, subprocess.TimeoutExpired, OSError) as exc:
            print(f"\nDEMO FAILED: {exc}", file=sys.stderr)
            stack.tail_logs()
            return 1
        finally:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
