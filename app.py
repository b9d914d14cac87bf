"""UniPixel playground: the Hugging Face Spaces entry point (`python app.py --help`)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Sequence

try:  # on ZeroGPU Spaces `spaces` must be imported before torch touches CUDA
    import spaces  # noqa: F401
except ImportError:
    spaces = None

from demo.layout import ASSETS, SESSION_TTL

MAX_FILE_SIZE = "200mb"  # the media loader's own limit (unipixel.media.DEFAULT_MAX_FILE_BYTES)
QUEUE_SIZE = 64  # requests waiting app-wide; past it a client is told the queue is full
log = logging.getLogger("unipixel.app")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    from unipixel.hub import DEFAULT_MODEL

    parser = argparse.ArgumentParser(description="UniPixel playground (Gradio).")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"hub id or local folder (default {DEFAULT_MODEL}; 'offline-tiny' for the offline model)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, mps or cpu (default: the best available)")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                        help="weights dtype (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--host", default=None, help="address to listen on, e.g. 0.0.0.0 (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default 7860, or the next free one)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--results-dir", default="runs",
                        help="the Evaluate tab opens batch runs (python -m unipixel batch) below this folder (default ./runs)")
    parser.add_argument("--cache-gb", type=float, default=None,
                        help="memory for the features all sessions keep (default: a quarter of the GPU, 4 on CPU); "
                             "past it the least recently used sessions recompute theirs")
    parser.add_argument("--session-ttl", type=float, default=SESSION_TTL / 60,
                        help=f"minutes after its last action that a session is dropped with its media, objects and "
                             f"files (default {SESSION_TTL // 60:g})")
    parser.add_argument("--queue-size", type=int, default=QUEUE_SIZE,
                        help=f"requests that may wait app-wide (default {QUEUE_SIZE})")
    return parser.parse_args(argv)


def create_demo(model_name: str | None = None, device: str | None = None, dtype: str | None = None,
                cache_gb: float | None = None, session_ttl_minutes: float = SESSION_TTL / 60,
                results_dir: str | None = None):
    """Resolve and load the model (the offline model when the hub is out of reach), build the UI."""
    import unipixel
    from demo import build_demo
    from unipixel.hub import resolve_model

    resolved = resolve_model(model_name)
    if resolved.offline:
        log.warning("Using the offline model: %s", resolved.reason or "requested")
    model, processor = unipixel.load_model(resolved.path, device=device, dtype=dtype)
    shown_name = "offline model" if resolved.offline else (model_name or resolved.path)
    return build_demo(model, processor, model_name=shown_name, offline=resolved.offline, device=model.device,
                      dtype=model.dtype, offline_reason=resolved.reason,
                      cache_bytes=None if cache_gb is None else int(cache_gb * 1024**3),
                      session_ttl=session_ttl_minutes * 60, results_dir=results_dir)


def launch(demo, *, host: str | None = None, port: int | None = None, share: bool = False,
           queue_size: int = QUEUE_SIZE, **kwargs):
    """Queue (bounded) and serve; returns what `Blocks.launch` returns."""
    return demo.queue(default_concurrency_limit=1, max_size=queue_size).launch(
        server_name=host,
        server_port=port,
        share=share,
        max_file_size=MAX_FILE_SIZE,
        allowed_paths=[str(ASSETS)],  # the examples, wherever the app is started from
        **kwargs,
    )


def exit_on_signals(demo) -> None:
    """SIGTERM (how containers and Spaces stop an app) and SIGINT close the server and exit normally,
    so that the atexit cleanup removes every session folder with users' media, masks and banks."""

    def stop(signum, _frame):
        log.info("%s: closing", signal.Signals(signum).name)
        demo.close()
        sys.exit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    demo = create_demo(args.model, args.device, args.dtype, args.cache_gb, args.session_ttl, args.results_dir)
    exit_on_signals(demo)
    launch(demo, host=args.host, port=args.port, share=args.share, queue_size=args.queue_size)


if __name__ == "__main__":
    main()
