"""The installed shape: a light core import and adapters only under fesmia_hooks.integrations."""

import subprocess
import sys
import zipfile


def test_core_import_leaves_frameworks_out():
    code = (
        "import sys, fesmia_hooks\n"
        "heavy = [m for m in ('lightning', 'pytorch_lightning', 'keras', 'tensorboard', "
        "'matplotlib', 'sklearn', 'tensorflow', 'opacus') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_wheel_installs_integrations_inside_the_package(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), "."],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("fesmia_hooks-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "fesmia_hooks/integrations/torch.py" in names
    assert "fesmia_hooks/integrations/lightning.py" in names
    assert "fesmia_hooks/py.typed" in names
    assert not any(n.startswith("integrations/") for n in names)
    assert not any(n.startswith(("tests/", "examples/", "benchmarks/")) for n in names)
