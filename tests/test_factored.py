"""Factored per-element state: dense values, re-indexing, composition, round trip."""

import torch

from growlm.growth.factored import Factored


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
