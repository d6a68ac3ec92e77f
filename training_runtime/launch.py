"""Start a distributed run: scheduler, servers and workers of MXNet's parameter server.

    python -m training_runtime.launch --workers N --servers M [--hostfile FILE]
        [--env K=V ...] [--timeout SECONDS] -- python train_attr.py ARGS --kvstore dist_sync

Locally (no --hostfile) every process runs on this machine on loopback: the
scheduler and the servers are ``python -c "import mxnet"`` processes (importing
mxnet with ``DMLC_ROLE`` = scheduler / server runs that role and exits when the
workers finish), the workers run the command. Each gets ``DMLC_ROLE``,
``DMLC_PS_ROOT_URI`` (127.0.0.1), ``DMLC_PS_ROOT_PORT`` (a free port),
``DMLC_NUM_WORKER``, ``DMLC_NUM_SERVER``, ``DMLC_NODE_HOST`` (127.0.0.1), and
``PORT`` is removed (ps-lite would bind to it).

With ``--hostfile`` (one host per line, ``user@host`` allowed, ``#`` comments)
the scheduler runs here and the servers and workers are started round-robin
on the hosts over ``ssh`` (BatchMode: passwordless keys), in this directory
(the same checkout and Python must exist there at the same paths), with
``PORT`` unset and the environment given on the remote command line: every
``DMLC_*`` variable, the ``--env`` ones, and PYTHONPATH, OMP_NUM_THREADS and
``MXNET_*`` when set here. ``DMLC_PS_ROOT_URI`` is then this host's name
(``--root-uri`` overrides it); ``--env DMLC_INTERFACE=eth0`` picks the network
interface ps-lite binds to on every host. :func:`plan` builds every command line
(tested without ssh). The workers started on one host split the command's
``--gpus`` list between them (``--gpus 0,1,2,3`` with 2 workers on a host: the
first gets ``0,1``, the second ``2,3``; ``--share-gpus`` gives each the whole
list); a list that does not divide evenly is refused before anything starts.

Every line a child prints is prefixed ``[worker 0]``, ``[server 0]``,
``[scheduler]`` (the launch index; ps-lite numbers workers in the order they
connect, so a worker's kvstore rank may differ). When every worker has exited 0
the launcher waits for the servers and scheduler and exits 0. When any process
exits non-zero, the others are stopped (the workers get SIGTERM: each finishes its step and saves
a checkpoint; when they are gone, or after --grace seconds, everything left gets
SIGKILL), the launcher
prints ``launch: worker 1 (pid 1234) exited with status -9 (SIGKILL); stopping
the others`` and ``launch: stopped every process in 0.4s`` and exits with 10 + the
worker's index for a worker, 9 for a server, 8 for the scheduler; 7 when
--timeout expired.
"""
import argparse
import collections
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

EXIT_SCHEDULER, EXIT_SERVER, EXIT_WORKER, EXIT_TIMEOUT = 8, 9, 10, 7
#: environment variables passed to remote processes besides DMLC_* and --env
REMOTE_KEYS = ("PYTHONPATH", "OMP_NUM_THREADS")
REMOTE_PREFIXES = ("DMLC_", "MXNET_")
_HOST = re.compile(r"^([A-Za-z0-9._-]+@)?[A-Za-z0-9._:\[\]-]+$")

#: one process to start: role 'scheduler' / 'server' / 'worker', its index, the argv to
#: run (ssh for a remote one), its environment, the host (None: here)
Spec = collections.namedtuple("Spec", "role rank argv env host")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_env(items):
    """{KEY: VALUE} of the --env items; SystemExit naming a malformed one."""
    env = {}
    for item in items:
        key = item.split("=", 1)[0]
        if "=" not in item or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SystemExit("launch: --env %r: expected KEY=VALUE" % item)
        env[key] = item.split("=", 1)[1]
    return env


def read_hostfile(path):
    """The hosts of a hostfile: one per line (``host`` or ``user@host``), blank lines and
    ``#`` comments ignored. SystemExit naming the file (and line) when it cannot be
    read, holds no host, or a line is not one host name."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise SystemExit("launch: --hostfile %s: %s" % (path, err.strerror))
    except UnicodeDecodeError:
        raise SystemExit("launch: --hostfile %s: not a text file" % path)
    hosts = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#")[0].strip()
        if not entry:
            continue
        if not _HOST.match(entry):
            raise SystemExit("launch: --hostfile %s line %d: expected one host name per line "
                             "(host or user@host), got %r" % (path, number, entry))
        hosts.append(entry)
    if not hosts:
        raise SystemExit("launch: --hostfile %s: no hosts" % path)
    return hosts


def remote_argv(host, argv, env, cwd, extra_keys=()):
    """The ssh command that runs ``argv`` on ``host`` in ``cwd`` with the part of ``env``
    that matters there (DMLC_*, MXNET_*, REMOTE_KEYS, ``extra_keys``), PORT unset."""
    keys = sorted(k for k in env if k.startswith(REMOTE_PREFIXES) or k in REMOTE_KEYS
                  or k in extra_keys)
    exports = " ".join("%s=%s" % (k, shlex.quote(env[k])) for k in keys)
    remote = "cd %s && env -u PORT %s %s" % (shlex.quote(cwd), exports,
                                             " ".join(shlex.quote(a) for a in argv))
    return ["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new", host, remote]


def _gpus_value(command):
    """(position, value) of the ``--gpus`` list in a worker command, or None."""
    for i, arg in enumerate(command):
        if arg == "--gpus" and i + 1 < len(command):
            return i + 1, command[i + 1]
        if arg.startswith("--gpus="):
            return i, arg[len("--gpus="):]
    return None


def split_gpus(command, host_workers):
    """The worker commands of the ``host_workers`` workers of one host: each gets its own
    consecutive part of the command's ``--gpus`` list (``--gpus 0,1,2,3`` over 2 workers:
    ``0,1`` and ``2,3``), so workers sharing a machine never share a GPU. Commands
    without ``--gpus`` (or one worker per host) are unchanged; a list that does not
    divide evenly is a SystemExit naming the list and the counts."""
    found = _gpus_value(command)
    if found is None or host_workers == 1:
        return [list(command) for _ in range(host_workers)]
    position, value = found
    gpus = [g for g in value.split(",") if g.strip()]
    if len(gpus) % host_workers:
        raise SystemExit("launch: --gpus %s: %d GPU(s) cannot be split evenly over the %d workers of "
                         "one host (give each worker its own GPUs: a multiple of %d ids, or "
                         "--share-gpus)" % (value, len(gpus), host_workers, host_workers))
    per = len(gpus) // host_workers
    commands = []
    for k in range(host_workers):
        part = ",".join(gpus[k * per:(k + 1) * per])
        argv = list(command)
        argv[position] = part if argv[position] == value and argv[position - 1] == "--gpus" \
            else "--gpus=" + part
        commands.append(argv)
    return commands


def plan(workers, servers, command, hosts=None, root_uri=None, port=None, extra_env=None,
         environ=None, cwd=None, python=sys.executable, share_gpus=False):
    """Every process of a run as :data:`Spec` (scheduler, servers, workers), nothing started.

    command: the workers' argv (a leading ``python`` / ``python3`` becomes ``python``);
    hosts: None (loopback) or the hostfile's hosts (servers and workers round-robin, the
    scheduler here); environ: the base environment (default os.environ; PORT is removed).
    """
    if workers < 1 or servers < 1:
        raise SystemExit("launch: --workers and --servers must be at least 1")
    if not command:
        raise SystemExit("launch: no worker command after --")
    command = list(command)
    if command[0] in ("python", "python3"):
        command = [python] + command[1:]
    extra_env = dict(extra_env or {})
    base = dict(os.environ if environ is None else environ)
    base.pop("PORT", None)  # ps-lite binds to $PORT when set
    base.update({"DMLC_PS_ROOT_URI": root_uri or (socket.gethostname() if hosts else "127.0.0.1"),
                 "DMLC_PS_ROOT_PORT": str(port or free_port()),
                 "DMLC_NUM_WORKER": str(workers), "DMLC_NUM_SERVER": str(servers)})
    if not hosts:
        base["DMLC_NODE_HOST"] = "127.0.0.1"
    base.update(extra_env)
    cwd = cwd or os.getcwd()
    role_cmd = [python, "-c", "import mxnet"]
    specs = [Spec("scheduler", 0, role_cmd, dict(base, DMLC_ROLE="scheduler"), None)]
    # workers on one host split its --gpus list between them (unless share_gpus)
    host_of = [hosts[r % len(hosts)] if hosts else None for r in range(workers)]
    per_host = collections.Counter(host_of)
    local = {host: iter([list(command)] * count if share_gpus else split_gpus(command, count))
             for host, count in per_host.items()}
    worker_cmds = [next(local[host]) for host in host_of]
    for role, count in (("server", servers), ("worker", workers)):
        for r in range(count):
            argv = role_cmd if role == "server" else worker_cmds[r]
            env = dict(base, DMLC_ROLE=role)
            host = hosts[r % len(hosts)] if hosts else None
            specs.append(Spec(role, r, remote_argv(host, argv, env, cwd, extra_env) if host else argv,
                              env, host))
    return specs


class Child(object):
    def __init__(self, spec):
        self.role, self.rank = spec.role, spec.rank
        self.name = spec.role if spec.role == "scheduler" else "%s %d" % (spec.role, spec.rank)
        self.proc = subprocess.Popen(spec.argv, env=spec.env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
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


def describe_status(code):
    """'status 3', or 'status -9 (SIGKILL)' for a process ended by a signal."""
    if code < 0:
        try:
            return "status %d (%s)" % (code, signal.Signals(-code).name)
        except ValueError:
            pass
    return "status %d" % code


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m training_runtime.launch",
                                     description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s --workers N [--servers M] [options] -- "
                                           "python SCRIPT ARGS --kvstore dist_sync")
    parser.add_argument("--workers", type=int, required=True, help="number of worker processes")
    parser.add_argument("--servers", type=int, default=1, help="number of server processes")
    parser.add_argument("--hostfile", help="one host per line: start servers and workers there over ssh")
    parser.add_argument("--root-uri", help="the scheduler's address the others connect to "
                                           "(default: 127.0.0.1, or this host's name with --hostfile)")
    parser.add_argument("--env", action="append", default=[], metavar="K=V",
                        help="extra environment of every process (e.g. DMLC_INTERFACE=eth0)")
    parser.add_argument("--share-gpus", action="store_true",
                        help="give every worker of a host the whole --gpus list of the command (by "
                             "default the workers of one host split it: --gpus 0,1,2,3 over 2 "
                             "workers gives 0,1 and 2,3)")
    parser.add_argument("--timeout", type=float, default=0,
                        help="stop everything after this many seconds (0: no limit)")
    parser.add_argument("--grace", type=float, default=3.0,
                        help="seconds between SIGTERM and SIGKILL when stopping the others")
    if "--" not in argv:
        if "-h" in argv or "--help" in argv:
            parser.parse_args(["--help"])
        raise SystemExit("launch: give the worker command after --, e.g. -- python train_attr.py "
                         "--kvstore dist_sync ...")
    split = argv.index("--")
    args = parser.parse_args(argv[:split])
    hosts = read_hostfile(args.hostfile) if args.hostfile else None
    specs = plan(args.workers, args.servers, argv[split + 1:], hosts, args.root_uri,
                 extra_env=parse_env(args.env), share_gpus=args.share_gpus)
    children = [Child(spec) for spec in specs]
    workers = [c for c in children if c.role == "worker"]

    def stop_all(reason, status):
        # the workers get SIGTERM (a worker finishes its step and checkpoints: it needs the
        # servers), then, when they are gone or after --grace, everything left SIGKILL
        print("launch: %s; stopping the others" % reason, file=sys.stderr, flush=True)
        started = time.time()
        for c in workers:
            c.signal(signal.SIGTERM)
        deadline = started + args.grace
        while time.time() < deadline and any(c.proc.poll() is None for c in workers):
            time.sleep(0.05)
        for c in workers + [c for c in children if c.role != "worker"]:
            c.signal(signal.SIGKILL)
            c.proc.wait()
        print("launch: stopped every process in %.1fs" % (time.time() - started), file=sys.stderr,
              flush=True)
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
                if code is None or code == 0:
                    continue
                status = {"scheduler": EXIT_SCHEDULER, "server": EXIT_SERVER}.get(
                    c.role, EXIT_WORKER + c.rank)
                return stop_all("%s (pid %d) exited with %s" % (c.name, c.proc.pid, describe_status(code)),
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
