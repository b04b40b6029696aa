"""The reference ops themselves: against plain expressions, and inputs left untouched."""
import numpy as np
import pytest
import torch

from owlore_kernels.ops import backend_report, resolve
from owlore_kernels.ops.back_project_update import back_project_update_
from owlore_kernels.ops.outlier_count import outlier_count
from owlore_kernels.ops.project_adam import project_adam


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_outlier_count_reference_matches_numpy_and_leaves_input(dtype):
    ws = [torch.distributions.StudentT(3.0).sample((37, 53)).to(dtype), torch.randn(11, 29).to(dtype)]
    scales = [torch.rand(53) + 0.5, None]
    before = [w.clone() for w in ws]
    mean, count = outlier_count(ws, 4.0, scales, backend="torch")
    assert all(torch.equal(w, b) for w, b in zip(ws, before))
    scores = np.concatenate([
        (np.abs(ws[0].float().numpy()) * scales[0].numpy()).ravel(), np.abs(ws[1].float().numpy()).ravel()])
    assert mean == pytest.approx(scores.mean(), rel=1e-6)
    assert count == int((scores > 4.0 * scores.mean()).sum())


def test_reference_ops_match_plain_math():
    g, p = torch.randn(30, 50), torch.linalg.qr(torch.randn(30, 4)).Q
    m, v = torch.zeros(4, 50), torch.zeros(4, 50)
    n = project_adam(g, p, m, v, side="left", beta1=0.9, beta2=0.99, eps=1e-8, step=1, backend="torch")
    r = p.t() @ g
    torch.testing.assert_close(m, 0.1 * r)
    torch.testing.assert_close(n, (0.1 * r / 0.1) / ((0.01 * r * r / 0.01).sqrt() + 1e-8))
    w = torch.randn(30, 50)
    expect = w * (1 - 0.1 * 0.01) - 0.1 * 0.5 * (p @ n)
    back_project_update_(w, p, n, side="left", lr=0.1, weight_decay=0.01, scale=0.5, backend="torch")
    torch.testing.assert_close(w, expect)


def test_bad_op_arguments():
    g, p = torch.randn(30, 50), torch.randn(30, 4)
    m = torch.zeros(4, 50)
    with pytest.raises(ValueError, match="side"):
        project_adam(g, p, m, m.clone(), side="up", beta1=0.9, beta2=0.9, eps=1e-8, step=1)
    with pytest.raises(ValueError, match="step"):
        project_adam(g, p, m, m.clone(), side="left", beta1=0.9, beta2=0.9, eps=1e-8, step=0)
    with pytest.raises(ValueError, match="side='right'"):
        back_project_update_(torch.randn(30, 50), p, m, side="right", lr=1, weight_decay=0, scale=1)
    with pytest.raises(ValueError, match="threshold"):
        outlier_count(g, -1.0)
    with pytest.raises(ValueError, match="col_scales"):
        outlier_count(g, 1.0, [torch.ones(49)])
    with pytest.raises(ValueError, match="backend"):
        resolve("outlier_count", torch.device("cpu"), "cuda")


def test_backend_report_names_every_op():
    report = backend_report()
    for device in ("cpu", "cuda"):
        assert set(report[device]) == {"outlier_count", "project_adam", "back_project_update"}
    assert report["cpu"]["outlier_count"] in ("cpp", "torch")
