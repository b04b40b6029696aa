"""How the fused ops are registered and picked: one definition each, device kernels from
the backends, ``backend=`` as an override that never falls back silently."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from op_samples import dispatching_to
from owlore_kernels import ops
from owlore_kernels.ops.adamw import adamw_foreach_
from owlore_kernels.ops.back_project_update import back_project_update_, back_project_update_foreach_
from owlore_kernels.ops.outlier_count import outlier_count
from owlore_kernels.ops.project_adam import project_adam_, project_adam_foreach_

CALLS = {
    "outlier_count": lambda backend: outlier_count(torch.randn(4, 6), threshold=1.0, backend=backend),
    "project_adam": lambda backend: project_adam_(
        torch.randn(4, 6), torch.randn(4, 2), torch.zeros(2, 6), torch.zeros(2, 6), side="left", beta1=0.9,
        beta2=0.99, eps=1e-8, bias_correction1=1.0, bias_correction2=1.0, backend=backend),
    "back_project_update": lambda backend: back_project_update_(
        torch.randn(4, 6), torch.randn(4, 2), torch.randn(2, 6), side="left", beta=1.0, alpha=-0.1, backend=backend),
    "project_adam_foreach": lambda backend: project_adam_foreach_(
        [torch.randn(4, 6)], [torch.randn(4, 2)], [torch.zeros(2, 6)], [torch.zeros(2, 6)], [torch.zeros(2, 6)],
        side="left", beta1=0.9, beta2=0.99, eps=1e-8, bias_corrections=[(1.0, 1.0)], backend=backend),
    "back_project_update_foreach": lambda backend: back_project_update_foreach_(
        [torch.randn(4, 6)], [torch.randn(4, 2)], [torch.randn(2, 6)], side="left", coefficients=[(1.0, -0.1)],
        backend=backend),
    "adamw_foreach": lambda backend: adamw_foreach_(
        [torch.randn(4, 6)], [torch.randn(4, 6)], [torch.zeros(4, 6)], [torch.zeros(4, 6)], variant="galore",
        beta1=0.9, beta2=0.99, eps=1e-8, coefficients=[(-0.1, 0.0)], backend=backend),
}


def test_every_op_is_defined_in_torch_ops():
    for op in ops.OPS:
        schema = str(ops.op_overload(op)._schema)
        assert schema.startswith(f"owlore::{ops.OP_NAMES[op]}("), schema
        assert torch._C._dispatch_has_kernel_for_dispatch_key(ops.qualname(op), "CompositeExplicitAutograd")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(ops.qualname(op), "Meta")  # the fake


def test_backend_report_names_every_op():
    report = ops.backend_report()
    for device in ("cpu", "cuda"):
        assert set(report[device]) == set(ops.OPS)
    want_cpp = "cpp" not in report["unavailable"] or os.environ.get("OWLORE_REQUIRE_EXT") == "1"
    assert report["cpu"] == {op: "cpp" if want_cpp else "torch" for op in ops.OPS}, report
    if "triton" not in report["unavailable"]:
        # every op the Triton backend implements is the one the dispatcher runs on CUDA
        assert report["cuda"] == {op: "triton" if "triton" in ops._REGISTRY[op] else "torch" for op in ops.OPS}


def test_triton_backend_loads_where_triton_is_installed():
    """A Triton kernel module that fails to import only removes its backend, and its tests
    then skip: here, where triton is installed (and the interpreter is on without a GPU), that
    failure must fail a test instead of shrinking the report."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    assert torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
    assert "triton" not in ops._UNAVAILABLE, ops._UNAVAILABLE["triton"]
    assert all("triton" in ops._REGISTRY[op] for op in ("outlier_count", "project_adam", "back_project_update"))


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"backend must be one of \('triton', 'cpp', 'torch'\) or None, got 'cuda'"):
        CALLS["outlier_count"]("cuda")


@pytest.mark.parametrize("op", ops.OPS)
def test_forced_missing_backend_raises_naming_it_and_why(op, monkeypatch):
    monkeypatch.setitem(ops._REGISTRY, op, {"torch": ops._REGISTRY[op]["torch"]})
    monkeypatch.setitem(ops._UNAVAILABLE, "cpp", "C++ extension not loaded (ImportError: test)")
    with pytest.raises(RuntimeError, match=rf"backend='cpp' was forced for op '{op}' but is not available: "
                                           r"C\+\+ extension not loaded \(ImportError: test\)"):
        CALLS[op]("cpp")


@pytest.mark.parametrize("op", ops.OPS)
def test_forced_triton_on_cpu_needs_the_interpreter(op, monkeypatch):
    if "triton" not in ops._REGISTRY[op]:
        pytest.skip(ops._UNAVAILABLE.get("triton", "triton not registered"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=rf"backend='triton' was forced for op '{op}' but cannot run on cpu"):
        CALLS[op]("triton")


def test_dispatching_to_restores_the_natural_kernel():
    op = "back_project_update"
    natural = ops._dispatched_backend(op, "cpu")
    w = torch.zeros(4, 6)
    calls = []
    ops._REGISTRY[op]["spy"] = lambda *a, **k: calls.append(a)
    try:
        with dispatching_to(op, "spy", torch.device("cpu")):
            back_project_update_(w, torch.randn(4, 2), torch.randn(2, 6), side="left", beta=1.0, alpha=1.0)
    finally:
        del ops._REGISTRY[op]["spy"]
    assert len(calls) == 1 and torch.equal(w, torch.zeros(4, 6))  # the spy ran, not a kernel
    back_project_update_(w, torch.ones(4, 2), torch.ones(2, 6), side="left", beta=1.0, alpha=1.0)
    assert torch.equal(w, torch.full((4, 6), 2.0)) and ops._dispatched_backend(op, "cpu") == natural


def test_ops_exist_and_run_without_the_extension():
    """The schemas are defined in Python: with the C++ extension unimportable the ops are
    still there, the dispatcher runs the reference, and the report says why."""
    code = (
        "import sys; sys.modules['owlore_kernels._C'] = None\n"
        "import torch\n"
        "from owlore_kernels import ops\n"
        "from owlore_kernels.ops.outlier_count import outlier_count\n"
        "r = ops.backend_report()\n"
        "assert r['cpu'] == {op: 'torch' for op in ops.OPS}, r\n"
        "assert 'C++ extension not loaded' in r['unavailable']['cpp'], r\n"
        "w = torch.tensor([[1.0, -2.0], [3.0, 10.0]])\n"
        "assert outlier_count(w, threshold=1.5) == (4.0, 1)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_forced_cpu_backends_compile_fullgraph(backend):
    """A forced backend that the dispatcher runs anyway ("cpp" on CPU) is called through
    the op, and the reference is plain torch code: both trace without a graph break."""
    if backend not in ops._REGISTRY["project_adam"]:
        pytest.skip(ops._UNAVAILABLE.get(backend, "not registered"))

    def step(weight, grad, proj, exp_avg, exp_avg_sq):
        norm = project_adam_(grad, proj, exp_avg, exp_avg_sq, side="left", beta1=0.9, beta2=0.99, eps=1e-8,
                             bias_correction1=0.5, bias_correction2=0.5, backend=backend)
        back_project_update_(weight, proj, norm, side="left", beta=0.99, alpha=-0.1, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    args = [torch.randn(30, 50), torch.randn(30, 50), torch.randn(30, 4), torch.zeros(4, 50), torch.zeros(4, 50)]
    eager = [a.clone() for a in args]
    compiled(*args)
    step(*eager)
    for a, e in zip(args, eager):
        torch.testing.assert_close(a, e)  # same kernels, same inputs: equal up to aot_eager's own ops


def test_interpreter_problem_names_the_versions_that_cannot_work_together():
    """Triton < 3.7's interpreter cannot run the GEMM kernels' loops under numpy >= 2.4: the triton
    backend is then reported unavailable with this reason instead of failing inside each launch."""
    from owlore_kernels.kernels._common import interpreter_problem

    why = interpreter_problem("3.6.0", "2.4.6")
    assert "triton 3.6.0" in why and "numpy 2.4.6" in why and "triton >= 3.7 or numpy < 2.4" in why
    assert interpreter_problem("3.6.0", "2.3.5") is None
    assert interpreter_problem("3.7.0", "2.4.0") is None
    assert interpreter_problem("3.10.1", "2.5.0rc1") is None
    assert interpreter_problem("2.3.1", "2.10.0") is not None
