"""Bad training data: every kind of file is converted to RGB or skipped with
a warning naming it, counted in the log, and the run finishes; a missing or
empty data path stops before any rank or worker starts.

Expected pixel values are computed by hand from the colour each file was
written with (solid-colour images), not from the code under test.
"""

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tolerances import rtol

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)

# colour each readable kind is written with -> RGB a viewer shows (by hand)
CMYK = (0, 128, 255, 64)  # R = 255 (1 - C/255)(1 - K/255), ...
CMYK_RGB = (191, 95, 0)  # 255*191/255, 127*191/255 = 95.1, 0
RGBA = (200, 100, 50, 128)  # over white: c a + 255 (1 - a), a = 128/255
RGBA_RGB = (227, 177, 152)  # 100.4 + 127.0, 50.2 + 127.0, 25.1 + 127.0
UNREADABLE = ("truncated.jpg", "zero_bytes.jpg", "text.jpg")


def _jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_every_kind(folder: Path, good: int = 3) -> dict:
    """One file of every kind in ``folder`` (a class folder); name -> expected
    RGB pixel (row-major list) for readable solid images, None otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    expected = {}
    Image.new("CMYK", (20, 20), CMYK).save(folder / "cmyk.jpg", quality=95)
    expected["cmyk.jpg"] = [CMYK_RGB]
    Image.new("RGBA", (20, 20), RGBA).save(folder / "rgba.png")
    expected["rgba.png"] = [RGBA_RGB]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 250, 0, 0] + [0] * 762)
    palette.putpixel((1, 0), 1)
    palette.save(folder / "palette.png")
    expected["palette.png"] = [(10, 20, 30), (250, 0, 0)]
    palette.save(folder / "palette_transparent.png", transparency=1)  # index 1 transparent -> white
    expected["palette_transparent.png"] = [(10, 20, 30), (255, 255, 255)]
    la = Image.new("LA", (2, 1))
    la.putpixel((0, 0), (100, 255))
    la.putpixel((1, 0), (100, 0))  # grey 100 fully transparent -> white
    la.save(folder / "gray_alpha.png")
    expected["gray_alpha.png"] = [(100, 100, 100), (255, 255, 255)]
    Image.new("L", (20, 20), 77).save(folder / "gray.png")
    expected["gray.png"] = [(77, 77, 77)]
    Image.new("I;16", (4, 4), 40000).save(folder / "sixteen_bit.png")
    expected["sixteen_bit.png"] = [(156, 156, 156)]  # 40000 / 257 = 155.6, not clipped to 255
    bits = Image.new("1", (2, 1))
    bits.putpixel((1, 0), 1)
    bits.save(folder / "bitmap.png")
    expected["bitmap.png"] = [(0, 0, 0), (255, 255, 255)]
    Image.new("RGB", (3, 2), (40, 80, 120)).save(folder / "tiny.png")
    expected["tiny.png"] = [(40, 80, 120)]
    Image.new("RGB", (1, 1), (200, 10, 90)).save(folder / "one_pixel.png")
    expected["one_pixel.png"] = [(200, 10, 90)]
    data = _jpeg_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("this is not a JPEG\n")
    for name in UNREADABLE:
        expected[name] = None
    for i in range(good):
        name = f"good{i}.jpg"
        (folder / name).write_bytes(_jpeg_bytes(seed=i + 1, size=40))
        expected[name] = "any"
    (folder / "notes.txt").write_text("not an image\n")
    return expected


@pytest.fixture(scope="module")
def bad_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_data") / "train"
    return root, write_every_kind(root / "all")


def _pixels(img):
    assert img.mode == "RGB"
    return list(img.getdata())


# --------------------------------------------------------------------------
# conversion
# --------------------------------------------------------------------------
def test_every_readable_kind_loads_as_the_rgb_a_viewer_shows(bad_folder):
    from swav_vissl_plugin.data_source import load_rgb

    root, expected = bad_folder
    for name, want in expected.items():
        if not isinstance(want, list):
            continue
        got = np.asarray(_pixels(load_rgb(str(root / "all" / name))), dtype=int)
        want = np.asarray(want * (len(got) // len(want)), dtype=int)
        tol = 2 if name.endswith(".jpg") else 1  # JPEG coding, composite rounding
        assert np.abs(got - want).max() <= tol, (name, got[:4].tolist(), want[:4].tolist())


def test_open_file_loads_like_its_path_and_rgb_is_not_copied(bad_folder):
    import io

    from swav_vissl_plugin.data_source import image_to_rgb, load_rgb

    root, expected = bad_folder
    for name in expected:
        path = root / "all" / name
        if not isinstance(expected[name], list):
            continue
        with open(path, "rb") as f:
            from_file = load_rgb(io.BytesIO(f.read()))
        assert from_file.mode == "RGB" and from_file.tobytes() == load_rgb(str(path)).tobytes(), name
    rgb = Image.new("RGB", (3, 2), (1, 2, 3))
    assert image_to_rgb(rgb) is rgb  # no convert("RGB") copy


def test_alpha_is_composited_not_dropped():
    """A fully transparent pixel shows white, whatever colour is stored under it."""
    from swav_vissl_plugin.data_source import image_to_rgb

    img = Image.new("RGBA", (1, 1), (0, 255, 0, 0))
    assert img.convert("RGB").getpixel((0, 0)) == (0, 255, 0)  # what dropping alpha would give
    assert image_to_rgb(img).getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize(
    "mode, values, want",
    [
        ("I", [0, 70000], [0, 255]),  # beyond 16 bits: stretched from [min, max]
        ("I", [0, 30000], [0, 117]),  # 16-bit range: 30000 / 257 = 116.7
        ("I", [3, 200], [3, 200]),  # already 8-bit
        ("F", [0.5, 0.25], [128, 64]),  # [0, 1]: x 255 (127.5, 63.75)
        ("F", [10.0, 250.0], [10, 250]),
        ("F", [-1.0, 1.0], [0, 255]),
    ],
)
def test_integer_and_float_modes_are_rescaled_not_clipped(tmp_path, mode, values, want):
    from swav_vissl_plugin.data_source import load_rgb

    dtype = np.int32 if mode == "I" else np.float32
    path = tmp_path / "img.tif"
    Image.fromarray(np.array([values], dtype=dtype), mode=mode).save(path)
    assert Image.open(path).mode == mode
    assert _pixels(load_rgb(str(path))) == [(w, w, w) for w in want]


@pytest.mark.parametrize("name", UNREADABLE)
def test_unreadable_files_raise(bad_folder, name):
    from swav_vissl_plugin.data_source import load_rgb

    root, _ = bad_folder
    with pytest.raises(Exception):
        load_rgb(str(root / "all" / name))


@pytest.mark.parametrize("name", ["tiny.png", "one_pixel.png"])
def test_images_smaller_than_the_crops_go_through_multicrop(bad_folder, name):
    """No augmentation but the resized crop: every crop is the image's colour,
    normalised, at the crop's size (upsampled from 3x2 / 1x1)."""
    from swav_vissl_plugin.data_source import load_rgb
    from swav_vissl_plugin.transforms import SwavPluginMultiCrop

    root, expected = bad_folder
    mc = SwavPluginMultiCrop.from_config(
        {"nmb_crops": [2, 2], "size_crops": [28, 14], "min_scale_crops": [0.14, 0.05], "max_scale_crops": [1.0, 0.14],
         "color_jitter_p": 0.0, "grayscale_p": 0.0, "blur_p": 0.0}
    )
    crops = mc(load_rgb(str(root / "all" / name)))
    colour = expected[name][0]
    want = torch.tensor([(c / 255 - m) / s for c, m, s in zip(colour, MEAN, STD)]).view(3, 1, 1)
    assert [tuple(c.shape) for c in crops] == [(3, 28, 28)] * 2 + [(3, 14, 14)] * 2
    # float32: / 255, - mean, / std, the expected value's own rounding:
    # 4 roundings on values up to 1 / min(STD)
    tol = rtol(4) / min(STD)
    for c in crops:
        torch.testing.assert_close(c, want.expand_as(c), rtol=0, atol=tol)


# --------------------------------------------------------------------------
# the data sources
# --------------------------------------------------------------------------
def _cfg(compose_cfg, data, *overrides, source="swav_plugin_disk_folder"):
    return compose_cfg(f"config.DATA.TRAIN.DATA_SOURCES=[{source}]", *overrides, data=data)


def test_folder_source_skips_and_replaces_unreadable_files(bad_folder, compose_cfg, caplog):
    from swav_vissl_plugin import sample_seed
    from swav_vissl_plugin.data_source import DiskImageSource, load_rgb

    root, expected = bad_folder
    cfg = _cfg(compose_cfg, root)
    with caplog.at_level("WARNING"):
        src = DiskImageSource(cfg, "swav_plugin_disk_folder", str(root), "TRAIN", "swav_plugin_quickstart")
    names = [Path(p).name for p in src.get_image_paths()]
    assert names == sorted(n for n in expected)  # ImageFolder order; notes.txt is not an item
    assert "notes.txt" in caplog.text
    src.set_epoch(3)
    for idx, name in enumerate(names):
        caplog.clear()
        with caplog.at_level("WARNING"):
            img, valid = src[idx]
        assert img.mode == "RGB"
        # the crops' stream is the one of (seed, epoch, idx), replaced or not
        gen = sample_seed.take_generator()
        ref = torch.Generator().manual_seed(sample_seed.stream_seed(cfg.SEED_VALUE, 3, idx))
        assert torch.equal(torch.rand(4, generator=gen), torch.rand(4, generator=ref))
        if expected[name] is None:
            assert not valid
            assert str(root / "all" / name) in caplog.text, caplog.text
            # replaced by the next readable item, deterministically
            nxt = next(n for n in names[idx + 1 :] + names if expected[n] is not None)
            assert _pixels(img) == _pixels(load_rgb(str(root / "all" / nxt)))
        else:
            assert valid, name


def test_filelist_source_with_prefix_and_subset(bad_folder, compose_cfg, tmp_path):
    from vissl.data import build_dataset

    root, expected = bad_folder
    files = [f"/nowhere/all/{n}" for n in sorted(expected)]
    listing = tmp_path / "files.npy"
    np.save(listing, np.array(files))
    cfg = _cfg(
        compose_cfg, listing,
        "config.DATA.TRAIN.REMOVE_IMG_PATH_PREFIX=/nowhere", f"config.DATA.TRAIN.NEW_IMG_PATH_PREFIX={root}",
        "config.DATA.TRAIN.DATA_LIMIT=8", source="swav_plugin_disk_filelist",
    )
    ds = build_dataset(cfg, "TRAIN")
    assert len(ds) == 8
    source = ds.data_objs[0]
    for i in range(8):
        item = ds[i]
        name = Path(source.image_path(int(ds.image_and_label_subset[i]))).name
        assert set(item["data_valid"]) == {1 if expected[name] is not None else -1}, name
        assert [tuple(c.shape) for c in item["data"]] == [(3, 28, 28)] * 2 + [(3, 14, 14)] * 4


# --------------------------------------------------------------------------
# missing or empty data path
# --------------------------------------------------------------------------
def _compose_run(overrides):
    from swav_vissl_plugin.config import compose

    return compose(list(overrides), dump_config=True)


@pytest.mark.parametrize("case", ["missing", "empty", "not_in_catalog"])
def test_a_run_config_is_checked_for_its_data(tmp_path, case):
    from swav_vissl_plugin.config import ConfigError

    ck = tmp_path / "run"
    if case == "missing":
        over, words = [f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'nope'}]"], ["DATA.TRAIN.DATA_PATHS[0]", str(tmp_path / "nope"), "does not exist"]
    elif case == "empty":
        (tmp_path / "empty" / "cls").mkdir(parents=True)
        over, words = [f"config.DATA.TRAIN.DATA_PATHS=[{tmp_path / 'empty'}]"], ["DATA.TRAIN.DATA_PATHS[0]", str(tmp_path / "empty"), "holds no image"]
    else:
        over, words = ["config.DATA.TRAIN.DATA_PATHS=[]", "config.DATA.TRAIN.DATASET_NAMES=[no_such_dataset]"], ["DATA.TRAIN.DATA_PATHS", "no_such_dataset", "catalog"]
    with pytest.raises(ConfigError) as err:
        _compose_run(["config=swav_plugin/pretrain/swav_quickstart", f"config.CHECKPOINT.DIR={ck}", *over])
    for w in words:
        assert w in str(err.value), str(err.value)
    _nothing_ran(ck)


def _nothing_ran(run: Path):
    """No trace of a run: VISSL writes train_config.yaml before launching, each
    rank's log.txt and stdout.json when it starts, checkpoints later."""
    written = [p.name for p in run.rglob("*")] if run.exists() else []
    assert not written, written


LAUNCH_TWICE = r"""
import sys
from swav_vissl_plugin.config import ConfigError
from swav_vissl_plugin.launcher import main
for case, data, run in zip(("missing", "empty"), sys.argv[1:3], sys.argv[3:5]):
    try:
        main(["config=swav_plugin/pretrain/swav_quickstart", f"config.DATA.TRAIN.DATA_PATHS=[{data}]",
              f"config.CHECKPOINT.DIR={run}", "config.DISTRIBUTED.NUM_PROC_PER_NODE=2",
              "config.DATA.NUM_DATALOADER_WORKERS=2"])
        print(f"{case}: LAUNCHED", flush=True)
    except ConfigError as e:
        print(f"{case}: ConfigError: {e}", flush=True)
"""


def test_launcher_stops_before_any_rank_or_worker(tmp_path):
    """The command line on 2 ranks x 2 loader workers: the error comes from
    composing the config; VISSL's launcher never ran (no rank announced,
    nothing written in the run directory)."""
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.txt").write_text("x")
    runs = [tmp_path / "run_missing", tmp_path / "run_empty"]
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCH_TWICE, str(missing), str(empty), *map(str, runs)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert f"missing: ConfigError: config.DATA.TRAIN.DATA_PATHS[0]: image folder {missing} does not exist" in out, out[-3000:]
    assert f"empty: ConfigError: config.DATA.TRAIN.DATA_PATHS[0]: image folder {empty} holds no image" in out, out[-3000:]
    assert "LAUNCHED" not in out and "Spawning process" not in out
    for run in runs:
        _nothing_ran(run)


def test_source_checks_its_path_again(compose_cfg, tmp_path):
    """Second line of defence: a folder emptied after the config was checked."""
    from swav_vissl_plugin.config import ConfigError
    from swav_vissl_plugin.data_source import DiskImageSource

    folder = tmp_path / "data"
    (folder / "cls").mkdir(parents=True)
    cfg = compose_cfg(data=folder)
    with pytest.raises(ConfigError, match=re.escape(f"config.DATA.TRAIN.DATA_PATHS[0]: image folder {folder} holds no image")):
        DiskImageSource(cfg, "swav_plugin_disk_folder", str(folder), "TRAIN", "swav_plugin_quickstart")


# --------------------------------------------------------------------------
# end to end
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_run(bad_folder, tmp_path_factory):
    """swav_quickstart through the command line on the folder with every kind:
    one epoch of 2 batches of 8 = every item once (16 items). One rank: the
    count over 2 ranks is checked by test_nonfinite.py's run."""
    root, expected = bad_folder
    assert len(expected) == 16
    run = tmp_path_factory.mktemp("bad_run") / "run"
    proc = subprocess.run(
        [
            sys.executable, str(REPO / "tools" / "run_distributed_engines.py"),
            "config=swav_plugin/pretrain/swav_quickstart",
            f"config.DATA.TRAIN.DATA_PATHS=[{root}]",
            "config.DATA.TRAIN.BATCHSIZE_PER_REPLICA=8",
            "config.DATA.NUM_DATALOADER_WORKERS=0",
            "config.DISTRIBUTED.NUM_PROC_PER_NODE=1",
            "config.OPTIMIZER.num_epochs=1",
            "config.OPTIMIZER.param_schedulers.lr.warmup_epochs=0",
            "config.SWAV_PLUGIN.MONITOR.ENABLED=false",
            "config.LOG_FREQUENCY=1",
            f"config.CHECKPOINT.DIR={run}",
        ],
        capture_output=True, text=True, timeout=900,
    )
    return proc, run, root, expected


def test_run_finishes_names_and_counts_the_bad_files(bad_run):
    proc, run, root, expected = bad_run
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert list(run.glob("model_final_checkpoint_phase0*.torch")), sorted(p.name for p in run.iterdir())
    log = (run / "log.txt").read_text()
    # each unreadable file named in a warning by the rank that met it
    for name in UNREADABLE:
        assert re.search(rf"WARNING .*unreadable image {re.escape(str(root / 'all' / name))} \(", out), name
    # the file without an image extension named when the source was built
    assert re.search(rf"WARNING .*not images.*{re.escape('all/notes.txt')}", log)
    # the phase count, with the names, in rank 0's log
    phase = [l for l in log.splitlines() if "train phase 0:" in l and "unreadable" in l]
    assert len(phase) == 1 and "3 unreadable image(s)" in phase[0], phase
    for name in UNREADABLE:
        assert str(root / "all" / name) in phase[0]


def test_the_count_reaches_tensorboard(bad_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    proc, run, _, _ = bad_run
    assert proc.returncode == 0
    events = EventAccumulator(str(run / "tb_logs")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("Data/unreadable_images")] == [(0, 3.0)]
