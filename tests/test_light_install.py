"""The inference-only install (bench/light_install.py): a fresh venv with the core package of this
checkout has no torch, and its CLI, API and service read a rendered formula alike. Needs the
package index or pip's cache (scripts/setup.sh filled it); the timings are the bench's business."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_core_install_reads_with_cli_api_and_service_without_torch(tmp_path):
    out = subprocess.run([sys.executable, str(REPO / "bench" / "light_install.py"), "--repeats", "1",
                          "--keep", str(tmp_path / "light")],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert report["core"]["torch_importable"] is False
    assert report["same_latex_everywhere"], report
    assert report["cli_onnx_core_venv"]["latex"]
    assert not list((tmp_path / "light" / "venv").glob("lib/python*/site-packages/torch"))
