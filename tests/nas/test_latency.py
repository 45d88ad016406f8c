"""The latency model: table entries, cache per machine, calibration and validation arithmetic,
the roofline prediction, and the extracted network's ONNX export (ORT parity)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from slimkit.analyze.hardware import load_profile
from slimkit.nas import ArchNet, CNNSpace, LatencyTable, StageSpace, roofline_ms, validate
from slimkit.nas import latency as lat
from slimkit.nas.latency import arch_keys, space_keys


def small_space() -> CNNSpace:
    return CNNSpace(input_size=16, stem=8, head=16, stages=[
        StageSpace(widths=[8, 12], depths=[1, 2], kernels=[3], expands=[2]),
        StageSpace(widths=[12, 16], depths=[1, 2], kernels=[3], expands=[2], stride=2),
    ])  # fmt: skip


def test_every_arch_is_made_of_table_entries():
    space = CNNSpace()
    keys = set(space_keys(space))
    assert len(keys) == len(space_keys(space)) == 160
    rng = random.Random(0)
    for arch in [space.largest(), space.smallest(), *[space.sample(rng) for _ in range(30)]]:
        got = arch_keys(space, arch)
        assert set(got) <= keys
        assert len(got) == 2 + sum(s.depth for s in arch.stages)


def test_measured_table_is_cached_and_predicts(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    space = small_space()
    # 3 rounds (their lower quartile): with one, a spike in the call timing zeroed the entries
    table = LatencyTable.measure(space, runs=5, rounds=3)
    assert len(table.entries) == len(space_keys(space)) == 12
    # entries are net of one session call, which a network pays once
    assert table.call_ms > 0 and all(v >= 0 for v in table.entries.values())
    assert sum(v > 0 for v in table.entries.values()) >= 10
    arch = space.largest()
    assert table.predict(space, arch) == pytest.approx(
        table.call_ms + sum(table.entries[":".join(map(str, k))] for k in arch_keys(space, arch))
    )

    def no_timing(*_a, **_k):
        raise AssertionError("the cached table was measured again")

    monkeypatch.setattr(lat, "ort_times", no_timing)
    again = LatencyTable.measure(space, runs=3, rounds=1)
    assert again.entries == table.entries and again.key == table.key
    assert list((tmp_path / "nas").glob("latency-*.json"))


def test_calibration_fits_scale_and_offset_and_validation_reports_error():
    space = small_space()
    keys = space_keys(space)
    table = LatencyTable({":".join(map(str, k)): 0.01 * (i + 1) for i, k in enumerate(keys)})
    archs = [space.largest(), space.smallest(), space.uniform(0), space.uniform(1)]
    measured = [0.8 * table.raw(space, a) + 0.05 for a in archs]
    fitted = table.calibrate(space, archs, measured)
    assert fitted["scale"] == pytest.approx(0.8) and fitted["offset"] == pytest.approx(0.05)
    v = validate(lambda a: table.predict(space, a), space, archs,
                 measured=[m * 1.1 for m in measured])  # fmt: skip
    # predicted = measured / 1.1: relative error 1 - 1/1.1 everywhere
    assert v.median_error == pytest.approx(1 - 1 / 1.1)
    assert v.to_dict()["n"] == 4


def test_roofline_prediction_grows_with_the_network():
    space = CNNSpace()
    hw = load_profile("raspberry_pi_4")
    small, big = roofline_ms(space, space.smallest(), hw), roofline_ms(space, space.largest(), hw)
    assert 0 < small < big


def test_extracted_network_exports_to_onnx_with_parity(tmp_path):
    from slimkit.export.onnx import export_onnx
    from slimkit.export.ort import ort_session, run_session

    space = small_space()
    torch.manual_seed(0)
    net = ArchNet(space, space.sample(random.Random(3))).eval()
    x = torch.randn(2, 3, 16, 16)
    export_onnx(net, tmp_path / "m.onnx", example_inputs=(x,))
    (out,) = run_session(ort_session(tmp_path / "m.onnx"), [x])
    with torch.no_grad():
        ref = net(x).numpy()
    # float ONNX vs PyTorch: measured max abs error ~1e-6
    assert np.abs(out - ref).max() < 1e-4


def test_a_stale_cached_table_is_measured_again(tmp_path, monkeypatch):
    """A cached table that mispredicts the networks measured now (half its entries 10x too slow,
    half 10x too fast, as if cached on a busy machine) is measured again once and the cache
    replaced; a cached table that predicts them is kept. The whole networks' "measured" times
    are the true table's predictions here, so which table is stale does not depend on timing."""
    import json

    from slimkit.nas import api
    from slimkit.nas.api import STALE_ERROR, calibrated_table

    monkeypatch.setenv("SLIMKIT_CACHE_DIR", str(tmp_path))
    space = small_space()
    truth = LatencyTable.measure(space, runs=3, rounds=1)  # cached
    monkeypatch.setattr(api, "measure_archs",
                        lambda sp, archs, threads=1: [truth.raw(sp, a) for a in archs])  # fmt: skip
    (path,) = (tmp_path / "nas").glob("latency-*.json")
    good = json.loads(path.read_text())
    items = sorted(good["entries"].items())
    stale = {**good, "entries": {k: v * (10.0 if i % 2 else 0.1) for i, (k, v) in enumerate(items)}}
    path.write_text(json.dumps(stale))
    table, check = calibrated_table(space, n_calib=4, n_val=4)
    assert "measured again" in table.meta["refreshed"], table.meta
    assert f"over {STALE_ERROR:.0%}" in table.meta["refreshed"]
    assert json.loads(path.read_text())["entries"] != stale["entries"]  # the cache replaced

    path.write_text(json.dumps(good))
    kept, check = calibrated_table(space, n_calib=4, n_val=4)
    assert check.median_error < 1e-6  # the true table predicts its own networks exactly
    assert kept.meta.get("cached") and "refreshed" not in kept.meta
    assert kept.entries == good["entries"]
