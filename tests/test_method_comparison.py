"""Three methods side by side: the table's verdicts, early refusal of a bad
override, and a tiny real comparison (two seeds run side by side through
tools/quickstart.py and VISSL's trainer)."""

import json

import pytest

from swav_vissl_plugin.method_comparison import BARS, compare, markdown, method_verdicts, row


def metrics(linear, knn, used, empty_epochs=None, seconds=100.0):
    """A run's metrics.json, as the quickstart writes it (only the keys read)."""
    return {
        "linear_probe_top1": {"pretrained": linear, "random_init": 70.0},
        "knn_top1": knn, "prototypes_used": used, "num_prototypes": 100,
        "clusters": None if empty_epochs is None else {"empty_epochs_max": empty_epochs, "empty_last_epoch": 0},
        "final_loss": 2.0, "ln_k": 4.605, "collapse_warnings": [], "pretrain_seconds": seconds,
        "total_seconds": seconds + 20,
    }


def test_verdict_is_the_worst_seed_against_the_methods_bar():
    rows = [
        row("swav", 0, metrics(98.0, 96.0, 100)),
        row("swav", 1, metrics(97.4, 95.6, 94)),
        row("deepclusterv2", 0, metrics(96.0, 94.0, 99, empty_epochs=1)),
        row("deepclusterv2", 1, metrics(95.5, 93.0, 97, empty_epochs=0, seconds=300.0)),
        # SeLa-v2: good accuracy on both seeds, but a cluster empty two epochs running on one
        row("selav2", 0, metrics(96.0, 94.0, 99, empty_epochs=0)),
        row("selav2", 1, metrics(96.5, 94.5, 99, empty_epochs=2)),
    ]
    v = {x["method"]: x for x in method_verdicts(rows)}
    assert list(v) == ["swav", "deepclusterv2", "selav2"]
    assert v["swav"]["clears_bar"] and v["swav"]["empty_epochs_max"] is None
    assert (v["deepclusterv2"]["linear_worst"], v["deepclusterv2"]["knn_worst"]) == (95.5, 93.0)
    assert v["deepclusterv2"]["prototypes_used_min"] == 97 and v["deepclusterv2"]["pretrain_seconds_max"] == 300.0
    assert v["deepclusterv2"]["clears_bar"]
    assert not v["selav2"]["clears_bar"]  # the empty cluster alone fails it
    # one seed under the kNN bar fails the method, whatever the mean
    rows[3] = row("deepclusterv2", 1, metrics(99.0, BARS["deepclusterv2"]["knn"] - 0.1, 97, empty_epochs=0))
    assert not {x["method"]: x for x in method_verdicts(rows)}["deepclusterv2"]["clears_bar"]
    table = markdown(rows, method_verdicts(rows), threads=1)
    assert "| selav2 | 2 | 96.0 % (96.2) | 94.0 % (94.2) | 99/100 | 2 |" in table
    assert table.count("| NO |") == 2


def test_bad_override_stops_before_any_run(tmp_path):
    from swav_vissl_plugin.config import ConfigError

    with pytest.raises(ConfigError, match="BATCHSIZE_PER_REPLICA"):
        compare(tmp_path / "cmp", ["swav", "deepclusterv2"], [0],
                overrides=["config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=0"])
    assert not list((tmp_path / "cmp").glob("*-seed*"))
    with pytest.raises(ValueError, match="nope"):
        compare(tmp_path / "cmp", ["nope"], [0])


def test_tiny_comparison_runs_seeds_side_by_side(tmp_path):
    out = tmp_path / "cmp"
    result = compare(out, ["deepclusterv2"], [0, 1], jobs=2, overrides=[
        "config.OPTIMIZER.num_epochs=2", "config.DATA.TRAIN.DATA_LIMIT=256",
        "config.SWAV_PLUGIN.MONITOR.KNN.EVERY_N_EPOCHS=1",
    ])
    assert result["threads_per_run"] >= 1 and result["jobs"] == 2
    runs = {r["seed"]: r for r in result["runs"]}
    assert sorted(runs) == [0, 1]
    for seed, r in runs.items():
        saved = json.loads((out / f"deepclusterv2-seed{seed}" / "metrics.json").read_text())
        assert saved["seed"] == seed and saved["method"] == "deepclusterv2"
        # every epoch's labels were read back from the run's log, per head
        assert saved["clusters"]["epochs"] == 2 and saved["clusters"]["empty_epochs_max"] >= 0
        assert r["knn"] is not None and 0 <= r["linear"] <= 100
    # the two seeds trained differently
    assert runs[0]["final_loss"] != runs[1]["final_loss"]
    assert (out / "comparison.md").read_text().count("| deepclusterv2 |") == 3
    # read back, not trained again
    again = compare(out, ["deepclusterv2"], [0, 1])
    assert again["runs"] == result["runs"]
