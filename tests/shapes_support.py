"""What the shape-model tests share: where the shipped model lives."""
from pathlib import Path

import pytest

SHIPPED = Path(__file__).resolve().parents[1] / "assets" / "unipixel-shapes"

needs_shipped = pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="assets/unipixel-shapes is not here")
