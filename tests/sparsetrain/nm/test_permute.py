import pytest
import torch
from torch import nn

from sparsetrain.demo import GPT, GPTConfig, MLPClassifier
from sparsetrain.nm import (
    NMConfig,
    NMSparsifier,
    PermutationSite,
    apply_channel_permutation,
    find_permutation_sites,
    is_nm,
    kept_magnitude,
    permute_for_nm,
    prune_to_nm,
    search_channel_permutation,
)

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, d_model=64)


def _gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG).eval()


@pytest.fixture(scope="module")
def trained_state():
    torch.set_num_threads(1)
    model = _gpt()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x = torch.randint(0, 256, (8, CFG.block_size + 1), generator=g)
        model.loss(x[:, :-1], x[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _trained_gpt(state):
    model = GPT(CFG).eval()
    model.load_state_dict(state)
    return model


def test_sites_found_by_structure():
    sites = find_permutation_sites(_gpt())
    assert [(s.consumers, s.producers, s.block_size) for s in sites[1:]] == [
        (["blocks.0.attn.out_proj"], ["blocks.0.attn.v_proj"], 32),
        (["blocks.0.mlp.fc_out"], ["blocks.0.mlp.fc_in"], None),
    ]
    res = sites[0]
    assert res.consumers == ["blocks.0.attn.q_proj", "blocks.0.attn.k_proj", "blocks.0.attn.v_proj",
                             "blocks.0.mlp.fc_in", "lm_head"]
    assert res.producers == ["blocks.0.attn.out_proj", "blocks.0.mlp.fc_out"]
    assert res.others == [("tok_emb.weight", 1), ("pos_emb.weight", 1), ("blocks.0.ln_1.weight", 0),
                          ("blocks.0.ln_1.bias", 0), ("blocks.0.ln_2.weight", 0), ("blocks.0.ln_2.bias", 0),
                          ("ln_f.weight", 0), ("ln_f.bias", 0)]
    assert len(find_permutation_sites(_gpt(), residual=False)) == 2
    sites = find_permutation_sites(MLPClassifier())
    assert [(s.consumers, s.producers) for s in sites] == [(["net.2"], ["net.0"]), (["net.4"], ["net.2"])]


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (2, 8)])
def test_permuted_gpt_computes_the_same_function_and_keeps_more(n, m):
    model = _gpt()
    x = torch.randint(0, 256, (3, CFG.block_size))
    with torch.no_grad():
        before = model(x)
    kept0 = {name: kept_magnitude(model.get_submodule(name).weight, n, m)
             for name in ("blocks.0.attn.out_proj", "blocks.0.mlp.fc_out")}
    done = permute_for_nm(model, n, m, escapes=4)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5, rtol=1e-5)
    assert len(done) == 3
    assert done[0].info["kept_after"] >= done[0].info["kept_before"]  # the residual stream
    for site in done[1:]:
        name = site.consumers[0]
        kept1 = kept_magnitude(model.get_submodule(name).weight, n, m)
        assert site.info["kept_before"] == pytest.approx(kept0[name])
        assert kept1 == pytest.approx(site.info["kept_after"]) and kept1 > kept0[name]


def test_residual_stream_permutation_inside_a_wrapper():
    class Wrapper(nn.Module):  # e.g. a LightningModule holding the GPT as `model`
        def __init__(self):
            super().__init__()
            self.model = _gpt()

        def forward(self, x):
            return self.model(x)

    wrapped = Wrapper().eval()
    x = torch.randint(0, 256, (3, CFG.block_size))
    with torch.no_grad():
        before = wrapped(x)
    emb = wrapped.model.tok_emb.weight.clone()
    done = permute_for_nm(wrapped, 2, 4, include=["*.attn.q_proj", "*.attn.k_proj"], escapes=2)
    assert [s.consumers[0] for s in done] == ["model.blocks.0.attn.q_proj"]  # the only site q/k feed
    perm = done[0].info["perm"]
    assert not torch.equal(perm, torch.arange(CFG.d_model))
    assert torch.equal(wrapped.model.tok_emb.weight, emb[:, perm])
    with torch.no_grad():
        assert torch.allclose(wrapped(x), before, atol=1e-5, rtol=1e-5)


def test_permuted_sequential_mlp_computes_the_same_function():
    torch.manual_seed(0)
    model = MLPClassifier(in_features=64, hidden=128, n_classes=8)
    x = torch.randn(16, 64)
    with torch.no_grad():
        before = model(x)
    done = permute_for_nm(model, 2, 4, escapes=2)
    assert [s.consumers for s in done] == [["net.2"], ["net.4"]]
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5, rtol=1e-5)


def test_qk_permutation_within_heads_keeps_the_function_and_every_kept_magnitude():
    model = _gpt()
    attn = model.blocks[0].attn
    head = CFG.d_model // CFG.n_head
    g = torch.Generator().manual_seed(1)
    perm = torch.cat([torch.randperm(head, generator=g) + h * head for h in range(CFG.n_head)])
    x = torch.randint(0, 256, (3, CFG.block_size))
    with torch.no_grad():
        before = model(x)
    kept = [kept_magnitude(mod.weight, 2, 4) for mod in (attn.q_proj, attn.k_proj)]
    apply_channel_permutation(model, PermutationSite(consumers=[], producers=["blocks.0.attn.q_proj",
                                                                              "blocks.0.attn.k_proj"]), perm)
    with torch.no_grad():
        assert torch.allclose(model(x), before, atol=1e-5, rtol=1e-5)
    # Rows moved, and N:M groups run along the columns: nothing to gain, which is why it is not searched.
    assert [kept_magnitude(mod.weight, 2, 4) for mod in (attn.q_proj, attn.k_proj)] == pytest.approx(kept)


@pytest.mark.parametrize("n,m,block", [(2, 4, None), (1, 4, 32), (2, 8, None), (4, 8, 64), (1, 2, None)])
def test_search_never_loses_and_returns_a_blockwise_permutation(n, m, block):
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(n * 10 + m))
    perm, info = search_channel_permutation(w, n, m, block_size=block, escapes=3)
    assert torch.equal(perm.sort().values, torch.arange(128))
    b = block or 128
    for b0 in range(0, 128, b):
        assert ((perm[b0 : b0 + b] >= b0) & (perm[b0 : b0 + b] < b0 + b)).all()
    assert info["kept_after"] == pytest.approx(kept_magnitude(w[:, perm], n, m))
    assert info["kept_after"] >= info["kept_before"]
    if n / m < 1 - 1 / m:  # something to gain
        assert info["kept_after"] > info["kept_before"]


def test_search_recovers_a_hidden_arrangement():
    # Large and small columns that fit 2:4 perfectly in some order, shuffled: the search must find
    # an order that keeps all the large ones.
    g = torch.Generator().manual_seed(0)
    rows = 32
    w = torch.where(torch.arange(64) % 4 < 2, 1.0 + torch.rand(rows, 64, generator=g), torch.full((rows, 64), 0.01))
    shuffled = w[:, torch.randperm(64, generator=g)]
    perm, info = search_channel_permutation(shuffled, 2, 4, escapes=8)
    assert info["kept_before"] < 0.9
    assert info["kept_after"] == pytest.approx(kept_magnitude(w, 2, 4), rel=1e-6)


def test_trained_model_gains_and_is_deterministic(trained_state):
    a, b = _trained_gpt(trained_state), _trained_gpt(trained_state)
    da = permute_for_nm(a, 2, 4, seed=3, escapes=4)
    db = permute_for_nm(b, 2, 4, seed=3, escapes=4)
    for sa, sb in zip(da, db):
        assert torch.equal(sa.info["perm"], sb.info["perm"])
        assert sa.info["kept_after"] > sa.info["kept_before"]
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_prune_to_nm_exact_and_permutation_keeps_more(trained_state):
    plain, permuted = _trained_gpt(trained_state), _trained_gpt(trained_state)
    r0 = prune_to_nm(plain, 2, 4, permute=False, include=["*.mlp.*", "*.out_proj"])
    r1 = prune_to_nm(permuted, 2, 4, include=["*.mlp.*", "*.out_proj"], escapes=4, residual=False)
    assert r0["layers"] == r1["layers"] == ["blocks.0.attn.out_proj", "blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out"]
    for name in r1["layers"]:
        assert is_nm(permuted.get_submodule(name).weight, 2, 4)
        assert r1["kept_magnitude"][name] >= r0["kept_magnitude"][name] - 1e-7
    for name in ("blocks.0.attn.out_proj", "blocks.0.mlp.fc_out"):
        assert r1["kept_magnitude"][name] > r0["kept_magnitude"][name]
    assert not is_nm(permuted.blocks[0].attn.q_proj.weight, 2, 4)  # not included
    # Fine-tuning keeps the pruned pattern with fixed masks.
    sp = NMSparsifier(permuted, NMConfig(method="ste", update_every=0, include=["*.mlp.*", "*.out_proj"]))
    for name in r1["layers"]:
        mask = sp.masks()[name + ".weight"]
        assert torch.equal(mask | (sp.dense_weight(name) == 0), torch.ones_like(mask))


def test_bad_input():
    w = torch.randn(8, 24)
    with pytest.raises(ValueError, match="`block_size` must divide the 24 channels"):
        search_channel_permutation(w, 2, 4, block_size=16)
    with pytest.raises(ValueError, match="`m`=8 must divide `block_size` \\(12\\)"):
        search_channel_permutation(w, 2, 8, block_size=12)
    with pytest.raises(ValueError, match="`weight` must be 2-D"):
        search_channel_permutation(torch.randn(2, 3, 4), 2, 4)
    with pytest.raises(ValueError, match="`n` must be < `m`"):
        permute_for_nm(_gpt(), 4, 4)
    with pytest.raises(ValueError, match="must name nn.Linear layers"):
        permute_for_nm(_gpt(), 2, 4, sites=[PermutationSite(consumers=["blocks.0.ln_1"], producers=[])])
    with pytest.raises(ValueError, match="has 64 input channels, `perm` has 32"):
        apply_channel_permutation(_gpt(), PermutationSite(consumers=["blocks.0.attn.out_proj"], producers=[]),
                                  torch.arange(32))
    with pytest.raises(ValueError, match="divides the reduction dim of none"):
        prune_to_nm(nn.Sequential(nn.Linear(6, 4)), 2, 4)
