"""The progress line: rank 0 only, every N steps, with the components' achieved figures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from sparsetrain.train import ProgressLine, headline_statistics


class _Stats:
    def __init__(self, stats):
        self.stats = stats

    def statistics(self):
        return self.stats


def _drive(line, steps, rank0=True):
    trainer = SimpleNamespace(is_global_zero=rank0, global_step=0, max_steps=steps, world_size=2)
    for step in range(1, steps + 1):
        trainer.global_step = step
        line.on_train_batch_end(trainer, None, {"loss": torch.tensor(2.5 / step)}, (torch.zeros(8, 3), None), 0)


def test_one_line_every_n_steps_with_achieved_figures(capsys):
    comps = [_Stats({"sparsity/global": 0.79, "sparsity/target": 0.8, "sparsity/layer/fc": 0.5}),
             _Stats({"compression/ratio": 41.25, "compression/step": 3.0})]
    _drive(ProgressLine(4, comps), 10)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("  ")[0] for line in lines] == ["step 4/10", "step 8/10", "step 10/10"]
    assert lines[0].split("  ")[1] == "loss 0.625"
    assert "samples/s" in lines[0] and "steps/s" in lines[0]
    assert lines[0].endswith("sparsity/global 0.79  compression/ratio 41.25")


def test_other_ranks_print_nothing(capsys):
    _drive(ProgressLine(1, []), 5, rank0=False)
    assert capsys.readouterr().out == ""


def test_zero_turns_it_off(capsys):
    _drive(ProgressLine(0, []), 5)
    assert capsys.readouterr().out == ""


def test_headline_order_and_bad_every():
    assert list(headline_statistics([_Stats({"compression/ratio": 2.0}), _Stats({"sparsity/global": 0.5})])) == [
        "sparsity/global", "compression/ratio"]
    with pytest.raises(ValueError, match=r"`every_n_steps` must be >= 0, got -1"):
        ProgressLine(-1, [])


@pytest.mark.parametrize(("rank", "shown"), [(0, 1), (1, 0), (3, 0)])
def test_warnings_on_rank_zero_only(rank, shown):
    import warnings

    from sparsetrain.train import warnings_on_rank_zero_only

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with warnings_on_rank_zero_only(rank):
            warnings.warn("layer fc skipped", UserWarning, stacklevel=1)
        warnings.warn("after the block", UserWarning, stacklevel=1)  # the filter does not leak
    assert [str(w.message) for w in caught] == ["layer fc skipped"] * shown + ["after the block"]


def test_single_process_run_prints_progress_and_no_weights_only_notice(tmp_path):
    import subprocess
    import sys

    recipe = tmp_path / "q.yaml"
    recipe.write_text("version: 1\nname: q\nmodel: {name: mlp, hidden: 32}\n"
                      "data: {name: synthetic_classification, n: 512, batch_size: 32}\n"
                      "trainer: {devices: 1, strategy: auto, max_steps: 4, val_check_interval: 2, limit_val_batches: 1,"
                      " checkpoint_every_n_steps: 2, progress_every_n_steps: 2}\n"
                      "callbacks: [{name: dynamic_sparsity, sparsity: 0.5}]\n")
    r = subprocess.run([sys.executable, "-m", "sparsetrain.cli", "train", str(recipe), "--out", str(tmp_path / "run"),
                        "--no-report"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    progress = [line for line in r.stdout.splitlines() if line.startswith("step ")]
    assert [line.split("  ")[0] for line in progress] == ["step 2/4", "step 4/4"]
    assert all(line.endswith("sparsity/global 0.5") for line in progress), progress
    assert "weights_only` was not set" not in r.stderr
    assert (tmp_path / "run" / "checkpoints" / "last.prev.ckpt").is_file()
