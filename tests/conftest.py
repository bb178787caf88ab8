import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

KINDS = ("unit", "distributed", "integration")  # the folders under tests/, each a marker of the same name


def pytest_collection_modifyitems(items):
    for item in items:
        kind = item.path.parent.name
        if kind in KINDS:
            item.add_marker(kind)
        # the trained tiny model is trained again (about a minute) whenever bimode's code changed: not inner-loop
        if "trained_tiny" in getattr(item, "fixturenames", ()):
            item.add_marker("slow")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The embedded tiny model, built once per test session and saved like `bimode tiny` does."""
    from bimode.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_processor):
    return tiny_processor.tokenizer


TRAINED_FAMILIES = ("count", "shell")
TRAINED_MAX_LEVEL = 3


@pytest.fixture(scope="session")
def trained_families_file(tmp_path_factory):
    """96 training records of the trained tiny model's families and levels (the BPO and LoRA tests' data)."""
    from bimode.data import synthetic
    from bimode.data.records import write_records

    records = [s.to_record() for s in synthetic.generate(96, seed=5, families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    return write_records(records, tmp_path_factory.mktemp("trained_families") / "train.jsonl")


def _source_digest() -> str:
    """A digest of bimode's package files (code, chat template, prompts) and this file: what a trained fixture
    depends on besides the libraries."""
    import hashlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = [p for p in (root / "src" / "bimode").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    digest = hashlib.sha256()
    for path in sorted(files) + [Path(__file__).resolve()]:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _library_versions() -> str:
    import torch
    import transformers

    return f"torch{torch.__version__}-transformers{transformers.__version__}".replace("+", "_")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, request):
    """The tiny model after a short bi-mode SFT on two families (about 75 s on 2 cores).

    Shared by the tests that need a model whose outputs mean something: forced-mode generation, image
    dependence, the engine against plain generation. Kept in pytest's cache under a digest of bimode's files and
    the torch and transformers versions that trained it. `make test`'s second run (the internals tests at the
    lower end of the transformers range) sets BIMODE_TESTS_ANY_TRAINED_VERSION=1 and takes the model the first
    run trained with the same code instead of training it again. BIMODE_TESTS_TRAINED_TINY=DIR takes DIR
    instead (a model this fixture trained before): for an inner loop that edits bimode's code, never for CI.
    """
    import shutil
    from pathlib import Path

    given = os.environ.get("BIMODE_TESTS_TRAINED_TINY")  # a model trained before, for an inner loop that edits code
    if given:
        if not (Path(given) / "config.json").exists():
            raise FileNotFoundError(f"BIMODE_TESTS_TRAINED_TINY={given}: no config.json there")
        return Path(given)
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is None:
        return _train_tiny(tmp_path_factory.mktemp("trained"))
    code = _source_digest()
    cached = cache.mkdir(f"trained_tiny-{code}-{_library_versions()}") / "sft"
    if (cached / "config.json").exists():
        return cached
    if os.environ.get("BIMODE_TESTS_ANY_TRAINED_VERSION") == "1":
        others = sorted(cached.parent.parent.glob(f"trained_tiny-{code}-*/sft/config.json"),
                        key=lambda p: p.stat().st_mtime)
        if others:
            return others[-1].parent
    for old in cached.parent.parent.glob("trained_tiny-*"):  # models of other code: never used again
        if not old.name.startswith(f"trained_tiny-{code}-"):
            shutil.rmtree(old, ignore_errors=True)
    out = _train_tiny(tmp_path_factory.mktemp("trained"))
    staging = cached.with_name(f"sft.partial-{os.getpid()}")
    shutil.copytree(out, staging)
    staging.rename(cached)  # whole or absent: a run cut off midway leaves no half model behind
    return cached


def _train_tiny(base_dir):
    import torch

    from bimode.data import synthetic
    from bimode.models import load_model
    from bimode.models.tiny import build_tiny
    from bimode.train.sft_warmup import SimpleSFTConfig, train_sft

    path = build_tiny(base_dir / "base")
    model, processor = load_model(path, dtype=torch.float32)
    records = [s.to_record() for s in synthetic.generate(1500, seed=11, families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    # Measured: 400-500 steps of 16 give 0.79-0.83 think-mode accuracy on held-out samples (chance ~0.3).
    train_sft(model, processor, records, cfg=SimpleSFTConfig(steps=450, batch_size=16, progress=False))
    out = path.parent / "sft"
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def free_port() -> int:
    """A free port on the loopback interface."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(base: str, tries: int = 100, process=None) -> bool:
    """Poll base/health every 0.1 s until it answers 200 (True), `tries` run out or `process` ends (False)."""
    import time

    import httpx

    for _ in range(tries):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return True
        except httpx.TransportError:
            time.sleep(0.1)
        if process is not None and process.poll() is not None:
            return False
    return False


def serve_in_thread(app):
    """Run an ASGI app with uvicorn on a free loopback port; returns (base URL, stop function)."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until_healthy(base)

    def stop():
        server.should_exit = True
        thread.join(timeout=10)

    return base, stop


@pytest.fixture(scope="session")
def engine(trained_tiny):
    """The transformers engine over the trained tiny model, shared by the eval and curation tests."""
    import torch

    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model

    model, processor = load_model(trained_tiny, dtype=torch.float32)
    return TransformersEngine(model, processor)


def _launch_command(script: str, args: tuple, config: str, port: int, *accelerate_args: str):
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    target = script.split() if script.startswith("-m ") else [str(root / "tests" / "distributed" / script)]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(root / f"configs/accelerate/{config}.yaml"), "--main_process_port", str(port), *accelerate_args,
               *target, *args]
    return command, env, root


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
    import subprocess

    # a port of its own: a launch must never meet another launch's rendezvous
    command, env, root = _launch_command(script, args, config, free_port())
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=root,
                              timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (exc.stdout, exc.stderr))
        _check_launch(script, None, out, err, timeout)
    _check_launch(script, done.returncode, done.stdout, done.stderr, timeout)


def launch_two_machines(script: str, *args: str, timeout: int = 300, config: str = "cpu2_zero2") -> None:
    """The same 2 processes as two machines of one process each: two `accelerate launch` commands with
    `--num_machines 2 --machine_rank 0|1 --main_process_ip 127.0.0.1` (what each node of a cluster runs), started
    together; DeepSpeed's `standard` multi-node launcher (torchrun per machine; its default, pdsh, logs in over ssh)."""
    import subprocess

    port = free_port()
    procs = []
    for rank in (0, 1):
        command, env, root = _launch_command(
            script, args, config, port, "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(rank),
            "--main_process_ip", "127.0.0.1", "--deepspeed_multinode_launcher", "standard")
        procs.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=root))
    import time

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


def reference_greedy(model, processor, messages, images, mode: str, max_new_tokens: int, suppress) -> list[int]:
    """What plain transformers generates, greedy, for one prompt rendered in `mode`: the reference the engine's
    completions are compared with (its banned media tokens suppressed too); ids up to end-of-turn."""
    import torch

    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, thinking_mode=mode)
    inputs = processor(images=images or None, text=[text], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             suppress_tokens=suppress)[0, inputs["input_ids"].shape[1]:].tolist()
    eos = processor.tokenizer.eos_token_id
    return out[: out.index(eos)] if eos in out else out
