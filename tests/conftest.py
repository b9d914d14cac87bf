"""Shared fixtures: the tiny offline checkpoint, built once and cached under the pytest cache dir."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import contextlib  # noqa: E402
import socket  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY_SEED = 0


@pytest.fixture(scope="session")
def tiny_checkpoint(request):
    """Path of the tiny checkpoint (published layout), rebuilt when the cache is missing."""
    from unipixel.model.tiny import build_tiny_checkpoint

    path = request.config.cache.mkdir("unipixel-tiny") / f"seed{TINY_SEED}-published-layout"
    if not (path / "config.json").exists():
        build_tiny_checkpoint(path, seed=TINY_SEED)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """(model, processor) loaded through the public `load_model`."""
    from unipixel import load_model

    return load_model(str(tiny_checkpoint), device="cpu")


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def free_port():
    """A function returning a free loopback port for a server under test."""

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def serve(free_port):
    """`with serve(demo) as url:` the demo launched in this process on a free port, closed after."""
    import app as app_module

    @contextlib.contextmanager
    def launched(demo):
        port = free_port()
        app_module.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
        try:
            yield f"http://127.0.0.1:{port}/"
        finally:
            demo.close()

    return launched


@pytest.fixture(scope="session")
def tiny_playground(tiny_model, serve):
    """`with tiny_playground(**build_demo_kwargs) as url:` the playground on the tiny offline model."""
    from demo import build_demo

    model, processor = tiny_model

    def playground(**kwargs):
        return serve(build_demo(model, processor, model_name="offline tiny model", offline=True,
                                device=model.device, dtype=model.dtype, **kwargs))

    return playground
