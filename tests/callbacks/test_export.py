import json

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from sparsetrain.callbacks import NMSparsity, SparseExport

from sparsetrain.cli import main
from sparsetrain.demo import GPT
from sparsetrain.export import load_24, save_24_checkpoint
from sparsetrain.nm import nm_export_checkpoint, nm_export_state_dict
from tests.callbacks.tiny_lm import CFG, one_thread  # noqa: F401 (one_thread: an autouse fixture)
from tests.callbacks.tiny_lm import loader as _loader
from tests.callbacks.tiny_lm import module as _module
from tests.callbacks.tiny_lm import trainer as _trainer

MLP = ("blocks.0.mlp.fc_in", "blocks.0.mlp.fc_out")


class _Snapshot(Callback):
    """The module's state and the sparsifier's masks as they are when training ends, before the export."""

    def __init__(self, nm):
        self.nm = nm

    def on_train_end(self, trainer, pl_module):
        self.state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.masks = {k: v.clone() for k, v in self.nm.sparsifier.masks().items()}


@pytest.mark.parametrize("export_first", [True, False])
def test_fit_exports_the_exact_24_weights(tmp_path, export_first):
    module = _module()
    nm = NMSparsity(n=2, m=4, include=["*.mlp.*"])
    export = SparseExport(tmp_path / "export", dtype="bfloat16")
    trainer = _trainer(4, [export, nm] if export_first else [nm, export])
    trainer.fit(module, _loader())
    assert export.last_export.targets == MLP
    loaded = load_24(tmp_path / "export")
    # NMSparsity finalized the module: its weights are the exact 2:4 weights
    ref = {k[len("model."):]: v.to(torch.bfloat16) if v.is_floating_point() else v
           for k, v in module.state_dict().items()}
    assert list(loaded) == list(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    cfg = json.loads((tmp_path / "export" / "config.json").read_text())
    assert cfg["model_class"] == "sparsetrain.demo.model.GPT" and cfg["dtype"] == "bfloat16"


def test_the_live_model_is_not_changed(tmp_path):
    module = _module()
    nm = NMSparsity(n=2, m=4, include=["*.mlp.*"], finalize=False)
    snap = _Snapshot(nm)
    export = SparseExport(tmp_path / "export")
    _trainer(4, [nm, snap, export]).fit(module, _loader())
    after = module.state_dict()
    assert set(after) == set(snap.state) and all(torch.equal(after[k], v) for k, v in snap.state.items())
    assert all(torch.equal(nm.sparsifier.masks()[k], v) for k, v in snap.masks.items())
    loaded = load_24(tmp_path / "export")
    ref = nm_export_state_dict(snap.state, 2, 4, masks=snap.masks)  # keys such as model.blocks.0.mlp.fc_in.weight
    ref = {k[len("model."):]: v for k, v in ref.items()}
    assert list(loaded) == list(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)
    plain = GPT(CFG)
    load_24(plain, tmp_path / "export")
    x = next(iter(_loader()))[0]
    with torch.no_grad():
        assert torch.equal(plain(x), module(x))


def _checkpoint(tmp_path, **nm_kwargs):
    module = _module()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _trainer(4, [NMSparsity(n=2, m=4, include=["*.mlp.*"], **nm_kwargs), ckpt], tmp_path).fit(module, _loader())
    return tmp_path / "ckpt" / "last.ckpt"


@pytest.mark.parametrize("nm_kwargs", [{}, {"inplace": True}])
def test_export_from_a_lightning_checkpoint(tmp_path, nm_kwargs):
    path = _checkpoint(tmp_path, **nm_kwargs)
    out = save_24_checkpoint(path, tmp_path / "export")
    assert out.targets == MLP
    ref = nm_export_checkpoint(torch.load(path, weights_only=True))
    ref = {k[len("model."):]: v for k, v in ref.items()}
    loaded = load_24(tmp_path / "export")
    assert list(loaded) == list(ref) and all(torch.equal(loaded[k], ref[k]) for k in ref)


def test_cli_export(tmp_path, capsys):
    path = _checkpoint(tmp_path)
    assert main(["export", str(path), "--out", str(tmp_path / "export"), "--dtype", "bfloat16", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "2:4 layers (2):" in out and "the dense checkpoint file" in out and "verified" in out
    assert main(["export", str(path), "--out", str(tmp_path / "export")]) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing.ckpt"), "--out", str(tmp_path / "e2")]) == 2
    assert "is not a file" in capsys.readouterr().err


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(dirpath=3), "`dirpath` must be a path"),
    (dict(dirpath="x", ignore="fc"), "`ignore` must be a list"),
    (dict(dirpath="x", dtype="int8"), "`dtype` must be"),
    (dict(dirpath="x", max_shard_bytes=0), "`max_shard_bytes`"),
    (dict(dirpath="x", prefix=1), "`prefix`"),
])
def test_arguments_are_checked_at_construction(kwargs, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SparseExport(**kwargs)
