import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach a hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")  # vLLM would look for the machine's outward address (8.8.8.8 route)
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two workers (pytest-xdist), one per core: each keeps torch (and every process it starts)
    # to one thread: two torch jobs of two threads each on two cores slow each other several-fold (a test run
    # beside a demo went from 80 s to 9 min)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # a rendezvous port of each worker's own for TRL's colocated vLLM (which takes MASTER_PORT, else the first free
    # of 29500, 23456, ...: two workers' runs at once both took 29500, and one failed)
    if not os.environ.get("MASTER_PORT"):
        from tests.helpers.servers import free_port

        os.environ["MASTER_PORT"] = str(free_port())

KINDS = ("unit", "distributed", "integration")  # the folders under tests/, each a marker of the same name


def pytest_collection_modifyitems(items):
    items[:] = trained_model_first_then_what_needs_none(items)
    for item in items:
        kind = item.path.parent.name
        if kind in KINDS:
            item.add_marker(kind)
        # the trained tiny model is trained again (about a minute) whenever bimode's code changed: not inner-loop
        if "trained_tiny" in getattr(item, "fixturenames", ()):
            item.add_marker("slow")


def trained_model_first_then_what_needs_none(items):
    """The files in collection order, except: the first file that needs the trained tiny model leads, the files that
    need none follow, the other files that need it come last. Under `make test`'s two workers one trains the model
    (about 100 s on one core) while the other runs tests that need no model, instead of both waiting for it."""
    files: dict = {}
    for item in items:
        files.setdefault(item.path, []).append(item)
    needs = [f for f, its in files.items() if any("trained_tiny" in getattr(i, "fixturenames", ()) for i in its)]
    order = needs[:1] + [f for f in files if f not in needs] + needs[1:]
    return [item for f in order for item in files[f]]


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


@pytest.fixture(scope="session")
def trained_families_file(tmp_path_factory):
    """96 training records of the trained tiny model's families and levels (the BPO and LoRA tests' data)."""
    from bimode.data import synthetic
    from bimode.data.records import write_records
    from tests.helpers.trained import TRAINED_FAMILIES, TRAINED_MAX_LEVEL

    records = [s.to_record() for s in synthetic.generate(96, seed=5, families=TRAINED_FAMILIES,
                                                         max_level=TRAINED_MAX_LEVEL)]
    return write_records(records, tmp_path_factory.mktemp("trained_families") / "train.jsonl")


@pytest.fixture(scope="session")
def trained_tiny(tmp_path_factory, request):
    """The tiny model after a short bi-mode SFT on two families (about 100 s, on one thread).

    Shared by the tests that need a model whose outputs mean something: forced-mode generation, image
    dependence, the engine against plain generation. Kept in pytest's cache under a digest of bimode's files and
    the torch and transformers versions that trained it. `make test`'s second run (the internals tests at the
    lower end of the transformers range) sets BIMODE_TESTS_ANY_TRAINED_VERSION=1 and takes the model the first
    run trained with the same code instead of training it again. BIMODE_TESTS_TRAINED_TINY=DIR takes DIR
    instead (a model this fixture trained before): for an inner loop that edits bimode's code, never for CI.
    """
    from pathlib import Path

    from tests.helpers.trained import cached_trained_tiny, train_tiny

    given = os.environ.get("BIMODE_TESTS_TRAINED_TINY")  # a model trained before, for an inner loop that edits code
    if given:
        if not (Path(given) / "config.json").exists():
            raise FileNotFoundError(f"BIMODE_TESTS_TRAINED_TINY={given}: no config.json there")
        return Path(given)
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    if cache is None:
        return train_tiny(tmp_path_factory.mktemp("trained"))
    return cached_trained_tiny(cache.mkdir, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="session")
def engine(trained_tiny):
    """The transformers engine over the trained tiny model, shared by the eval and curation tests."""
    import torch

    from bimode.generation.engine import TransformersEngine
    from bimode.models import load_model

    model, processor = load_model(trained_tiny, dtype=torch.float32)
    return TransformersEngine(model, processor)

