"""kvsplice.train: reciprocal attention, in-forward V-only pruning (seed semantics), c_attn capture,
learned compression, and short smoke runs per ablation variant (loss drops, save, reload, resume)."""

from __future__ import annotations

import json

import pytest
import torch

from kvsplice.errors import KVSpliceError, ModelError
from kvsplice.train.config import TrainConfig
from kvsplice.train.model import GPT
from kvsplice.train.prune import (
    PruneConfig, VOnlyPruner, gather_columns, gather_tokens, pruned_attention, renormalise,
)

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512, batch_size=4, threads=1,
            warmup_steps=3, lr=3e-3, min_lr=3e-4, eval_batches=2, progress=False,
            prune_k_min=8, prune_recency=8, prune_ema_update_interval=2,
            kvsplice_codec="pca", kvsplice_k=8, kvsplice_samples=1024, kvsplice_max_batches=4,
            kvsplice_warmup_steps=4, learned_k=8)


def tiny(**kw) -> TrainConfig:
    return TrainConfig(**{**TINY, **kw})


def same_weights(cfg_a: TrainConfig, cfg_b: TrainConfig) -> tuple[GPT, GPT]:
    torch.manual_seed(0)
    a = GPT(cfg_a).eval()
    b = GPT(cfg_b).eval()
    b.load_state_dict(a.state_dict(), strict=False)
    return a, b


def tokens(cfg: TrainConfig, B: int = 2) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (B, cfg.block_size), generator=torch.Generator().manual_seed(1))


# -- equivalences ---------------------------------------------------------------------------------


def test_ra_beta_zero_equals_standard_attention():
    base = tiny()
    a, b = same_weights(base, base.replace(ra_enable=True, ra_layers=[0, 1]))
    assert b.ra_layers == [0, 1] and all(b.transformer.h[i].attn.ra.beta.item() == 0.0 for i in (0, 1))
    x = tokens(base)
    torch.testing.assert_close(b(x)[0], a(x)[0], atol=1e-6, rtol=0)
    with torch.no_grad():  # and RA is live once beta moves
        b.transformer.h[0].attn.ra.beta.fill_(0.5)
    assert (b(x)[0] - a(x)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["v_only", "kv_scores_reuse"])
def test_keep_ratio_one_equals_standard_attention(mode):
    base = tiny()
    a, b = same_weights(base, base.replace(prune_enable=True, prune_keep_ratio=1.0, prune_mode=mode))
    x = tokens(base)
    torch.testing.assert_close(b(x)[0], a(x)[0], atol=1e-6, rtol=0)
    c = GPT(base.replace(prune_enable=True, prune_mode=mode)).eval()  # keep_ratio 0.382 does change outputs
    c.load_state_dict(a.state_dict(), strict=False)
    assert (c(x)[0] - a(x)[0]).abs().max() > 1e-4


def test_v0_matches_transformers_gpt2(tmp_path):
    from transformers import GPT2LMHeadModel

    from kvsplice.train.checkpoint import hf_config

    cfg = tiny()
    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    hf = GPT2LMHeadModel(hf_config(cfg)).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    x = tokens(cfg)
    torch.testing.assert_close(hf(x).logits, ours(x)[0], atol=1e-5, rtol=1e-5)


# -- V-only pruning on a hand-computed 6-token example --------------------------------------------

ATTN6 = torch.tensor([
    [1.0, 0.0, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.5, 0.0, 0.0, 0.0, 0.0],
    [0.5, 0.1, 0.4, 0.0, 0.0, 0.0],
    [0.4, 0.1, 0.1, 0.4, 0.0, 0.0],
    [0.4, 0.1, 0.1, 0.1, 0.3, 0.0],
    [0.3, 0.1, 0.1, 0.1, 0.1, 0.3],
]).view(1, 1, 6, 6)
# column mass 3.1 0.9 0.7 0.6 0.4 0.3 ; exposure 6 5 4 3 2 1
# corrected importance  0.517 0.180 0.175 0.200 0.200 0.300 ; uncorrected (/6) 0.517 0.150 0.117 0.100 0.067 0.050


def kept(cfg: PruneConfig) -> list[int]:
    return sorted(VOnlyPruner(cfg).eval().select(ATTN6)[0, 0].tolist())


def test_exposure_correction_and_recency_hand_example():
    common = dict(keep_ratio=0.7, k_min=1, ema_momentum=0.0)  # k = int(0.7 * 6) = 4
    assert kept(PruneConfig(**common, recency=0, exposure_correction=False)) == [0, 1, 2, 3]
    assert kept(PruneConfig(**common, recency=0, exposure_correction=True)) == [0, 3, 4, 5]
    assert kept(PruneConfig(**common, recency=2, exposure_correction=False)) == [0, 1, 4, 5]
    assert kept(PruneConfig(**common, recency=2, exposure_correction=True)) == [0, 3, 4, 5]
    assert PruneConfig(keep_ratio=0.382, k_min=64).kept(1024) == 391  # the seed's 391 of 1024
    assert PruneConfig(keep_ratio=0.382, k_min=64).kept(100) == 64 and PruneConfig().kept(32) == 32


def test_renormalisation_hand_example():
    idx = torch.tensor([0, 3, 4, 5]).view(1, 1, 4)
    v = torch.tensor([[float(j), 1.0] for j in range(6)]).view(1, 1, 6, 2)  # v_j = (j, 1)
    out = renormalise(gather_columns(ATTN6, idx)) @ gather_tokens(v, idx)  # (1, 1, 6, 2)
    # row 1 keeps only column 0 -> v_0 ; row 3: (0.4 v0 + 0.4 v3) / 0.8 ; row 5: (0.3*0 + 0.1*3 + 0.1*4 + 0.3*5) / 0.8
    expected_first = torch.tensor([0.0, 0.0, 0.0, 1.5, (0.1 * 3 + 0.3 * 4) / 0.8, 2.2 / 0.8])
    torch.testing.assert_close(out[0, 0, :, 0], expected_first)
    torch.testing.assert_close(out[0, 0, :, 1], torch.ones(6))  # each row's kept weights sum to 1


def test_ema_follows_the_seed():
    p = VOnlyPruner(PruneConfig(ema_momentum=0.5, ema_update_interval=2, recency=0)).train()
    a, b = torch.tensor([[[1.0, 0.0]]]), torch.tensor([[[0.0, 1.0]]])
    assert torch.equal(p._ema(a), a)  # first call: stores, returns the current importance
    assert torch.equal(p._ema(b), torch.tensor([[[0.5, 0.5]]]))  # step 0: updated
    assert torch.equal(p._ema(a), torch.tensor([[[0.5, 0.5]]]))  # step 1: stale EMA returned
    assert torch.equal(p._ema(torch.zeros(1, 1, 3)), torch.zeros(1, 1, 3))  # shape change resets


def test_pruned_attention_matches_manual_softmax():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 4) for _ in range(3))
    pruner = VOnlyPruner(PruneConfig(keep_ratio=0.5, k_min=1, recency=2, ema_momentum=0.0)).eval()
    out, _, idx, _ = pruned_attention(q, k, v, pruner)
    scores = (q @ k.transpose(-1, -2)) / 2.0
    attn = scores.masked_fill(~torch.ones(12, 12, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    mask = torch.zeros(2, 3, 12, 12).scatter(-1, idx.unsqueeze(-2).expand(2, 3, 12, 6), 1.0)  # kept columns
    manual = (attn * mask) / ((attn * mask).sum(-1, keepdim=True) + 1e-10) @ v
    torch.testing.assert_close(out, manual, atol=1e-6, rtol=1e-5)
    assert idx.shape == (2, 3, 6) and bool((idx >= 10).sum(-1).eq(2).all())  # last 2 always kept


def test_bad_prune_config_raises():
    with pytest.raises(KVSpliceError, match="keep_ratio"):
        PruneConfig(keep_ratio=1.5)
    with pytest.raises(KVSpliceError, match="mode"):
        PruneConfig(mode="h2o")
    with pytest.raises(KVSpliceError, match="unknown keys"):
        TrainConfig().replace(kvsplice_kk=3)
    with pytest.raises(KVSpliceError, match="exclusive"):
        tiny(kvsplice_enable=True, learned_enable=True)


# -- calibration hooks -------------------------------------------------------------------------------


def test_c_attn_capture_is_exactly_the_v_slice():
    from kvsplice.models import get_adapter
    from kvsplice.train.calibration import collect_v

    cfg = tiny()
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    outs = []
    h = model.transformer.h[1].attn.c_attn.register_forward_hook(lambda m, a, o: outs.append(o.detach()))
    x = tokens(cfg, B=2)
    try:
        with get_adapter(model).capture("v") as cap:
            model(x)
    finally:
        h.remove()
    C, H, D = cfg.n_embd, cfg.n_head, cfg.head_dim
    v_slice = outs[0][..., 2 * C:].view(2, cfg.block_size, H, D).transpose(1, 2)  # (B, H, T, D)
    assert torch.equal(cap.records[1][0], v_slice)
    # the trainer's collector keeps those rows, per head, up to its budget
    ids = torch.randint(0, cfg.vocab_size, (500,), generator=torch.Generator().manual_seed(3))
    vec = collect_v(model, ids, cfg.replace(kvsplice_samples=200, kvsplice_max_batches=1), seed=0)
    assert sorted(vec) == [(l, h) for l in range(2) for h in range(2)] and vec[(0, 1)].shape == (100, D)


def test_learned_compressor_starts_as_orthogonal_projection():
    from kvsplice.train.learned import LearnedVCompressor

    torch.manual_seed(0)
    lc = LearnedVCompressor(16, 4, affine=True)
    torch.testing.assert_close(lc.compress.T @ lc.compress, torch.eye(4), atol=1e-5, rtol=0)
    v = torch.randn(3, 16)
    p = lc.compress @ lc.compress.T  # projector
    torch.testing.assert_close(lc(v), v @ p, atol=1e-5, rtol=1e-5)
    assert lc.encode(v).shape == (3, 4)


# -- smoke runs per variant ---------------------------------------------------------------------------

VARIANTS = {
    "V0": {},
    "V19": dict(prune_enable=True),
    "V20": dict(prune_enable=True, kvsplice_enable=True),
    "V21": dict(prune_enable=True, kvsplice_enable=True, ra_enable=True),
    "L20": dict(prune_enable=True, learned_enable=True, learned_affine=True),
    "V20-spline": dict(prune_enable=True, kvsplice_enable=True, kvsplice_codec="spline-pca", kvsplice_epochs=2),
    "V20-B": dict(prune_enable=True, kvsplice_enable=True, kvsplice_strategy="B", prune_mode="kv_scores_reuse"),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_smoke_run_lowers_loss_saves_reloads_resumes(name, tmp_path):
    from kvsplice.train.checkpoint import load_checkpoint
    from kvsplice.train.trainer import evaluate, train
    from kvsplice.train.textdata import build_corpus, val_batches

    cfg = tiny(name=name, max_steps=12, eval_interval=6, checkpoint_interval=6, out_dir=str(tmp_path / "a"),
               **VARIANTS[name])
    res = train(cfg)
    val = res["history"]["val"]
    assert val[0][0] == 0 and val[-1][0] == 12 and val[-1][1] < val[0][1] - 0.5  # loss went down
    assert json.loads((tmp_path / "a" / "result.json").read_text())["config"] == cfg.to_dict()
    if cfg.kvsplice_enable:
        assert res["calibration"]["step"] == 4 and (tmp_path / "a" / "geometry.safetensors").is_file()
    # reload: the saved checkpoint (weights + geometry file) reproduces the final validation loss
    model, tok, record = load_checkpoint(tmp_path / "a" / "checkpoint")
    corpus = build_corpus(cfg.data, cfg.val_fraction, cfg.vocab_size)
    vb = val_batches(corpus.val_ids, 2 * cfg.batch_size, cfg.batch_size, cfg.block_size)
    assert record["step"] == 12 and abs(evaluate(model, vb, "cpu") - val[-1][1]) < 1e-5
    # resume from step 6 in another folder: bit-identical continuation
    res_b = train(cfg.replace(out_dir=str(tmp_path / "b")), resume=tmp_path / "a" / "checkpoint-6")
    assert res_b["history"] == res["history"]
    model_b, _, _ = load_checkpoint(tmp_path / "b" / "checkpoint")
    for (k, p), (_, pb) in zip(model.state_dict().items(), model_b.state_dict().items()):
        assert torch.equal(p, pb), k


def test_same_seed_same_run_and_hf_export(tmp_path):
    from kvsplice.train.checkpoint import load_checkpoint, load_checkpoint_as_hf
    from kvsplice.train.trainer import train

    cfg = tiny(max_steps=4, eval_interval=2)
    r1 = train(cfg.replace(out_dir=str(tmp_path / "1")))
    r2 = train(cfg.replace(out_dir=str(tmp_path / "2")))
    assert r1["history"] == r2["history"]
    hf, tok = load_checkpoint_as_hf(tmp_path / "1" / "checkpoint")
    ours, _, _ = load_checkpoint(tmp_path / "1" / "checkpoint")
    ids = torch.tensor([tok("def f(x): return x", add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(hf(ids).logits, ours(ids)[0], atol=1e-5, rtol=1e-5)
    r3 = train(cfg.replace(out_dir=str(tmp_path / "3"), ra_enable=True, max_steps=2))
    with pytest.raises(ModelError, match="reciprocal"):
        load_checkpoint_as_hf(r3["checkpoint"])
    with pytest.raises(KVSpliceError, match="cannot resume"):
        train(cfg.replace(out_dir=str(tmp_path / "4"), n_layer=3), resume=tmp_path / "1" / "checkpoint")


def test_bpe_tokenizer_is_deterministic():
    from kvsplice.train.textdata import train_bpe

    text = "the quick brown fox jumps over the lazy dog\n\n" * 50 + "def f(x):\n    return x + 1\n" * 30
    a, b = train_bpe(text, 300), train_bpe(text, 300)
    assert a.to_str() == b.to_str() and a.get_vocab_size() <= 300


def test_ablation_config_and_table(tmp_path):
    from kvsplice.train.ablation import format_table, load_ablation, make_row

    acfg = load_ablation("configs/gpt2-kv-pruning-ablation.toml")
    names = [v["name"] for v in acfg.variants]
    assert names == ["V0", "V19", "V20", "V21", "L20", "V20-pca", "C1", "C3"]
    v20, c3, v21 = acfg.train_config("V20"), acfg.train_config("C3"), acfg.train_config("V21")
    assert v20.prune_enable and v20.kvsplice_enable and v20.kvsplice_codec == "spline-pca" and v20.kvsplice_k == 16
    assert c3.kvsplice_k == 8 and v21.ra_enable and acfg.train_config("V20-pca").kvsplice_codec == "pca"
    from kvsplice.train.trainer import v_values_per_head_formula

    # the seed's table at T=1024, head_dim 64: 65536 / 25024 / 6256
    seed_like = TrainConfig(n_embd=128, n_head=2)
    assert v_values_per_head_formula(seed_like) == 65536
    assert v_values_per_head_formula(seed_like.replace(prune_enable=True)) == 25024
    assert v_values_per_head_formula(seed_like.replace(prune_enable=True, kvsplice_enable=True)) == 6256
    bad = tmp_path / "bad.toml"
    bad.write_text('[base]\nmax_steps = 5\n[[variants]]\nname = "X"\nprune_keep_ratio = 2.0\n')
    with pytest.raises(KVSpliceError, match="keep_ratio"):
        load_ablation(bad).train_config("X")
    res = {"name": "V0", "val_ppl": 20.0, "v_values_per_head_T1024_formula": 65536, "steps": 3, "seconds": 1.0,
           "memory": {"v_values_per_head": [4096], "context": 64, "kv_bytes_per_token": 10.0, "v_bytes_per_token": 5.0}}
    row = make_row(res, "", 16.0)
    assert row["delta_vs_v0_pct"] == 25.0 and "V0" in format_table([row])
