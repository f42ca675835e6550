"""The package, detectron2 and the compiled op import; a missing detectron2 gives a clear message."""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_package_and_detectron2_import():
    import detectron2
    import frn_det

    assert hasattr(frn_det, "FilterResponseNorm2d")
    assert detectron2.__version__


def test_compiled_extension_imports_and_registers_ops():
    import torch
    from frn_det import _C  # noqa: F401
    from frn_det.layers import ops

    assert ops.is_available(), ops.load_error()
    assert hasattr(torch.ops.frn_det, "frn")


def test_missing_detectron2_gives_install_hint():
    # Simulate an environment without detectron2 by refusing its import.
    code = textwrap.dedent(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "detectron2" or name.startswith("detectron2."):
                    raise ImportError("No module named 'detectron2'")
        sys.meta_path.insert(0, Block())
        import frn_det
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "frn_det needs detectron2" in proc.stderr
    assert "make test" in proc.stderr and "detectron2.git" in proc.stderr
