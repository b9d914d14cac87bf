"""Many users at once against the real server (bench/load.py): every call completes, no session sees
another's objects or chat, and idle sessions give their folders and memory back."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RSS_MARGIN_MB = 400  # first-use growth (thread pools, Gradio caches, allocator arenas) that stays: 80-170 MB here


@pytest.mark.slow
def test_eight_clients_in_parallel(tmp_path):
    out = tmp_path / "load.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "load.py"), "--clients", "8", "--ttl", "10",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    print(run.stdout)
    result = json.loads(out.read_text())
    users = result["users"]
    assert [u.get("error") for u in users] == [None] * 8
    assert all(u["own_objects_only"] and u["own_chat_only"] for u in users)
    assert result["session_dirs"] == {"after_load": 8, "after_ttl": 0}
    rss = result["rss_mb"]
    assert rss["after"] < rss["loaded"] and rss["after"] - rss["idle"] < RSS_MARGIN_MB, rss
