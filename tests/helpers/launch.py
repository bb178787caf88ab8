"""Two processes under `accelerate launch` (tests/distributed): on one machine, or as two machines of one process."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def _launch_command(script: str, args: tuple, config: str, port: int, *accelerate_args: str):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    target = script.split() if script.startswith("-m ") else [str(ROOT / "tests" / "distributed" / script)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / f"configs/accelerate/{config}.yaml"), "--main_process_port", str(port), *accelerate_args,
               *target, *args]
    return command, env


def _check_launch(name: str, returncode: int | None, out: str, err: str, timeout: int) -> None:
    """The children's output is the only trace of why a launch failed or hung: its end goes into the report."""
    if returncode is None:
        raise AssertionError(f"{name} still running after {timeout} s\n--- stdout ---\n{out[-4000:]}"
                             f"\n--- stderr ---\n{err[-8000:]}")
    assert returncode == 0, f"{name} exited {returncode}\n--- stdout ---\n{out[-4000:]}\n--- stderr ---\n{err[-8000:]}"


def launch_two_cpu_processes(script: str, *args: str, timeout: int = 300, config: str = "cpu2") -> None:
    """Run tests/distributed/<script> (a rank worker's .py name) or a module (`-m bimode.cli`) under `accelerate launch` with
    configs/accelerate/<config>.yaml (2 processes, gloo: cpu2 is DDP, cpu2_zero2 / cpu2_zero3 / cpu2_fsdp2
    the sharded engines)."""
    # a port of its own: a launch must never meet another launch's rendezvous
    command, env = _launch_command(script, args, config, free_port())
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr))
        _check_launch(script, None, out, err, timeout)
    _check_launch(script, done.returncode, done.stdout, done.stderr, timeout)


def launch_two_machines(script: str, *args: str, timeout: int = 300, config: str = "cpu2_zero2") -> None:
    """The same 2 processes as two machines of one process each: two `accelerate launch` commands with
    `--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1` (what each node of a cluster runs), started
    together; DeepSpeed's `standard` multi-node launcher (torchrun per machine; its default, pdsh, logs in over ssh)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        command, env = _launch_command(
            script, args, config, port, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--deepspeed_multinode_launcher", "standard")
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=ROOT))
    outputs, deadline = [], time.monotonic() + timeout
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append((proc.returncode, out, err))
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            outputs.append((None, out, err))  # reported as still running, not as killed
    for rank, (code, out, err) in enumerate(outputs):
        _check_launch(f"{script} (machine {rank})", code, out, err, timeout)
