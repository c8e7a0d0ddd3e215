"""The embedded demo: deterministic offline data, model shapes, learning."""

from __future__ import annotations

import socket

import pytest
import torch

from sparsetrain.demo import GPT, CorpusConfig, GPTConfig, MLPClassifier, make_classification, make_datasets
from sparsetrain.demo.data import load_corpus, stdlib_files
from sparsetrain.demo.loader import ResumableLoader


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the demo data must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_corpus_is_deterministic_and_offline(no_network):
    load_corpus.cache_clear()
    a = load_corpus(50_000)
    load_corpus.cache_clear()
    b = load_corpus(50_000)
    assert a == b and len(a) == 50_000
    files = stdlib_files()
    assert files == sorted(files, key=lambda p: p.as_posix()) or len(files) > 100
    assert not any("site-packages" in p.parts for p in files)


def test_split_is_disjoint_tail():
    cfg = CorpusConfig(byte_budget=50_000, block_size=32, val_fraction=0.1)
    train, val = make_datasets(cfg)
    corpus = load_corpus(50_000)
    assert val.data.numel() == 5_000 and train.data.numel() == 45_000
    assert bytes(val.data.tolist()) == corpus[-5_000:]
    x, y = train[3]
    assert x.shape == y.shape == (32,) and torch.equal(x[1:], y[:-1])


@pytest.mark.parametrize(("kwargs", "match"), [({"byte_budget": 10}, "byte_budget"), ({"block_size": 1}, "block_size"),
                                               ({"val_fraction": 0.0}, "val_fraction")])
def test_corpus_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CorpusConfig(**kwargs)


def test_gpt_shapes_and_widths():
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, d_model=64)
    model = GPT(cfg)
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            assert mod.in_features % 64 == 0, name
    with pytest.raises(ValueError, match="exceeds `block_size`"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(("kwargs", "match"), [({"d_model": 96}, "d_model"), ({"n_head": 3}, "n_head"),
                                               ({"n_layer": 0}, "n_layer"), ({"dropout": 1.0}, "dropout")])
def test_gpt_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


def test_gpt_is_causal():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, d_model=64)).eval()
    x = torch.randint(0, 256, (1, 16))
    y = x.clone()
    y[0, 10] = (y[0, 10] + 1) % 256
    assert torch.allclose(model(x)[0, :10], model(y)[0, :10])
    assert not torch.allclose(model(x)[0, 10:], model(y)[0, 10:])


def test_gpt_loss_decreases():
    torch.manual_seed(0)
    train, _ = make_datasets(CorpusConfig(byte_budget=50_000, block_size=32))
    model = GPT(GPTConfig(block_size=32, d_model=64, n_layer=1, n_head=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = [torch.stack(t) for t in zip(*(train[i] for i in range(16)))]
    first = model.loss(*batch).item()
    for _ in range(30):
        opt.zero_grad()
        loss = model.loss(*batch)
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first


def test_mlp_task_learns():
    torch.manual_seed(0)
    x, y = make_classification(512, seed=1).tensors
    model = MLPClassifier()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    assert (model(x).argmax(-1) == y).float().mean() > 0.9
    assert torch.equal(make_classification(64, seed=3).tensors[0], make_classification(64, seed=3).tensors[0])


def test_resumable_loader_shards_and_resumes():
    data = torch.utils.data.TensorDataset(torch.arange(40))
    ranks = [list(ResumableLoader(data, 4, rank=r, world_size=2, seed=1)) for r in range(2)]
    seen = torch.cat([b[0] for r in ranks for b in r])
    assert len(ranks[0]) == 5 and sorted(seen.tolist()) == list(range(40))  # disjoint, complete

    uninterrupted = ResumableLoader(data, 4, seed=2)

    def one_epoch():
        batches = []
        for (b,) in uninterrupted:
            batches.append(b)
            uninterrupted.mark_consumed()
        return torch.cat(batches)

    epochs = [one_epoch() for _ in range(2)]
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled each epoch

    first = ResumableLoader(data, 4, seed=2)
    it = iter(first)
    for _ in range(3):
        next(it)
        first.mark_consumed()
    resumed = ResumableLoader(data, 4, seed=2)
    resumed.load_state_dict(first.state_dict())
    rest = torch.cat([b[0] for b in resumed])
    assert torch.equal(rest, epochs[0][12:])
    with pytest.raises(ValueError, match="`rank`"):
        ResumableLoader(data, 4, rank=2, world_size=2)
