"""The one update rule (growlm.train.optim) as the Trainer runs it: a grown model follows the un-grown one
step for step, per-generation multipliers scale the update exactly, and a tiny model overfits one batch."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from growlm.growth import GrowthSpec
from growlm.models.model import GPT
from growlm.train import Trainer
from growlm.train.data import PackedData
from tests.conftest import tiny_config
from tests.test_train import SEQ, config, packed, params


def _run(tmp_path, name: str, model: GPT, steps: int, growth: dict | None = None, **sections) -> Trainer:
    """A float64 Trainer on the shared synthetic data, trained `steps` steps by its own loop (fit)."""
    run = dict(dtype="float64", max_steps=20, eval_every=100, **sections.pop("run", {}))
    t = Trainer(config(tmp_path, name, run=run, growth=growth or {}, **sections), model=copy.deepcopy(model), data=packed())
    t.fit(stop_after=steps)
    return t


# a. width growth: the grown model's step is the image of the un-grown model's step
def test_width_growth_follows_the_ungrown_trajectory(tmp_path):
    model = GPT(tiny_config("llama"))
    # No weight decay and no clipping: the update scale multiplies weight decay too (s * lr * wd on value-
    # divided columns), and the grown model's global gradient norm differs (clones), so clipping would too.
    # eps 1e-30: the transferred moments are beta * m and beta^2 * v, so Adam's m / (sqrt(v) + eps) equals the
    # old direction only when eps is negligible next to sqrt(v) (1e-8 would shift the clones' steps by ~1e-6).
    optim = dict(weight_decay=0.0, grad_clip=0.0, eps=1e-30)
    k = 3
    plain = _run(tmp_path, "plain", model, k, optim=optim)
    grown = _run(tmp_path, "grown", model, k, optim=optim,
                 growth=dict(trigger="steps", steps=[k], operators=[GrowthSpec(operator="width", factor=2, noise=0.0)]))
    assert grown.model.config.n_embd == 2 * plain.model.config.n_embd and grown.state.generation == 1
    assert grown.state.update_scale  # the consumer columns train at 1/2
    x = packed().block("val", 0, 4 * SEQ)[None, :-1]
    with torch.no_grad():
        before = plain.model(x)
        torch.testing.assert_close(grown.model(x), before, rtol=0, atol=1e-12)  # function-preserving
    plain.train_step()  # the same batch for both: the samplers are at the same position
    grown.train_step()
    with torch.no_grad():
        after = plain.model(x)
        torch.testing.assert_close(grown.model(x), after, rtol=0, atol=1e-9)
    assert float((after - before).abs().max()) > 1e-3  # the step moved the function


# b. depth growth (identity blocks): the old parameters move exactly as in the un-grown model
def test_depth_growth_leaves_the_old_trajectory_bit_identical(tmp_path):
    model = GPT(tiny_config("llama"))
    optim = dict(grad_clip=0.0)  # the new block's gradients would change the clipping coefficient
    k = 2
    plain = _run(tmp_path, "plain", model, k, optim=optim)
    grown = _run(tmp_path, "grown", model, k, optim=optim,
                 growth=dict(trigger="steps", steps=[k], operators=[GrowthSpec("depth", where="after", layers=[0])]))
    new_before = {n: p.clone() for n, p in params(grown.model).items() if n.startswith("blocks.1.")}
    plain.train_step()
    grown.train_step()
    rename = {"blocks.1.": "blocks.2."}  # the new block sits after layer 0
    p_grown = params(grown.model)
    for n, p in params(plain.model).items():
        m = next((n.replace(a, b) for a, b in rename.items() if n.startswith(a)), n)
        assert torch.equal(p_grown[m], p), n
    assert all(not torch.equal(p_grown[n], p) for n, p in new_before.items() if n.endswith(("o.weight", "down.weight")))


# c. old_params=decay: generation g moves gen_lr_mult ** (G - g) times its AdamW update
def test_decay_ratio_of_update_norms_between_generations(tmp_path):
    m = 0.5
    depth = GrowthSpec("depth", n=1, where="top")
    t = _run(tmp_path, "decay", GPT(tiny_config("llama")), 3, growth=dict(
        trigger="steps", steps=[1, 2], operators=[depth], old_params="decay", gen_lr_mult=m))
    assert t.state.generation == 2
    p0, opt0, pos = params(t.model), copy.deepcopy(t.optimizer.state_dict()), t.state.sampler.state_dict()

    def update_norms() -> dict[int, float]:
        t.train_step()
        out: dict[int, float] = {}
        for n, p in params(t.model).items():
            g = int(t.state.generations[n].value())
            out[g] = out.get(g, 0.0) + float(((p - p0[n]) ** 2).sum())
        with torch.no_grad():  # back to the snapshot
            for n, p in t.model.named_parameters():
                p.copy_(p0[n])
        t.optimizer.load_state_dict(opt0)
        t.state.sampler.load_state_dict(pos)
        return {g: v**0.5 for g, v in out.items()}

    decayed = update_norms()
    t.cfg = dataclasses.replace(t.cfg, growth=dataclasses.replace(t.cfg.growth, old_params="train"))
    full = update_norms()  # the same step with every multiplier 1 (the rule reads the config each step)
    ratios = {g: decayed[g] / full[g] for g in full}
    assert sorted(ratios) == [0, 1, 2] and all(full[g] > 0 for g in full)
    for g, r in ratios.items():
        assert r == pytest.approx(m ** (2 - g), rel=1e-12), (g, ratios)
    assert ratios[0] / ratios[1] == pytest.approx(m, rel=1e-12) == ratios[1] / ratios[2]


# d. one batch can be overfit
def test_overfit_one_batch(tmp_path):
    rng = np.random.default_rng(0)
    batch = 4
    stream = rng.integers(0, 96, batch * (SEQ + 1)).astype(np.uint16)  # exactly one batch of blocks
    data = PackedData(stream, stream, "one-batch", 1, 1, 96)
    cfg = config(tmp_path, run=dict(micro_batch=batch, max_steps=150),
                 optim=dict(lr=1e-2, warmup_steps=0, decay="constant", weight_decay=0.0), data=dict(val_blocks=0))
    t = Trainer(cfg, model=GPT(tiny_config("llama")), data=data)
    assert t.state.sampler.n_blocks == batch
    first = t.evaluate()
    losses = []
    for _ in range(150):
        losses.append(t.train_step()["loss"])
        t.state.step += 1
    assert first > 4.0 and losses[-1] < 0.1 and t.evaluate() < 0.1, (first, losses[::25])
