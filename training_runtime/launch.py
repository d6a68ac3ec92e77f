"""Start a distributed run: scheduler, servers and workers of MXNet's parameter server.

    python -m training_runtime.launch --workers N --servers M [--hostfile FILE]
        [--env K=V ...] [--timeout SECONDS] -- python train_attr.py ARGS --kvstore dist_sync

Locally (no --hostfile) every process runs on this machine on loopback: the
scheduler and the servers are ``python -c "import mxnet"`` processes (importing
mxnet with ``DMLC_ROLE`` = scheduler / server runs that role and exits when the
workers finish), the workers run the command. Each gets ``DMLC_ROLE``,
``DMLC_PS_ROOT_URI`` (127.0.0.1), ``DMLC_PS_ROOT_PORT`` (a free port),
``DMLC_NUM_WORKER``, ``DMLC_NUM_SERVER``, ``DMLC_NODE_HOST`` (127.0.0.1), and
``PORT`` is removed (ps-lite would bind to it). With ``--hostfile`` (one host
per line) the scheduler runs here and the servers and workers are started
round-robin on the hosts over ``ssh`` with the same environment, in the same
directory (it must exist there too); ``DMLC_PS_ROOT_URI`` is then this host's
name (``--root-uri`` overrides it).

Every line a child prints is prefixed ``[worker 0]``, ``[server 0]``,
``[scheduler]``. When every worker has exited 0 the launcher waits for the
servers and scheduler and exits 0. When any process exits non-zero (or a
server or the scheduler exits before the workers), the others are stopped
(SIGTERM, then SIGKILL after --grace seconds), the launcher prints
``launch: worker 1 (pid 1234) exited with status -9; stopped the others`` and
exits with 10 + the worker's rank for a worker, 9 for a server, 8 for the
scheduler; 7 when --timeout expired.
"""
import argparse
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

EXIT_SCHEDULER, EXIT_SERVER, EXIT_WORKER, EXIT_TIMEOUT = 8, 9, 10, 7


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_env(items):
    env = {}
    for item in items:
        if "=" not in item or not item.split("=", 1)[0]:
            raise SystemExit("launch: --env %r: expected KEY=VALUE" % item)
        key, value = item.split("=", 1)
        env[key] = value
    return env


def read_hostfile(path):
    try:
        with open(path) as f:
            hosts = [line.split("#")[0].strip() for line in f]
    except OSError as err:
        raise SystemExit("launch: --hostfile %s: %s" % (path, err.strerror))
    hosts = [h for h in hosts if h]
    if not hosts:
        raise SystemExit("launch: --hostfile %s: no hosts" % path)
    return hosts


class Child(object):
    def __init__(self, role, rank, argv, env, host=None):
        self.role, self.rank = role, rank
        self.name = role if role == "scheduler" else "%s %d" % (role, rank)
        if host is not None:  # remote: ssh with the environment on the command line
            exports = " ".join("%s=%s" % (k, shlex.quote(v)) for k, v in sorted(env.items())
                               if k.startswith("DMLC_") or k in EXTRA_KEYS)
            remote = "cd %s && env -u PORT %s %s" % (shlex.quote(os.getcwd()), exports,
                                                     " ".join(shlex.quote(a) for a in argv))
            argv = ["ssh", "-o", "StrictHostKeyChecking=no", host, remote]
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self):
        prefix = ("[%s] " % self.name).encode()
        for line in iter(self.proc.stdout.readline, b""):
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.buffer.flush()

    def signal(self, signum):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signum)
            except ProcessLookupError:
                pass


EXTRA_KEYS = set()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        raise SystemExit("launch: give the worker command after --, e.g. -- python train_attr.py "
                         "--kvstore dist_sync ...")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m training_runtime.launch",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes")
    parser.add_argument("--servers", type=int, default=1, help="number of server processes")
    parser.add_argument("--hostfile", help="one host per line: start servers and workers there over ssh")
    parser.add_argument("--root-uri", help="the scheduler's address the others connect to "
                                           "(default: 127.0.0.1, or this host's name with --hostfile)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment of every process (e.g. DMLC_INTERFACE=eth0)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="stop everything after this many seconds (0: no limit)")
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not command:
        raise SystemExit("launch: no worker command after --")
    if args.workers < 1 or args.servers < 1:
        raise SystemExit("launch: --workers and --servers must be at least 1")
    if command[0] in ("python", "python3"):
        command = [sys.executable] + command[1:]
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    extra = parse_env(args.env)
    EXTRA_KEYS.update(extra)
    root = args.root_uri or (socket.gethostname() if hosts else "127.0.0.1")
    base = dict(os.environ)
    base.pop("PORT", None)  # ps-lite binds to $PORT when set
    base.update({"DMLC_PS_ROOT_URI": root, "DMLC_PS_ROOT_PORT": str(free_port()),
                 "DMLC_NUM_WORKER": str(args.workers), "DMLC_NUM_SERVER": str(args.servers)})
    if not hosts:
        base["DMLC_NODE_HOST"] = "127.0.0.1"
    base.update(extra)
    server_cmd = [sys.executable, "-c", "import mxnet"]

    def env_for(role):
        env = dict(base, DMLC_ROLE=role)
        return env

    children = [Child("scheduler", 0, server_cmd, env_for("scheduler"))]
    for r in range(args.servers):
        children.append(Child("server", r, server_cmd, env_for("server"),
                              hosts[r % len(hosts)] if hosts else None))
    for r in range(args.workers):
        children.append(Child("worker", r, command, env_for("worker"),
                              hosts[r % len(hosts)] if hosts else None))
    workers = [c for c in children if c.role == "worker"]
    # ps-lite numbers workers by connection order, not by our index: the prefix is the
    # launch index; a worker's kvstore rank may differ

    def stop_all(reason, status):
        print("launch: %s; stopping the others" % reason, file=sys.stderr, flush=True)
        for c in children:
            c.signal(signal.SIGTERM)
        deadline = time.time() + args.grace
        while time.time() < deadline and any(c.proc.poll() is None for c in children):
            time.sleep(0.05)
        for c in children:
            c.signal(signal.SIGKILL)
            c.proc.wait()
        return status

    def on_signal(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    start = time.time()
    try:
        while True:
            # workers first: their failure is the cause when the servers then leave too.
            # A server or the scheduler that exits 0 is never a failure by itself: ps-lite
            # ends them when every worker has finalized
            for c in workers + [c for c in children if c.role != "worker"]:
                code = c.proc.poll()
                if code is None:
                    continue
                if code != 0:
                    status = {"scheduler": EXIT_SCHEDULER, "server": EXIT_SERVER}.get(
                        c.role, EXIT_WORKER + c.rank)
                    return stop_all("%s (pid %d) exited with status %d" % (c.name, c.proc.pid, code),
                                    status)
            if all(c.proc.poll() == 0 for c in children):
                for c in children:
                    c.thread.join(5)
                return 0
            if args.timeout and time.time() - start > args.timeout:
                return stop_all("--timeout %gs expired" % args.timeout, EXIT_TIMEOUT)
            time.sleep(0.05)
    except KeyboardInterrupt:
        return stop_all("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
