"""Workers for the Ray tests, importable on Ray's actors (tests/integration/test_ray.py puts the repository on
their PYTHONPATH)."""

from dataclasses import dataclass


@dataclass
class FailingOn:
    """A curation worker whose batch fails when it holds `record_id`: a run cut off midway, as a kill leaves it."""

    worker: object  # bimode.curate.pipeline.CurateWorker
    record_id: str

    def __call__(self):
        run_batch = self.worker()

        def run(records):
            if any(r.id == self.record_id for r in records):
                raise RuntimeError(f"cut off at {self.record_id}")
            return run_batch(records)

        return run


@dataclass
class SocketProbe:
    """A pool worker that answers each batch with the listening sockets it sees while its actor is alive (the
    actor's own servers included), of Ray's processes and the driver (`driver_pid`) only: under `make test`'s two
    workers the other worker's tests open sockets of their own meanwhile."""

    driver_pid: int

    def __call__(self):
        return lambda _: listening_sockets(owners=ray_processes() | {self.driver_pid})


def ray_processes() -> set[int]:
    """The processes whose command line names Ray (its GCS, raylet, dashboard, workers `ray::...`)."""
    import os

    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                command = open(f"/proc/{entry}/cmdline", "rb").read().replace(b"\0", b" ")
            except OSError:
                continue
            if b"ray" in command.lower():
                pids.add(int(entry))
    return pids


def _socket_inodes(pids: set[int]) -> set[str]:
    import os

    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[len("socket:["):-1])
        except OSError:  # the process ended meanwhile
            continue
    return inodes


def listening_sockets(owners: set[int] | None = None) -> set[tuple[str, int]]:
    """(address, port) of every listening TCP socket of this machine's network namespace, from /proc/net; with
    `owners`, only those some of these processes hold."""
    import ipaddress

    held = None if owners is None else _socket_inodes(owners)
    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state = fields[1], fields[3]
            if state != "0A" or (held is not None and fields[9] not in held):  # LISTEN, of the owners
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)
            # the kernel prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
                ip = ip.ipv4_mapped
            found.add((str(ip), int(port, 16)))
    return found


@dataclass
class KilledOn:
    """A pool worker whose actor process is killed (SIGKILL, as the kernel's OOM killer or a lost node ends it)
    when a batch holds `record_id`, once the run's log `after` holds a finished batch (the middle of the run, not
    its start): on the first attempt only when `marker` is given (that attempt creates the file, so the batch
    retried on the restarted actor runs), on every attempt when it is None."""

    worker: object  # a CurateWorker or an EvalWorker
    record_id: str
    after: str  # the command's log: batches.jsonl, samples.jsonl
    marker: str | None = None

    def __call__(self):
        import os
        import signal
        import time

        built = []  # the model loads at the first batch that is not killed: a restarted actor killed again is quick

        def run(payload):
            # a curation batch holds records; an eval batch (benchmark, record, modes) triples
            ids = [getattr(item, "id", None) or item[1].id for item in payload]
            if self.record_id in ids and (self.marker is None or not os.path.exists(self.marker)):
                for _ in range(600):  # the other actor's batch logged first (a minute at most)
                    if os.path.exists(self.after) and os.path.getsize(self.after):
                        break
                    time.sleep(0.1)
                if self.marker:
                    open(self.marker, "w").close()
                os.kill(os.getpid(), signal.SIGKILL)
            if not built:
                built.append(self.worker())
            return built[0](payload)

        return run
