import json
import math

import pytest
import torch

from sparsetrain.runtime import DispatchTable, LayerPlan, Timing, cache_dir, clear_cache
from sparsetrain.runtime.table import EAGER_MARGIN, _key_path, bucket_index

KEY = {"gpu": "Test GPU", "capability": "9.0", "torch": "2.11.0", "cuda": "13.0", "cusparselt": 602}
BF16 = torch.bfloat16


def timing(dense, sparse, *, dense_graph=None, sparse_graph=None, alg_id=0):
    return Timing(dense_eager_ms=dense, dense_graph_ms=dense if dense_graph is None else dense_graph,
                  sparse_eager_ms=sparse, sparse_graph_ms=sparse if sparse_graph is None else sparse_graph,
                  alg_id=alg_id)


def filled(buckets=(1, 16, 512, 4096), **kw):
    table = DispatchTable(key=KEY, buckets=buckets, **kw)
    # eager: 2:4 pays 0.8 ms of host time; graph: it wins from 512 tokens on
    for b, (dense, sparse) in zip(buckets, [(0.01, 0.04), (0.02, 0.05), (0.10, 0.08), (0.60, 0.40)]):
        table.set((4096, 4096), BF16, b, timing(dense, sparse + 0.8, dense_graph=dense, sparse_graph=sparse,
                                                alg_id=b % 7))
    return table


def test_bucket_index_is_the_largest_bucket_not_above():
    buckets = (1, 16, 512, 4096)
    assert [bucket_index(buckets, t) for t in (1, 15, 16, 511, 512, 4095, 4096, 10**6)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert bucket_index((16, 32), 1) == 0


def test_plan_follows_the_timings_per_mode():
    plan = filled().plan((4096, 4096), BF16)
    assert plan.buckets == (1, 16, 512, 4096)
    assert plan.sparse_graph == (False, False, True, True)
    assert plan.sparse_eager == (False, False, False, False)
    assert plan.alg_ids == (1, 2, 1, 1)
    table = filled()
    assert table.sparse_wins((4096, 4096), BF16, 600, graph=True)
    assert not table.sparse_wins((4096, 4096), BF16, 500, graph=True)
    assert not table.sparse_wins((4096, 4096), BF16, 600, graph=False)


def test_margin_keeps_dense_on_a_near_tie():
    table = DispatchTable(key=KEY, buckets=(16,), margin=0.05)
    table.set((64, 64), BF16, 16, timing(1.0, 0.96))
    assert table.plan((64, 64), BF16).sparse_graph == (False,)
    table.set((64, 64), BF16, 16, timing(1.0, 0.94))
    assert table.plan((64, 64), BF16).sparse_graph == (True,)


def test_eager_decisions_need_the_eager_margin():
    # 5% faster is enough in a graph (margin 2%), not eagerly, where timings are host-bound and noisy
    table = DispatchTable(key=KEY, buckets=(16,))
    table.set((64, 64), BF16, 16, timing(1.0, 0.95))
    plan = table.plan((64, 64), BF16)
    assert (plan.sparse_graph, plan.sparse_eager) == ((True,), (False,))
    table.set((64, 64), BF16, 16, timing(1.0, 1.0 - EAGER_MARGIN - 0.01))
    assert table.plan((64, 64), BF16).sparse_eager == (True,)


def test_unmeasured_buckets_and_failed_sparse_run_dense():
    table = DispatchTable(key=KEY, buckets=(1, 16, 512))
    table.set((64, 64), BF16, 512, timing(1.0, None))
    plan = table.plan((64, 64), BF16)
    assert plan.sparse_graph == plan.sparse_eager == (False, False, False)
    assert plan.alg_ids == (None, None, 0)
    assert table.missing((64, 64), BF16) == [1, 16]
    assert table.plan((128, 64), torch.float16).alg_ids == (None, None, None)


def test_layer_plan_dense_and_sparse_anywhere_from_min_tokens():
    plan = LayerPlan(buckets=(1, 16, 512), sparse_eager=(False, False, True), sparse_graph=(False, True, True),
                     alg_ids=(None, None, None))
    assert plan.runs_dense_anywhere(1) and plan.runs_dense_anywhere(16)
    assert not plan.runs_dense_anywhere(512)
    assert plan.runs_sparse_anywhere(1)
    never = LayerPlan(buckets=(1,), sparse_eager=(False,), sparse_graph=(False,), alg_ids=(None,))
    assert not never.runs_sparse_anywhere()


def test_json_round_trip(tmp_path):
    table = filled(margin=0.03)
    table.set((11008, 4096), torch.float16, 16, timing(0.5, None))
    path = table.save(tmp_path / "t.json")
    back = DispatchTable.load(path, key=KEY)
    assert back.to_dict() == table.to_dict()
    assert back.plan((4096, 4096), BF16) == table.plan((4096, 4096), BF16)
    assert back.margin == 0.03 and back.path == path
    with pytest.raises(ValueError, match="measured for"):
        DispatchTable.load(path, key={**KEY, "gpu": "Other GPU"})


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _valid():
    return filled().to_dict()


CORRUPT = {
    "not json": lambda: "{not json",
    "truncated": lambda: json.dumps(_valid())[:50],
    "a list": lambda: "[]",
    "newer version": lambda: json.dumps({**_valid(), "version": DispatchTable.VERSION + 1}),
    "older version": lambda: json.dumps({**_valid(), "version": DispatchTable.VERSION - 1}),
    "other key": lambda: json.dumps({**_valid(), "key": {**KEY, "torch": "9.9"}}),
    "other buckets": lambda: json.dumps({**_valid(), "buckets": [1, 2]}),
    "unsorted buckets": lambda: json.dumps({**_valid(), "buckets": [16, 1, 512, 4096]}),
    "negative time": lambda: json.dumps(_valid()).replace('"dense_eager_ms": 0.01', '"dense_eager_ms": -1'),
    "NaN time": lambda: json.dumps(_valid()).replace('"dense_eager_ms": 0.01', '"dense_eager_ms": NaN'),
    "string time": lambda: json.dumps(_valid()).replace('"dense_eager_ms": 0.01', '"dense_eager_ms": "fast"'),
    "missing field": lambda: json.dumps(_valid()).replace(', "alg_id": 1}', '}', 1),
    "bad entry name": lambda: json.dumps(_valid()).replace("bfloat16:4096x4096", "float32:4096x4096"),
    "bad bucket": lambda: json.dumps(_valid()).replace('"16": {', '"sixteen": {'),
    "bucket not in buckets": lambda: json.dumps(_valid()).replace('"16": {', '"17": {'),
    "negative alg": lambda: json.dumps(_valid()).replace('"alg_id": 1', '"alg_id": -1', 1),
    "binary": lambda: "\udcff",
}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_cache_is_ignored_with_a_warning_then_overwritten(name):
    path = _key_path(KEY)
    if name == "binary":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xfe\x00garbage")
    else:
        _write(path, CORRUPT[name]())
    with pytest.warns(UserWarning, match="ignoring the dispatch table cache"):
        table = DispatchTable.cached(key=KEY, buckets=(1, 16, 512, 4096))
    assert table.path == path and table.key == KEY
    assert table.missing((4096, 4096), BF16) == [1, 16, 512, 4096]  # measured again, from nothing
    fresh = filled()
    fresh.path = path
    fresh.save()
    assert DispatchTable.cached(key=KEY, buckets=(1, 16, 512, 4096)).to_dict() == fresh.to_dict()


def test_cache_lives_under_the_cache_dir_keyed_by_device_and_clears(tmp_path):
    assert cache_dir() == tmp_path / "cache"
    a, b = _key_path(KEY), _key_path({**KEY, "cusparselt": 603})
    assert a.parent == cache_dir() / "runtime" and a != b
    table = filled()
    table.save(a)
    table.save(b)
    assert DispatchTable.cached(key=KEY, buckets=(1, 16, 512, 4096)).to_dict() == table.to_dict()
    assert clear_cache() == 2
    assert not a.exists() and not b.exists()


def test_measure_needs_nothing_when_complete_and_cuda_otherwise():
    table = filled()
    assert table.measure([((4096, 4096), BF16)]) == 0
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            table.measure([((64, 64), BF16)])


@pytest.mark.parametrize("kwargs, match", [
    ({"buckets": ()}, "buckets"),
    ({"buckets": (16, 1)}, "buckets"),
    ({"buckets": (0, 1)}, "buckets"),
    ({"buckets": "16"}, "buckets"),
    ({"margin": 1.0}, "margin"),
    ({"margin": -0.1}, "margin"),
])
def test_table_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DispatchTable(**kwargs)


def test_set_validation():
    table = DispatchTable(buckets=(1, 16))
    with pytest.raises(ValueError, match="tokens"):
        table.set((64, 64), BF16, 8, timing(1.0, 1.0))
    with pytest.raises(ValueError, match="dtype"):
        table.set((64, 64), torch.float32, 16, timing(1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        table.set((64,), BF16, 16, timing(1.0, 1.0))
    with pytest.raises(TypeError, match="Timing"):
        table.set((64, 64), BF16, 16, {"dense_eager_ms": 1.0})
    for bad in (0.0, -1.0, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match="dense_eager_ms"):
            timing(bad, 1.0)
    with pytest.raises(ValueError, match="alg_id"):
        timing(1.0, 1.0, alg_id=-2)
