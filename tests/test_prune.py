"""Students cut from teachers (growlm.distill.prune, `growlm prune`): exactness where nothing that matters is
removed, importance that ranks dead units last, GQA-consistent shapes, HF round trips, the CLI end to end,
refusals, and one SmolLM2 integration run."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

from growlm.cli import main
from growlm.cli.prune import calibration_blocks
from growlm.distill.prune import (StudentSpec, block_influence, block_loss, make_student, select_layers,
                                  student_config, width_importance)
from growlm.errors import GrowlmError
from growlm.models.config import module_diff, module_lines
from growlm.models.hf import load_model, save_hf
from growlm.models.model import GPT
from growlm.models.tokenizer import train_bpe
from tests.conftest import tiny_config

FAMILIES = ["llama", "gpt2"]


def _model(family: str, dtype=torch.float64, **overrides) -> GPT:
    """A tiny random model with non-trivial norms and biases (so that a wrong index shows)."""
    m = GPT(tiny_config(family, **{"n_layer": 4, **overrides})).to(dtype).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return m


def _ids(n: int = 3, t: int = 12, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def _snapshot(m: GPT) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(m: GPT, snap: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, snap[k]) for k, v in m.state_dict().items())


# -- exactness ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_gives_the_teachers_logits_and_leaves_it_untouched(family):
    t = _model(family)
    c = t.config
    snap = _snapshot(t)
    x = _ids()
    spec = StudentSpec(n_layer=c.n_layer, depth_by="importance", n_head=c.n_head, n_kv_head=c.n_kv_head,
                       ffn_size=c.ffn_size, n_embd=c.n_embd)
    s, rec = make_student(t, spec, x)
    with torch.no_grad():
        torch.testing.assert_close(s(x), t(x), atol=0, rtol=0)
    assert _same(t, snap)
    assert rec["kept_layers"] == list(range(c.n_layer)) and rec["kept_channels"] == list(range(c.n_embd))
    # the student owns its tensors: training it cannot move the teacher
    with torch.no_grad():
        for p in s.parameters():
            p.add_(1.0)
    assert _same(t, snap)


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_heads_and_ffn_channels_equal_the_teacher_with_them_zeroed(family):
    """Removing a query head = zeroing its o columns; removing an FFN channel = zeroing its down column.
    Checked on a random model (fp64), so the kept indices must be bookkept exactly."""
    over = dict(n_head=8, n_kv_head=4) if family == "llama" else {}
    t = _model(family, **over)
    c = t.config
    x = _ids()
    spec = StudentSpec(n_head=c.n_head // 2, n_kv_head=c.n_kv_head // 2 if family == "llama" else None,
                       ffn_size=c.ffn_size // 2)
    s, rec = make_student(t, spec, x)
    ref = copy.deepcopy(t)
    hd = c.head_dim
    with torch.no_grad():
        for i, blk in enumerate(ref.blocks):
            for h in set(range(c.n_head)) - set(rec["kept_heads"][i]):
                blk.attn.o.weight[:, h * hd:(h + 1) * hd] = 0
            for j in set(range(c.ffn_size)) - set(rec["kept_ffn"][i]):
                blk.mlp.down.weight[:, j] = 0
        torch.testing.assert_close(s(x), ref(x), atol=1e-12, rtol=0)
    assert s.config.n_head == c.n_head // 2 and s.config.ffn_size == c.ffn_size // 2


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_ffn_channels_rank_last_and_prune_exactly(family):
    t = _model(family)
    c = t.config
    dead = {i: sorted(torch.randperm(c.ffn_size, generator=torch.Generator().manual_seed(i))[:c.ffn_size // 4].tolist())
            for i in range(c.n_layer)}
    with torch.no_grad():
        for i, blk in enumerate(t.blocks):  # zero activation (up rows) and zero output (down columns)
            blk.mlp.up.weight[dead[i]] = 0
            if blk.mlp.up.bias is not None:
                blk.mlp.up.bias[dead[i]] = 0
            blk.mlp.down.weight[:, dead[i]] = 0
    x = _ids()
    imp = width_importance(t, x)["ffn"]
    for i in range(c.n_layer):
        assert set(imp[i].argsort()[:len(dead[i])].tolist()) == set(dead[i])
        assert float(imp[i][dead[i]].abs().max()) == 0.0
    s, rec = make_student(t, StudentSpec(ffn_size=c.ffn_size - c.ffn_size // 4), x)
    assert all(set(rec["kept_ffn"][i]).isdisjoint(dead[i]) for i in range(c.n_layer))
    with torch.no_grad():
        torch.testing.assert_close(s(x), t(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("family, n_head, n_kv_head", [("llama", 2, 1), ("llama", None, 1), ("gpt2", 3, None)])
def test_dead_heads_rank_last_and_prune_exactly(family, n_head, n_kv_head):
    """A KV head whose values are zero gives its query heads zero output: they rank last and go."""
    t = _model(family)
    c = t.config
    hd, G = c.head_dim, c.n_head // c.n_kv_head
    dead_kv = 1
    with torch.no_grad():
        for blk in t.blocks:
            blk.attn.v.weight[dead_kv * hd:(dead_kv + 1) * hd] = 0
            if blk.attn.v.bias is not None:
                blk.attn.v.bias[dead_kv * hd:(dead_kv + 1) * hd] = 0
    x = _ids()
    heads = width_importance(t, x)["heads"]
    dead_q = list(range(dead_kv * G, (dead_kv + 1) * G))
    assert all(set(row.argsort()[:G].tolist()) == set(dead_q) and float(row[dead_q].max()) == 0 for row in heads)
    s, rec = make_student(t, StudentSpec(n_head=n_head, n_kv_head=n_kv_head), x)
    assert all(set(h).isdisjoint(dead_q) for h in rec["kept_heads"])
    with torch.no_grad():
        torch.testing.assert_close(s(x), t(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_zero_residual_channels_rank_last_and_prune_exactly(tied):
    """RMSNorm: channels that are zero in the whole residual stream are removed exactly (gains x sqrt(D/D'),
    eps x D/D' keep the kept channels' normalisation)."""
    t = _model("llama", tie_embeddings=tied)
    c = t.config
    dead = [3, 7, 8, 20, 31, 0]
    with torch.no_grad():
        t.wte.weight[:, dead] = 0
        for blk in t.blocks:
            blk.attn.o.weight[dead] = 0
            blk.mlp.down.weight[dead] = 0
    x = _ids()
    emb = width_importance(t, x)["embd"]
    assert set(emb.argsort()[:len(dead)].tolist()) == set(dead) and float(emb[dead].max()) == 0
    s, rec = make_student(t, StudentSpec(n_embd=c.n_embd - len(dead)), x)
    assert set(rec["kept_channels"]).isdisjoint(dead)
    assert s.config.norm_eps == pytest.approx(c.norm_eps * c.n_embd / (c.n_embd - len(dead)))
    with torch.no_grad():
        torch.testing.assert_close(s(x), t(x), atol=1e-10, rtol=0)
    # negative control: without the norm correction the logits would change
    with torch.no_grad():
        bad = copy.deepcopy(s)
        for m in bad.modules():
            if hasattr(m, "eps") and isinstance(m.weight, nn.Parameter):
                m.weight /= math.sqrt(c.n_embd / (c.n_embd - len(dead)))
                m.eps = c.norm_eps
        assert float((bad(x) - t(x)).abs().max()) > 1e-3


# -- depth ------------------------------------------------------------------------------------------------
def test_layer_selection_rules():
    sel = lambda **kw: select_layers(12, StudentSpec(**kw))  # noqa: E731
    assert sel(layers=[0, 5, 11]) == [0, 5, 11]
    assert sel(every=2) == [0, 2, 4, 6, 8, 10]
    assert sel(every=5) == [0, 5, 10]
    assert sel(n_layer=6) == [0, 2, 4, 7, 9, 11]  # what HF's DistilBERT / DistilGPT2 extraction copies
    assert sel(n_layer=1) == [0] and sel(n_layer=2) == [0, 11] and sel(n_layer=12) == list(range(12))
    assert select_layers(30, StudentSpec(n_layer=10)) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]
    bi = [0.5, 0.1, 0.9, 0.1, 0.3, 0.2, 0.8, 0.05, 0.4, 0.6, 0.7, 1.0]
    assert select_layers(12, StudentSpec(n_layer=4, depth_by="importance"), bi) == [2, 6, 10, 11]
    assert select_layers(12, StudentSpec(n_layer=11, depth_by="importance"), bi) == [i for i in range(12) if i != 7]


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_layers_compute_what_those_teacher_blocks_compute(family):
    t = _model(family, n_layer=5)
    x = _ids()
    for spec, kept in ((StudentSpec(layers=[0, 3, 4]), [0, 3, 4]), (StudentSpec(every=2), [0, 2, 4]),
                       (StudentSpec(n_layer=3), [0, 2, 4])):
        s, rec = make_student(t, spec, None)
        assert rec["kept_layers"] == kept and s.config.n_layer == len(kept)
        ref = copy.deepcopy(t)
        ref.blocks = nn.ModuleList(ref.blocks[i] for i in kept)
        with torch.no_grad():
            torch.testing.assert_close(s(x), ref(x), atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_identity_block_has_zero_influence_and_is_dropped_first(family):
    t = _model(family)
    with torch.no_grad():
        for name in ("attn.o", "mlp.down"):
            mod = t.blocks[2].get_submodule(name)
            mod.weight.zero_()
            if mod.bias is not None:
                mod.bias.zero_()
    x = _ids()
    bi = block_influence(t, x)
    assert abs(bi[2]) < 1e-12 and min(b for i, b in enumerate(bi) if i != 2) > 1e-4
    s, rec = make_student(t, StudentSpec(n_layer=3, depth_by="importance"), x)
    assert rec["dropped_layers"] == [2] and rec["layer_importance"] == bi
    with torch.no_grad():
        torch.testing.assert_close(s(x), t(x), atol=1e-12, rtol=0)


# -- GQA, embedding channels, HF interop -------------------------------------------------------------------
@pytest.mark.parametrize("n_head, n_kv_head, want", [
    (4, None, (4, 4)),   # keep every group, one query head each
    (None, 2, (4, 2)),   # drop whole groups
    (4, 2, (4, 2)), (2, 2, (2, 2)), (2, 1, (2, 1)), (6, 3, (6, 3)),
])
def test_gqa_consistent_head_pruning(n_head, n_kv_head, want):
    t = _model("llama", n_head=8, n_kv_head=4, n_embd=32)
    x = _ids()
    s, rec = make_student(t, StudentSpec(n_head=n_head, n_kv_head=n_kv_head), x)
    assert (s.config.n_head, s.config.n_kv_head, s.config.head_dim) == (*want, t.config.head_dim)
    G, G2 = 2, want[0] // want[1]
    for heads, groups in zip(rec["kept_heads"], rec["kept_kv_heads"]):
        assert len(groups) == want[1] and len(heads) == want[0]
        assert all(sum(h // G == g for h in heads) == G2 for g in groups)  # each kept group keeps G2 of its own heads
    assert s(x).shape == (3, 12, 96) and torch.isfinite(s(x)).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_combined_depth_and_width_pruning_runs(family):
    t = _model(family, n_layer=6, n_head=4)
    x = _ids()
    spec = StudentSpec(n_layer=3, depth_by="importance", n_head=2, ffn_size=40, n_embd=24)
    s, rec = make_student(t, spec, x)
    c = s.config
    assert (c.n_layer, c.n_head, c.ffn_size, c.n_embd, c.head_dim) == (3, 2, 40, 24, t.config.head_dim)
    assert s.num_params() == rec["params_student"] < t.num_params()
    assert torch.isfinite(s(x)).all()
    r, rrec = make_student(t, StudentSpec(**{**spec.to_dict(), "init": "random"}), None)
    assert r.config == c and r.num_params() == s.num_params()
    r2, _ = make_student(t, StudentSpec(**{**spec.to_dict(), "init": "random"}), None)
    r3, _ = make_student(t, StudentSpec(**{**spec.to_dict(), "init": "random", "seed": 1}), None)
    assert _same(r2, _snapshot(r)) and not _same(r3, _snapshot(r))


@pytest.mark.parametrize("tied", [False, True])
def test_embedding_pruned_llama_round_trips_through_hugging_face(tmp_path, tied):
    t = _model("llama", dtype=torch.float32, tie_embeddings=tied)
    x = _ids()
    s, _ = make_student(t, StudentSpec(n_embd=20, n_head=2, ffn_size=48, n_layer=3), x)
    save_hf(s, tmp_path / "out")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, s(x), atol=1e-5, rtol=0)
    back, _ = load_model(str(tmp_path / "out"))
    assert back.config == s.config and _same(back, _snapshot(s))


# -- refusals ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, needle", [
    (dict(layers=[0, 4]), "do not exist"),
    (dict(layers=[1, 1]), "twice"),
    (dict(n_layer=5), "larger than the teacher"),
    (dict(every=5), "larger than the teacher"),
    (dict(n_head=16), "larger than the teacher"),
    (dict(ffn_size=65), "larger than the teacher"),
    (dict(n_embd=33), "larger than the teacher"),
    (dict(n_kv_head=4), "larger than the teacher"),
    (dict(n_head=3), "GQA-consistent"),
    (dict(n_head=3, n_kv_head=2), "must divide"),
    (dict(n_head=4, n_kv_head=1), "cannot gain heads"),
    (dict(head_dim=4), "keeps head_dim"),
    (dict(layers=[0], n_layer=1), "at most one"),
    (dict(depth_by="importance"), "needs n_layer"),
    (dict(ffn_size=0), "positive integer"),
    (dict(init="zeros"), "init must be"),
])
def test_bad_specs_raise_one_line(spec, needle):
    t = _model("llama")  # 4 layers, 4 heads in 2 KV groups, ffn 64, n_embd 32, head_dim 8
    with pytest.raises(GrowlmError) as e:
        student_config(t.config, StudentSpec(**spec))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_importance_without_calibration_is_refused():
    t = _model("llama")
    with pytest.raises(GrowlmError, match="calibration"):
        make_student(t, StudentSpec(n_layer=2, depth_by="importance"), None)
    with pytest.raises(GrowlmError, match="calibration"):
        make_student(t, StudentSpec(ffn_size=8), None)


# -- module diff ------------------------------------------------------------------------------------------
def test_module_lines_show_the_swiglu_gate_and_the_diff_names_what_changed():
    llama, gpt2 = tiny_config("llama").to_dict(), tiny_config("gpt2").to_dict()
    assert any("mlp.gate: Linear(32, 64)" in ln for ln in module_lines(llama))
    assert not any("gate" in ln for ln in module_lines(gpt2))
    diff = module_diff(llama, {**llama, "n_layer": 1, "ffn_size": 16}, ("teacher", "student"))
    assert diff[:2] == ["--- teacher", "+++ student"]
    assert "-blocks: 2 x Block" in diff and "+blocks: 1 x Block" in diff
    assert "+  mlp.down: Linear(16, 32)" in diff and " embed: Embedding(96, 32)" in diff
    assert module_diff(llama, llama) == []


# -- the CLI ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    words = " ".join(f"word{j % 13} thing{j % 7} item{j % 5}" for j in range(3000))
    (d / "texts").mkdir()
    for i in range(4):
        (d / "texts" / f"t{i}.txt").write_text(words + f" end{i}")
    tok = train_bpe([words], 300, d / "tok")
    torch.manual_seed(3)
    save_hf(GPT(tiny_config("llama", vocab_size=300, n_layer=4, n_head=4, n_kv_head=2)), d / "model", tok)
    return d


def test_prune_cli_end_to_end(saved_teacher, tmp_path, capsys):
    d = saved_teacher
    out = tmp_path / "student"
    argv = ["prune", "--model", str(d / "model"), "--out", str(out), "--n-layer", "2", "--depth-by", "importance",
            "--n-head", "2", "--ffn-size", "32", "--n-embd", "24", "--calibration", str(d / "texts"),
            "--calibration-batches", "3", "--seq-len", "16", "--val-blocks", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "--- teacher" in printed and "-blocks: 4 x Block" in printed and "+blocks: 2 x Block" in printed
    assert "random-init" in printed and "kept layers (by importance)" in printed
    rec = json.loads((out / "prune.json").read_text())
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert rec["spec"]["n_layer"] == 2 and len(rec["kept_layers"]) == 2 and len(rec["layer_importance"]) == 4
    assert all(math.isfinite(v) for v in rec["val_loss"].values())
    assert rec["params"]["pruned"] == rec["params"]["random_init"] < rec["params"]["teacher"]
    # the saved student is the one make_student builds in memory from the same calibration blocks
    teacher, tok = load_model(str(d / "model"))
    calib, val = calibration_blocks(str(d / "texts"), tok, 16, 3, 2)
    mem, mrec = make_student(teacher, StudentSpec(n_layer=2, depth_by="importance", n_head=2, ffn_size=32, n_embd=24), calib[:, :-1])
    saved, saved_tok = load_model(str(out))
    assert saved.config == mem.config and _same(saved, _snapshot(mem))
    assert mrec["kept_layers"] == rec["kept_layers"] and mrec["kept_heads"] == rec["kept_heads"]
    assert rec["val_loss"]["pruned"] == pytest.approx(block_loss(mem, val), rel=1e-6)
    assert saved_tok.get_vocab() == tok.get_vocab()


def test_prune_cli_refuses_an_existing_output_and_replaces_it_with_overwrite(saved_teacher, tmp_path, capsys):
    d = saved_teacher
    out = tmp_path / "student"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    argv = ["prune", "--model", str(d / "model"), "--out", str(out), "--layers", "0,3", "--calibration", str(d / "texts"),
            "--seq-len", "16", "--calibration-batches", "2", "--val-blocks", "2"]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "keep.txt").read_text() == "precious"
    assert main([*argv, "--overwrite", "true"]) == 0
    assert not (out / "keep.txt").exists() and json.loads((out / "prune.json").read_text())["kept_layers"] == [0, 3]


# -- SmolLM2 ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_cut_by_importance(smollm2):
    """30 -> 10 layers by Block Influence on 2 calibration sequences of 128 tokens. One-shot, before any
    training, a third of SmolLM2 is not a language model any more (its loss is about that of a uniform
    guess, as ShortGPT and Minitron report for deep cuts), but the measured importance keeps far more than a
    uniform spread of the same 10 layers; cut to 20 layers the pruned student is far below a random init."""
    teacher, tok = smollm2
    calib, val = calibration_blocks(None, tok, 128, 2, 4)
    losses = {}
    for n in (10, 20):
        spec = StudentSpec(n_layer=n, depth_by="importance", calibration_batches=2, calibration_seq_len=128)
        s, rec = make_student(teacher, spec, calib[:, :-1])
        assert s.config.n_layer == n and len(rec["layer_importance"]) == 30 and 0 in rec["kept_layers"]
        losses[n, "importance"] = block_loss(s, val)
        del s
    uniform, _ = make_student(teacher, StudentSpec(n_layer=10), None)
    losses[10, "uniform"] = block_loss(uniform, val)
    del uniform
    rand, _ = make_student(teacher, StudentSpec(n_layer=20, init="random"), None)
    losses["random"] = block_loss(rand, val)
    assert all(math.isfinite(v) for v in losses.values()), losses
    assert losses[10, "importance"] < losses[10, "uniform"] - 1.0, losses
    assert losses[20, "importance"] < losses["random"] - 3.0, losses
