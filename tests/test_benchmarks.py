"""The benchmarks of benchmarks/ run at a tiny size, and the implementations
they compare agree (values, not timings: timings are `make bench`'s job,
reported in docs/performance.md).

Also: the multi-crop transform's output distribution equals the
straightforward torchvision/PIL pipeline's (the benchmark's baseline) on
natural photographs: per crop size, channel means and standard deviations
and the spread of per-crop means agree within sampling error.
"""

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
sys.path.insert(0, BENCH)

import _common  # noqa: E402
import bench_larc  # noqa: E402
import bench_loss  # noqa: E402
import bench_scaling  # noqa: E402
import bench_transforms  # noqa: E402
from tolerances import grad_rtol, grad_scale, loss_rtol, rtol, terms  # noqa: E402


def _read(path):
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------- harness
def test_interleaved_rotates_and_measures_both_clocks():
    calls = []
    fns = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    t = _common.interleaved(fns, rounds=4, number=2, warmup=1)
    assert set(t) == {"wall", "cpu"}
    assert all(len(t[k][n]) == 4 for k in t for n in fns)
    assert calls[:2] == ["a", "b"]  # warm-up
    # round 1 starts with b: the order rotates
    assert calls[2:6] == ["a", "a", "b", "b"] and calls[6:10] == ["b", "b", "a", "a"]
    a = _common.analyse(t, [("a", "b")])
    assert set(a["cpu"]["ratios"]) == {"a/b"}
    assert a["wall"]["summary"]["a"]["rounds"] == 4


# -------------------------------------------------------------------- loss
def test_bench_loss_tiny_runs_and_implementations_agree(tmp_path):
    out = tmp_path / "loss.json"
    bench_loss.main(["--tiny", "--json", str(out)])
    res = _read(out)
    assert set(res["cases"]) == {"no_queue", "queue"}
    # float32 rounding of each implementation (bench_loss.TINY, cosine scores):
    # the loss relative to max(1, |loss|), the gradient to its terms' scale;
    # a queue is scored in float32 (dim-term products, dim / epsilon in the
    # exponents) - the larger, queue case bounds both
    t = bench_loss.TINY
    size = (t["batch"], t["k"], t["num_crops"], 2, 3)
    queue_scores = rtol(terms(t["dim"]) / 0.05)
    loss_tol = loss_rtol(*size, queue=t["queue"]) + queue_scores
    grad_tol = (grad_rtol(*size, queue=t["queue"]) + queue_scores) * grad_scale(t["batch"], t["num_crops"])
    for case in res["cases"].values():
        v = case["values"]
        ref = v["float64_reference"]
        for name in ("plugin", "vissl", "straightforward"):
            assert v[name]["abs_diff_vs_float64"] <= loss_tol * max(1.0, abs(ref)), (name, v[name])
            assert v[name]["grad_max_abs_diff_vs_float64"] <= grad_tol, (name, v[name])
        for pair, diff in v["pairwise_abs_diff"].items():
            assert diff <= 2 * loss_tol * max(1.0, abs(ref)), (pair, diff)
        for kind in ("cpu", "wall"):
            assert set(case["timing"][kind]["summary"]) == {"plugin", "vissl", "straightforward"}


def test_release_formulas_equal_plugin_at_recipe_shape_with_queue():
    """The benchmark's baseline is the loss the plugin computes (fp32, queue)."""
    from swav_vissl_plugin.sinkhorn import swav_loss

    emb, scores, protos, queue = bench_loss.make_inputs(6, 4, 37, 8, 12, seed=3)
    rel = bench_loss.ReleaseLoss(4, [0, 1], 0.1, 0.05, 3, queue.clone())
    s1 = scores.clone().requires_grad_(True)
    l1 = rel(emb, s1, protos)
    l1.backward()
    s2 = scores.clone().requires_grad_(True)
    qs = [queue[i] @ protos.t() for i in range(2)]
    l2 = swav_loss(s2, 4, [0, 1], 0.1, 0.05, 3, queue_scores=qs)
    l2.backward()
    # two float32 implementations (batch 6, 4 crops, K 37, queue 12, dim 8):
    # either one's rounding
    size = (6, 37, 4, 2, 3)
    queue_scores = rtol(terms(8) / 0.05)
    loss_tol = 2 * (loss_rtol(*size, queue=12) + queue_scores)
    assert abs(float(l1) - float(l2)) <= loss_tol * max(1.0, abs(float(l1)))
    atol = 2 * (grad_rtol(*size, queue=12) + queue_scores) * grad_scale(6, 4)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=0, atol=atol)


# -------------------------------------------------------------------- LARC
def test_bench_larc_tiny_runs_and_steps_agree(tmp_path):
    out = tmp_path / "larc.json"
    bench_larc.main(["--tiny", "--json", str(out)])
    res = _read(out)
    # the fused step against the loop, relative to each tensor's scale, 3
    # steps: 2 roundings each (a multiply-add against two) and LARC's norms
    # (216 terms at most in the tiny set) on a step of trust x lr x |w|
    tol = 3 * rtol(2, bench_larc.TRUST * bench_larc.LR * terms(216))
    assert res["values"]["max_rel_diff"] <= tol, res["values"]
    assert res["values"]["within_1e-6"]  # the benchmark's own flag (1e-6 >= tol)
    assert res["params"]["tensors"] > 5


def test_bench_larc_parameter_set_is_resnet50_plus_head():
    shapes = bench_larc.swav_resnet50_params()
    n = sum(math.prod(s) for _, s in shapes)
    # ResNet-50 without fc: 23.5 M; head 2048x2048 + BN + 2048x128 + 3000x128 prototypes
    assert 28.0e6 < n < 28.8e6
    assert ("prototypes.weight", (3000, 128)) in shapes


# -------------------------------------------------------------- transforms
def test_bench_transforms_tiny_runs_and_shapes_agree(tmp_path):
    out = tmp_path / "tr.json"
    bench_transforms.main(["--tiny", "--json", str(out), "--rounds", "2", "--images-per-round", "1",
                           "--stages", "2"])
    res = _read(out)
    shapes = res["shapes"]
    assert shapes["plugin"] == shapes["plugin_numpy_colour"] == shapes["vissl"] == shapes["straightforward"]
    assert len(shapes["plugin"]) == 4
    assert "plugin/plugin_numpy_colour" in res["timing"]["cpu"]["ratios"]
    stages = res["stages_ms_per_image"]
    for step in ("decode", "sample_params", "resize", "jitter + grayscale (compiled)", "blur",
                 "ToTensor + Normalize", "(straightforward pipeline)"):
        assert stages[step] >= 0.0, step


def test_multicrop_output_distribution_matches_straightforward_pipeline():
    """Same augmentation distribution, seen in the normalised outputs: per
    crop size, channel mean and std, and the spread of per-crop means, of
    the plugin and of the torchvision/PIL pipeline over 120 images agree
    within sampling error (4.5 standard errors; the per-crop means are the
    independent samples), and the distributions of the per-crop channel
    means and standard deviations pass a two-sample Kolmogorov-Smirnov test
    (p > 1e-4)."""
    from scipy.stats import ks_2samp

    cfg = dict(nmb_crops=[2, 6], size_crops=[32, 16], min_scale_crops=[0.14, 0.05], max_scale_crops=[1.0, 0.14])
    jpegs = bench_transforms.sample_jpegs((160, 120))
    runs = bench_transforms.pipelines(cfg)
    n_images = 120
    ours = bench_transforms.output_stats(runs["plugin"], jpegs, n_images, seed=1)
    ref = bench_transforms.output_stats(runs["straightforward"], jpegs, n_images, seed=2)
    for size in (32, 16):
        a, b = ours[size], ref[size]
        assert a["crops"] == b["crops"]
        n = a["crops"]
        for c in range(3):
            # means: the per-crop means are i.i.d. with sd crop_mean_sd
            se = math.sqrt((a["crop_mean_sd"][c] ** 2 + b["crop_mean_sd"][c] ** 2) / n)
            assert abs(a["mean"][c] - b["mean"][c]) <= 4.5 * se, (size, c, a["mean"], b["mean"], se)
            # std over all pixels: within 10 % (crop-level sampling dominates)
            assert abs(a["std"][c] - b["std"][c]) <= 0.1 * b["std"][c], (size, c, a["std"], b["std"])
            # spread of per-crop means (crop geometry, jitter, grayscale)
            assert abs(a["crop_mean_sd"][c] - b["crop_mean_sd"][c]) <= 0.2 * b["crop_mean_sd"][c]
            for key in ("crop_means", "crop_stds"):
                x = [v[c] for v in a[key]]
                y = [v[c] for v in b[key]]
                assert ks_2samp(x, y).pvalue > 1e-4, (size, c, key)


# ----------------------------------------------------------------- scaling
def test_bench_scaling_tiny_runs(tmp_path):
    out = tmp_path / "scaling.json"
    bench_scaling.main(["--tiny", "--json", str(out)])
    res = _read(out)
    assert {(r["kind"], r["B"], r["K"]) for r in res["rows"]} == {
        (kind, b, k) for kind in ("sinkhorn", "loss") for b in (4, 8) for k in (10, 20)
    }
    assert not res["skipped"]


def test_scaling_exponent_fit_recovers_a_power_law():
    rows = [{"B": b, "K": k, "t": 3.0 * b ** 1.0 * k ** 0.5} for b in (2, 4, 8) for k in (10, 100, 1000)]
    fit = bench_scaling.fit_exponents(rows, "t")
    assert abs(fit["B"] - 1.0) < 1e-9 and abs(fit["K"] - 0.5) < 1e-9


# ------------------------------------------------------- train step, report
@pytest.mark.skipif(os.cpu_count() is None, reason="needs os.cpu_count")
def test_bench_train_step_tiny_runs_both_configs(tmp_path):
    import bench_train_step

    out = tmp_path / "train.json"
    bench_train_step.main(["--tiny", "--json", str(out), "--workdir", str(tmp_path / "w")])
    res = _read(out)
    for kind in ("plugin", "vissl"):
        assert res["timing"]["wall"]["summary"][kind]["iterations"] >= 1
        losses = res["losses"][kind][0]
        assert losses and all(math.isfinite(x) for x in losses)


def test_run_all_report_keeps_other_sections(tmp_path):
    import run_all

    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\n## k-means\n\ntheirs\n")
    run_all.update_doc(str(doc), "RESULTS-1")
    text = doc.read_text()
    assert "## k-means\n\ntheirs" in text and "RESULTS-1" in text
    run_all.update_doc(str(doc), "RESULTS-2")
    text = doc.read_text()
    assert "RESULTS-1" not in text and "RESULTS-2" in text and "theirs" in text
    assert text.count(run_all.BEGIN) == 1 and text.count(run_all.END) == 1


# ------------------------------------------------- GPU training benchmark
def _small_cnn_forward_flops(widths, crops, batch, head):
    """Forward FLOPs (2 per multiply-add) of the plugin's small CNN trunk
    (3x3 stem at full resolution, then per stage conv3x3 stride 2, conv3x3,
    1x1 stride-2 shortcut) and the SwAV head, summed over the crops; and the
    stem's share (no input gradient is computed for it)."""
    w0, w1, w2 = widths
    per_pixel = 2 * 3 * 9 * w0  # stem, at S x S
    stages = [(w0, w0), (w0, w1), (w1, w2)]
    trunk_per_s2 = 0.0
    for i, (cin, cout) in enumerate(stages):
        area = 1 / 4 ** (i + 1)  # (S / 2^(i+1))^2 / S^2
        trunk_per_s2 += area * 2 * (cin * 9 * cout + cout * 9 * cout + cin * cout)
    total, stem = 0.0, 0.0
    for n, s in crops:
        total += n * batch * (per_pixel + trunk_per_s2) * s * s
        stem += n * batch * per_pixel * s * s
    rows = batch * sum(n for n, _ in crops)
    total += rows * 2 * (head["in_dim"] * head["hidden_mlp"] + head["hidden_mlp"] * head["feat_dim"]
                         + head["feat_dim"] * head["nmb_prototypes"])
    return total, stem


def test_bench_gpu_train_tiny_cpu_variants_flops_and_projection(tmp_path):
    import bench_gpu_train

    out = tmp_path / "gpu_train.json"
    bench_gpu_train.main(["--device", "cpu", "--tiny", "--workers", "1", "--json", str(out)])
    res = _read(out)
    s = res["settings"]
    by = {(v["name"], v["data"]): v for v in res["variants"]}
    # every precision x layout on synthetic crops, then the loader, then compile
    for precision in ("fp16+GradScaler", "bf16", "fp32"):
        for layout in ("channels_last", "NCHW"):
            assert (f"{precision}/{layout}", "synthetic") in by
    for v in res["variants"]:
        assert v["status"] in ("measured", "skipped"), v
        if v["status"] == "skipped":
            assert len(v["reason"]) > 10, v
            continue
        assert v["images_per_s"] > 0 and v["median_s"] > 0 and v["iters"] == s["iters"]
        assert abs(v["images_per_s"] - s["batch"] / v["median_s"]) < 1e-9 * v["images_per_s"]
        assert v["loss_finite"] and all(math.isfinite(x) for x in v["losses"])
        assert v["flops_per_iteration"] > 0 and v["mfu"] == "n/a"  # no peak for this CPU
    measured = [v for v in res["variants"] if v["status"] == "measured"]
    assert {v["precision"] for v in measured if v["data"] == "synthetic"} == {"bf16", "fp32"}
    assert all("GPU" in by[(f"fp16+GradScaler/{lay}", "synthetic")]["reason"] for lay in ("channels_last", "NCHW"))
    assert any(v["data"] == "pipeline" for v in measured)
    assert all(v["status"] == "skipped" for v in res["variants"] if v["compile"])
    assert res["pipeline_alone"]["images_per_s"] > 0

    # FLOPs: forward + backward = 3 x forward, less the stem's input gradient
    assert s["trunk"]["name"] == "swav_plugin_small_cnn"
    fwd, stem = _small_cnn_forward_flops(s["trunk"]["widths"], list(zip(s["nmb_crops"], s["size_crops"])),
                                         s["batch"], s["head"])
    assert abs(res["flops_per_iteration"] - (3 * fwd - stem)) <= 0.01 * fwd

    # projection: ImageNet's 1,281,167 images on 8 GPUs at the best end-to-end
    # rate, against the release's 3 min 40 s per epoch on 64 V100 (model zoo)
    best = max(v["images_per_s"] for v in measured if v["data"] == "pipeline")
    pr = res["projection"]
    epoch_s = 1281167 / (8 * best)
    assert pr["images_per_s_per_gpu"] == best
    assert abs(pr["epoch_s"] - epoch_s) < 1e-9 * epoch_s
    assert abs(pr["ratio_to_seed"] - epoch_s / 220.0) < 1e-9
    assert pr["meets_epoch_target"] == (epoch_s <= 110.0)
    assert pr["meets_images_target"] == (best >= 1600)


def test_gpu_bench_tiny_cpu_runs_every_step(tmp_path):
    import gpu_bench

    assert gpu_bench.main(["--device", "cpu", "--tiny", "--workers", "1", "--json-dir", str(tmp_path)]) == 0
    summary = _read(tmp_path / "gpu_bench.json")
    assert [(st["step"], st["status"]) for st in summary["steps"]] == [
        ("train", "done"), ("loss", "done"), ("larc", "done"), ("scaling", "done")]
    for name in ("train", "loss", "larc", "scaling"):
        assert _read(tmp_path / f"gpu_{name}.json")["machine"]


def test_bench_gpu_train_compile_child_is_stopped_at_its_cap():
    import argparse
    import time

    import bench_gpu_train

    args = argparse.Namespace(device="cpu", compile_backend="eager", warmup=1, iters=2, workers=0,
                              prefetch_factor=2, tiny=True, batch=None, threads=None)
    t0 = time.perf_counter()
    entries = bench_gpu_train.run_compiled_child(args, "fp32", False, cap_s=2.0)
    assert time.perf_counter() - t0 < 30
    assert [(e["name"], e["data"], e["status"]) for e in entries] == [
        ("fp32/NCHW/compile", "synthetic", "skipped"), ("fp32/NCHW/compile", "pipeline", "skipped")]
    assert all("compile cap of 2 s" in e["reason"] for e in entries)


@pytest.mark.slow
def test_bench_gpu_train_tiny_cpu_compiled_trunk(tmp_path):
    """The compiled variant's child process, end to end (dynamo with the
    eager backend: no C++ build)."""
    import bench_gpu_train

    out = tmp_path / "gpu_train.json"
    bench_gpu_train.main(["--device", "cpu", "--tiny", "--workers", "1", "--compile", "on",
                          "--compile-backend", "eager", "--json", str(out)])
    compiled = [v for v in _read(out)["variants"] if v["compile"]]
    assert [v["data"] for v in compiled] == ["synthetic", "pipeline"]
    for v in compiled:
        assert v["status"] == "measured", v
        assert v["images_per_s"] > 0 and v["loss_finite"]
    assert compiled[0]["compile_s"] >= 0 and "compile_s" not in compiled[1]  # compiled once


def test_bench_small_run_tiny_runs_and_memory_formats_agree(tmp_path):
    import bench_small_run

    out = tmp_path / "small_run.json"
    bench_small_run.main(["--tiny", "--json", str(out)])
    res = _read(out)
    # The two memory formats compute the same function in other summation
    # orders. Scores are cosines (|s| <= 1); their longest path rounds in 7
    # convolutions (at most 9 x 128 terms each), 9 batch norms (statistics over
    # at most 2 x 8 crops x 28 x 28 values in this tiny run), the pooling (28 x 28), 2 linear
    # layers (128, 512 terms), the normalisation and the prototype product (64
    # terms each); twice that for two float32 computations (tests/tolerances.py).
    n_bn = 2 * 8 * 28 * 28
    steps = [terms(9 * 128)] * 7 + [terms(n_bn)] * 9 + [terms(28 * 28), terms(128), terms(512), terms(64), terms(64)]
    assert res["trunk"]["max_abs_diff"] <= 2 * rtol(*steps)
    assert set(res["trunk"]["cpu"]) == {"channels_last", "nchw"}
    assert len(res["loader_start"]["cold"]) == len(res["loader_start"]["preloaded"]) == 1


def test_bench_knn_tiny_runs_at_both_views(tmp_path):
    import bench_knn

    out = tmp_path / "knn.json"
    bench_knn.main(["--tiny", "--json", str(out)])
    res = _read(out)
    assert res["images"] == res["train_images"] + res["val_images"] == 100
    assert set(res["seconds_per_1000"]["cpu"]) == {"small_images", "imagenet"}
    # the quickstart's digits are 28 px: resizing the shorter side to 256 is 256 / 28
    assert res["upsampling_imagenet_view"] == pytest.approx(256 / 28)
    assert "per 1,000 images" in bench_knn.report(res)
