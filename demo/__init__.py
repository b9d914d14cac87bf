"""The UniPixel playground: a Gradio UI over `unipixel.session` (no model logic here)."""
from .layout import build_demo

__all__ = ["build_demo"]
