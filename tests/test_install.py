"""The package, detectron2 and the compiled op import; a missing detectron2 gives a clear message."""
import os
import re
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


BLOCK_DETECTRON2 = textwrap.dedent(
    """
    import sys
    class Block:  # an environment without detectron2: its import is refused
        def find_spec(self, name, path=None, target=None):
            if name == "detectron2" or name.startswith("detectron2."):
                raise ImportError("No module named 'detectron2'")
    sys.meta_path.insert(0, Block())
    """
)


def _without_detectron2(code):
    return subprocess.run([sys.executable, "-c", BLOCK_DETECTRON2 + textwrap.dedent(code)], cwd=REPO,
                          capture_output=True, text=True)


def test_layers_and_op_work_without_detectron2():
    proc = _without_detectron2(
        """
        import torch
        import frn_det
        from frn_det.layers import FilterResponseNorm2d, TLU, frn, frn_reference, ops
        assert not frn_det.HAS_DETECTRON2 and "detectron2" not in sys.modules
        assert frn_det.FilterResponseNorm2d is FilterResponseNorm2d
        x = torch.randn(2, 3, 5, 5, requires_grad=True)
        layer = FilterResponseNorm2d(3, learned_eps=True)
        assert layer.impl == ("op" if ops.is_available() else "reference")
        out = TLU(3)(layer(x))
        out.sum().backward()
        torch.testing.assert_close(layer(x), frn_reference(x, layer.weight, layer.bias, layer.tau, 1e-6, layer.eps_l))
        print("ok", layer.impl)
        """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("ok")


def test_detectron2_parts_without_detectron2_raise_the_install_hint():
    proc = _without_detectron2(
        """
        import frn_det
        for attempt in (lambda: frn_det.add_frn_config, lambda: frn_det.apply_frn_placement,
                        lambda: __import__("frn_det.modeling"), lambda: __import__("frn_det.engine"),
                        lambda: __import__("frn_det.data")):
            try:
                attempt()
            except ImportError as e:
                print(e)
            else:
                raise SystemExit("no ImportError")
        """)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 5
    for what, line in zip(("frn_det.add_frn_config", "frn_det.apply_frn_placement", "frn_det.modeling",
                           "frn_det.engine", "frn_det.data"), lines):
        assert line.startswith(f"{what} needs detectron2"), line
        assert "make test" in line and "detectron2.git" in line


def _frn_det_modules():
    """{dotted name: file} of every module of the package (a package under its own name)."""
    modules = {}
    for root, _, files in os.walk(os.path.join(REPO, "frn_det")):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), REPO)[:-3].replace(os.sep, ".")
                modules[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, name)
    return modules


def _imports_of(module, path, modules):
    """The frn_det modules ``module`` imports at its top level (an import-time dependency)."""
    import ast

    package = module if path.endswith("__init__.py") else module.rpartition(".")[0]
    found = set()
    for node in ast.parse(open(path).read()).body:  # function-level imports run later: not import-time
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:  # `from pkg import submodule` depends on the submodule only
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    # A module's own parent packages are being imported already when it runs: not a dependency.
    return {m for m in found if m in modules and m != module and not module.startswith(m + ".")}


def test_no_import_cycles_inside_frn_det():
    modules = _frn_det_modules()
    graph = {m: _imports_of(m, p, modules) for m, p in modules.items()}
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            if state.get(d) == "open":
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, cycles
    assert ("frn_det.layers.filter_response_norm" in graph["frn_det.layers"]
            and "frn_det.layers.ops" in graph["frn_det.layers.filter_response_norm"])


def built_arch_list():
    """The TORCH_CUDA_ARCH_LIST the extension was built with: the bootstrap's stamp records it (a
    user's own list included); without a stamp, the bootstrap's default."""
    try:
        with open(os.path.join(sys.prefix, "frn_det_build.stamp")) as f:
            listed = re.search(r"archs=(\S+)", f.read()).group(1)
        if listed != "detected":
            return listed
    except (OSError, AttributeError):
        pass
    with open(os.path.join(REPO, "tools", "bootstrap_env.sh")) as f:
        return re.search(r"TORCH_CUDA_ARCH_LIST:-([^}]+)}", f.read()).group(1)


def archs_of(arch_list):
    """{"sass": [...], "ptx": [...]} (compute capability x 10) that TORCH_CUDA_ARCH_LIST ``arch_list`` asks for."""
    entries = [a.strip() for a in arch_list.replace(" ", ";").split(";") if a.strip()]
    sass = sorted(round(float(a.removesuffix("+PTX")) * 10) for a in entries)
    return {"sass": sass, "ptx": sorted(round(float(a.removesuffix("+PTX")) * 10) for a in entries if a.endswith("+PTX"))}


def test_cuda_build_runs_on_turing_to_hopper_and_newer_gpus():
    """Built without a visible GPU (CI, the bootstrap's default: 7.5;8.0;9.0+PTX), the extension holds
    SASS for exactly the architectures asked for and PTX for the newest, so it loads on users' GPUs,
    newer ones through the PTX; a build on a GPU machine targets that GPU (torch's detection) and is
    not checked here."""
    import torch

    from frn_det.layers import build_info

    if build_info.extension_path() is None:
        pytest.skip("frn_det._C is not built")
    archs = build_info.cuda_archs()
    if not archs["sass"] and not archs["ptx"]:
        pytest.skip("a CPU-only build (no CUDA toolkit)")
    if torch.cuda.is_available():
        pytest.skip("built on a GPU machine: torch targets the visible GPU")
    expected = archs_of(built_arch_list())
    assert archs == expected, f"the build holds {archs}, TORCH_CUDA_ARCH_LIST {built_arch_list()!r} asks for {expected}"
    assert archs["ptx"] == [max(archs["sass"])]
