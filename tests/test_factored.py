"""Factored per-element state: dense values, re-indexing, composition, round trip."""

import tempfile

import pytest
import torch

from growlm.growth.factored import Factored, pack, unpack


def test_mul_and_max_dense_values():
    r, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 4.0])
    f = Factored.axis((3, 2), 0, r, "mul").combine(Factored.axis((3, 2), 1, c, "mul"))
    torch.testing.assert_close(f.dense(), r[:, None] * c[None, :], rtol=0, atol=0)
    g = Factored.axis((3, 2), 0, torch.tensor([0, 2, 1]), "max").combine(Factored.axis((3, 2), 1, torch.tensor([1, 0]), "max"))
    assert g.dense().tolist() == [[1, 0], [2, 2], [1, 1]]
    assert f.nbytes() == 5 * 4  # two vectors, not a 3 x 2 tensor


def test_gather_matches_dense_gather_with_fill():
    torch.manual_seed(0)
    r, c = torch.rand(4), torch.rand(3)
    f = Factored.axis((4, 3), 0, r, "mul").combine(Factored.axis((4, 3), 1, c, "mul"))
    ri, ci = torch.tensor([0, 1, 2, 3, 0, 1, -1]), torch.tensor([2, -1, 0])
    got = f.gather((ri, ci), fill=1.0).dense()
    # fresh positions take the fill (1) in their axis factor; the other axis factor still applies
    rp = torch.where(ri < 0, 1.0, r[ri.clamp(min=0)])
    cp = torch.where(ci < 0, 1.0, c[ci.clamp(min=0)])
    want = rp[:, None] * cp[None, :]
    assert torch.equal(want[:6, [0, 2]], f.dense()[ri[:6]][:, ci[[0, 2]]])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gather_on_a_constant_adds_an_axis_factor():
    g = Factored.constant((2, 3), 0, "max", torch.int32).gather((torch.tensor([0, 1, -1]), None), fill=5)
    assert g.dense().tolist() == [[0, 0, 0], [0, 0, 0], [5, 5, 5]]


def test_from_dense_compresses_constants_and_round_trips():
    assert Factored.from_dense(torch.full((5, 7), 3.0), "mul").nbytes() == 4
    t = torch.arange(6.0).reshape(2, 3)
    f = Factored.from_dense(t, "mul").combine(Factored.axis((2, 3), 1, torch.tensor([1.0, 2.0, 0.5]), "mul"))
    back = Factored.from_tensors(f.to_tensors("x"), "x", "mul")
    torch.testing.assert_close(back.dense(), t * torch.tensor([1.0, 2.0, 0.5]), rtol=0, atol=0)


def test_gather_fills_only_the_first_factor_along_a_dim():
    """Two factors along the same dim: the fresh position is fill x the other dims' factors, not x a stale value."""
    f = Factored((3, 2), "mul", [torch.tensor([[2.0], [3.0], [5.0]]), torch.tensor([[7.0, 1.0], [1.0, 11.0], [1.0, 1.0]])])
    ix = torch.tensor([2, -1, 0])
    got = f.gather((ix, None), fill=1.0).dense()
    want = f.dense()[ix.clamp(min=0)]
    want[1] = 1.0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_counts_and_extrema_match_dense_without_materialising():
    torch.manual_seed(1)
    g = Factored.constant((5, 4), 1, "max", torch.int32)
    g = g.combine(Factored.axis((5, 4), 0, torch.tensor([0, 2, 0, 3, 2], dtype=torch.int32), "max"))
    g = g.combine(Factored.axis((5, 4), 1, torch.tensor([0, 0, 4, 2], dtype=torch.int32), "max"))
    u, c = torch.unique(g.dense(), return_counts=True)
    assert g.counts() == dict(zip(u.tolist(), c.tolist()))
    assert g.extrema() == (float(g.dense().min()), float(g.dense().max()))
    s = Factored.axis((5, 4), 0, torch.rand(5) + 0.1, "mul").combine(Factored.axis((5, 4), 1, torch.rand(4) + 0.1, "mul"))
    lo, hi = s.extrema()
    assert lo == pytest.approx(float(s.dense().min()), rel=1e-6) and hi == pytest.approx(float(s.dense().max()), rel=1e-6)
    full = Factored.from_dense(torch.tensor([[1, 2], [2, 2]], dtype=torch.int32), "max")  # overlapping dims: dense path
    assert full.combine(Factored.axis((2, 2), 0, torch.tensor([3, 0], dtype=torch.int32), "max")).counts() == {2: 2, 3: 2}


def test_combine_keeps_one_factor_per_axis():
    f = Factored.axis((4, 3), 0, torch.rand(4), "mul")
    for _ in range(5):
        f = f.combine(Factored.axis((4, 3), 0, torch.rand(4), "mul")).combine(Factored.constant((4, 3), 2.0, "mul"))
    assert sorted(tuple(x.shape) for x in f.factors) == [(1, 1), (4, 1)]


def test_pack_unpack_round_trip_with_shared_factors():
    from safetensors.torch import load_file, save_file

    v = torch.tensor([1.0, 0.5])
    a = Factored.axis((2, 3), 0, v, "mul")
    state = {"x.weight": a, "y.weight": Factored((2, 3), "mul", list(a.factors))}  # same tensor twice
    with tempfile.TemporaryDirectory() as d:
        save_file(pack(state), f"{d}/s.safetensors")
        back = unpack(load_file(f"{d}/s.safetensors"), "mul")
    assert set(back) == set(state)
    for k in state:
        torch.testing.assert_close(back[k].dense(), state[k].dense(), rtol=0, atol=0)
