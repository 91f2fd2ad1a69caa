"""Calibration sources: image folders, preprocessing, holdout, arrays, feed iterables, the disk cache."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import conv_model
from onnx_dwd import DwdError, OptimizeConfig
from onnx_dwd.api import load_calibration
from onnx_dwd.calib import (DiskCache, InputSpec, Part, Preprocess, array_calibration, feed_calibration,
                            holdout_period, image_calibration, image_layout, list_images, resolve_input_specs)


def spec(shape, name="x", dynamic_batch=False):
    return InputSpec(name, np.float32, tuple(shape), dynamic_batch)


def grey_image(path: Path, value: int, size=(6, 4)):
    """A uniform RGB image (value, value, value) of size (w, h), format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def feeds_of(part):
    return list(part.batches())


def pixel_ids(part, name="x"):
    """The uniform grey value (0-255 scale) of every image in a part, in order."""
    return [int(round(float(v) * 255)) for feed in part.batches() for v in feed[name].reshape(len(feed[name]), -1)[:, 0]]


# --- image folders -------------------------------------------------------------------------------

@pytest.fixture
def image_folder(tmp_path):
    """Five images of mixed formats in a tree, plus a text file and labels.csv.

    Image i is uniform grey 20 * (i + 1); its label is 10 + i.
    """
    names = ["a0.png", "a1.jpg", "b/c2.bmp", "b/c3.PNG", "d4.jpeg"]
    for i, name in reversed(list(enumerate(names))):  # created out of order
        grey_image(tmp_path / "imgs" / name, 20 * (i + 1))
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "labels.csv").write_text(
        "file,label\n" + "".join(f"{n},{10 + i}\n" for i, n in reversed(list(enumerate(names)))))
    return tmp_path / "imgs", names


def test_images_are_found_recursively_and_sorted(image_folder):
    folder, names = image_folder
    assert [p.relative_to(folder).as_posix() for p in list_images(folder)] == names
    calib = image_calibration(folder, [spec((1, 3, 4, 6))], Preprocess(), holdout=0)
    assert calib.fit.count == 5 and calib.holdout.count == 0
    # each feed is one image, in sorted order (JPEG may be off by one level)
    ids = pixel_ids(calib.fit)
    assert np.abs(np.array(ids) - [20, 40, 60, 80, 100]).max() <= 1
    assert calib.description == f"5 images from {folder}"


def test_labels_are_aligned_with_fit_and_holdout_parts(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(10):
        grey_image(folder / f"im{i:02d}.png", 10 * i)
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"im{i:02d}.png,{100 + i}\n" for i in range(10)))
    calib = image_calibration(folder, [spec((1, 1, 4, 6))], Preprocess(), holdout=0.2)
    # every 5th image is held out: indices 4 and 9
    assert (calib.fit.count, calib.holdout.count) == (8, 2)
    assert calib.holdout.labels.tolist() == [104, 109]
    assert calib.fit.labels.tolist() == [100, 101, 102, 103, 105, 106, 107, 108]
    assert pixel_ids(calib.holdout) == [40, 90]
    assert pixel_ids(calib.fit) == [0, 10, 20, 30, 50, 60, 70, 80]


def test_fixed_batch_drops_the_remainder_and_its_labels(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(10):
        grey_image(folder / f"im{i:02d}.png", 10 * i)
    (folder / "labels.csv").write_text("file,label\n" + "".join(f"im{i:02d}.png,{i}\n" for i in range(10)))
    calib = image_calibration(folder, [spec((3, 1, 4, 6))], Preprocess(), holdout=0.2)
    feeds = feeds_of(calib.fit)
    assert [f["x"].shape for f in feeds] == [(3, 1, 4, 6)] * 2
    assert calib.fit.count == 6 and calib.fit.labels.tolist() == [0, 1, 2, 3, 5, 6]
    assert pixel_ids(calib.fit) == [0, 10, 20, 30, 50, 60]
    assert calib.holdout.count == 0 and feeds_of(calib.holdout) == []


def test_dynamic_batch_groups_images_up_to_max_batch(tmp_path):
    folder = tmp_path / "imgs"
    for i in range(7):
        grey_image(folder / f"im{i}.png", 10 * i)
    calib = image_calibration(folder, [spec((1, 3, 4, 6), dynamic_batch=True)], Preprocess(), holdout=0,
                              max_batch=3)
    assert [f["x"].shape[0] for f in feeds_of(calib.fit)] == [3, 3, 1]
    assert pixel_ids(calib.fit) == [0, 10, 20, 30, 40, 50, 60]


def test_limit_takes_the_first_images(image_folder):
    folder, _ = image_folder
    calib = image_calibration(folder, [spec((1, 3, 4, 6))], Preprocess(), holdout=0, limit=2)
    assert calib.fit.count == 2 and calib.fit.labels.tolist() == [10, 11]


def test_missing_label_names_the_file(image_folder):
    folder, _ = image_folder
    (folder / "labels.csv").write_text("file,label\na0.png,1\na1.jpg,2\nd4.jpeg,3\nb/c3.PNG,4\n")
    with pytest.raises(DwdError, match=r"labels\.csv: no label for b/c2\.bmp \(and 0 more\)"):
        image_calibration(folder, [spec((1, 3, 4, 6))], Preprocess(), holdout=0.2)


@pytest.mark.parametrize("text", ["file,label\na0.png,cat\n", "name,class\na0.png,1\n"])
def test_malformed_labels_csv_is_a_dwd_error(tmp_path, text):
    folder = tmp_path / "imgs"
    grey_image(folder / "a0.png", 10)
    (folder / "labels.csv").write_text(text)
    with pytest.raises(DwdError, match="labels.csv"):
        image_calibration(folder, [spec((1, 3, 4, 6))], Preprocess(), holdout=0)


def test_unreadable_image_names_the_file(image_folder):
    folder, _ = image_folder
    (folder / "b" / "broken.png").write_bytes(b"this is not a png")
    (folder / "labels.csv").unlink()
    calib = image_calibration(folder, [spec((1, 3, 4, 6))], Preprocess(), holdout=0)
    with pytest.raises(DwdError, match=r"broken\.png: cannot read image"):
        feeds_of(calib.fit)


@pytest.mark.parametrize("content", [None, "notes.txt"])
def test_folder_without_images_is_an_error(tmp_path, content):
    folder = tmp_path / "empty"
    folder.mkdir()
    if content:
        (folder / content).write_text("hello")
    with pytest.raises(DwdError, match=r"--calib .*empty: no images"):
        image_calibration(folder, [spec((1, 3, 4, 6))], Preprocess(), holdout=0)
    with pytest.raises(DwdError, match=r"no images"):
        load_calibration(OptimizeConfig(calib=folder), [spec((1, 3, 4, 6))])


def test_images_need_a_single_input_model(image_folder):
    folder, _ = image_folder
    with pytest.raises(DwdError, match=r"one input.*has 2 \(x, z\); use \.npz"):
        image_calibration(folder, [spec((1, 3, 4, 6)), spec((1, 3, 4, 6), "z")], Preprocess(), holdout=0)


# --- preprocessing -------------------------------------------------------------------------------

RED, BLUE = (255, 0, 0), (0, 0, 255)
COLOUR_A, COLOUR_B = (200, 10, 50), (0, 100, 255)


@pytest.fixture
def two_colour(tmp_path):
    """A 6x4 (w x h) PNG: left 3 columns COLOUR_A, right 3 COLOUR_B."""
    folder = tmp_path / "two"
    folder.mkdir()
    im = Image.new("RGB", (6, 4), COLOUR_B)
    im.paste(COLOUR_A, (0, 0, 3, 4))
    im.save(folder / "img.png")
    return folder


def one_feed(folder, shape, pre, dynamic_batch=False):
    calib = image_calibration(folder, [spec(shape, dynamic_batch=dynamic_batch)], pre, holdout=0)
    (feed,) = feeds_of(calib.fit)
    assert feed["x"].dtype == np.float32
    return feed["x"]


def test_rgb_nchw_scale_mean_std_exact(two_colour):
    mean, std = (0.5, 0.25, 0.125), (0.5, 2.0, 0.25)
    x = one_feed(two_colour, (1, 3, 4, 6), Preprocess(scale=1 / 255, mean=mean, std=std))
    assert x.shape == (1, 3, 4, 6)
    for cols, colour in ((slice(0, 3), COLOUR_A), (slice(3, 6), COLOUR_B)):
        for ch in range(3):
            want = (colour[ch] / 255 - mean[ch]) / std[ch]
            np.testing.assert_allclose(x[0, ch, :, cols], want, rtol=1e-6, atol=1e-6)


def test_bgr_reverses_channels_before_mean_std(two_colour):
    mean, std = (10.0, 20.0, 30.0), (2.0, 4.0, 5.0)
    x = one_feed(two_colour, (1, 3, 4, 6), Preprocess(scale=1.0, mean=mean, std=std, channel_order="bgr"))
    bgr_a, bgr_b = COLOUR_A[::-1], COLOUR_B[::-1]
    for ch in range(3):
        np.testing.assert_array_equal(x[0, ch, :, :3], (bgr_a[ch] - mean[ch]) / std[ch])
        np.testing.assert_array_equal(x[0, ch, :, 3:], (bgr_b[ch] - mean[ch]) / std[ch])
    # e.g. the first channel is blue: (50 - 10) / 2 on the left, (255 - 10) / 2 on the right
    assert x[0, 0, 0, 0] == 20.0 and x[0, 0, 0, 5] == 122.5


def test_nhwc_layout_from_the_input_shape(two_colour):
    x = one_feed(two_colour, (1, 4, 6, 3), Preprocess(scale=1.0))
    assert x.shape == (1, 4, 6, 3)
    np.testing.assert_array_equal(x[0, :, :3], np.broadcast_to(COLOUR_A, (4, 3, 3)))
    np.testing.assert_array_equal(x[0, :, 3:], np.broadcast_to(COLOUR_B, (4, 3, 3)))


def test_single_channel_input_reads_grey(tmp_path):
    folder = tmp_path / "g"
    folder.mkdir()
    im = Image.new("RGB", (6, 4), RED)
    im.paste(BLUE, (3, 0, 6, 4))
    im.save(folder / "g.png")
    # ITU-R 601 luma as Pillow computes it: red -> 76, blue -> 29
    for shape in ((1, 1, 4, 6), (1, 4, 6, 1)):
        x = one_feed(folder, shape, Preprocess(scale=1.0))
        assert x.shape == shape
        img = x.reshape(4, 6)
        np.testing.assert_array_equal(img[:, :3], 76.0)
        np.testing.assert_array_equal(img[:, 3:], 29.0)
    # one mean/std value applies to the grey channel; three do not fit it
    x = one_feed(folder, (1, 1, 4, 6), Preprocess(scale=1.0, mean=(6.0,), std=(10.0,)))
    assert x[0, 0, 0, 0] == 7.0 and x[0, 0, 0, 5] == np.float32(2.3)
    with pytest.raises(DwdError, match=r"--mean/--std need 1 or 1 values"):
        one_feed(folder, (1, 1, 4, 6), Preprocess(mean=(0.1, 0.2, 0.3)))


def test_layout_is_read_off_the_shape_or_forced():
    assert image_layout(spec((1, 3, 8, 5))) == image_layout(spec((1, 3, 8, 5)), "nchw")
    lay = image_layout(spec((1, 3, 8, 5)))
    assert (lay.channels_last, lay.channels, lay.height, lay.width) == (False, 3, 8, 5)
    lay = image_layout(spec((2, 7, 5, 1)))
    assert (lay.channels_last, lay.channels, lay.height, lay.width) == (True, 1, 7, 5)
    # ambiguous [1, 3, 8, 3]: auto says NCHW, nhwc forces H=3, W=8, C=3
    lay = image_layout(spec((1, 3, 8, 3)), "nhwc")
    assert (lay.channels_last, lay.channels, lay.height, lay.width) == (True, 3, 3, 8)
    for shape, layout in (((1, 5, 8, 8), "auto"), ((1, 8, 8, 3), "nchw"), ((1, 3, 8, 8), "nhwc"),
                          ((1, 3, 8), "auto")):
        with pytest.raises(DwdError, match="does not look like an image batch"):
            image_layout(spec(shape), layout)


def test_forced_layout_changes_the_tensor(two_colour):
    auto = one_feed(two_colour, (1, 3, 4, 3), Preprocess(scale=1.0))
    np.testing.assert_array_equal(auto[0, :, 0, 0], COLOUR_A)  # NCHW: the 6x4 image squeezed to 3x4
    forced = one_feed(two_colour, (1, 4, 6, 3), Preprocess(scale=1.0, layout="nhwc"))
    np.testing.assert_array_equal(forced[0, 0, 0], COLOUR_A)
    np.testing.assert_array_equal(forced[0, 0, 5], COLOUR_B)
    # the same shape forced to NHWC: H=3, W=4, channels last
    forced = one_feed(two_colour, (1, 3, 4, 3), Preprocess(scale=1.0, layout="nhwc"))
    np.testing.assert_array_equal(forced[0, 0, 0, :], COLOUR_A)
    np.testing.assert_array_equal(forced[0, 0, 3, :], COLOUR_B)


def test_resize_then_centre_crop(tmp_path):
    """16x8 image, red | green (8 columns) | red; resize shorter side to 4 -> 8x4; centre crop 4x4.

    The crop keeps resized columns 2..5; columns 3 and 4 only see green source pixels, and the
    image is mirror-symmetric, so the crop must be too.
    """
    folder = tmp_path / "r"
    folder.mkdir()
    im = Image.new("RGB", (16, 8), (255, 0, 0))
    im.paste((0, 255, 0), (4, 0, 12, 8))
    im.save(folder / "r.png")
    x = one_feed(folder, (1, 3, 4, 4), Preprocess(resize=4, scale=1.0))
    assert x.shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(x[0, :, :, 1:3], np.broadcast_to(np.array([0, 255, 0.])[:, None, None], (3, 4, 2)))
    np.testing.assert_allclose(x[0], x[0, :, :, ::-1], atol=1e-6)
    assert 0 < x[0, 0, 0, 0] < 255  # edge columns mix in red
    # without --resize the whole image is squeezed to 4x4: more red at the edges
    squeezed = one_feed(folder, (1, 3, 4, 4), Preprocess(scale=1.0))
    assert squeezed[0, 0, 0, 0] > x[0, 0, 0, 0]
    # shorter side 6 -> 12x6, centre crop 4x4 (columns 4..7) sees only green
    x = one_feed(folder, (1, 3, 4, 4), Preprocess(resize=6, scale=1.0))
    np.testing.assert_array_equal(x[0, 1], 255.0)
    np.testing.assert_array_equal(x[0, 0], 0.0)


@pytest.mark.parametrize("kwargs,match", [({"channel_order": "grb"}, "--channel-order"),
                                          ({"layout": "chw"}, "--layout"), ({"std": (1.0, 0.0)}, "--std"),
                                          ({"resize": 0}, "--resize")])
def test_bad_preprocess_values(kwargs, match):
    with pytest.raises(DwdError, match=match):
        Preprocess(**kwargs)


# --- holdout -------------------------------------------------------------------------------------

@pytest.mark.parametrize("fraction,period", [(0, 0), (0.2, 5), (0.1, 10), (0.25, 4), (0.5, 2), (0.9, 2)])
def test_holdout_period(fraction, period):
    assert holdout_period(fraction) == period


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5])
def test_invalid_holdout_fraction(fraction):
    with pytest.raises(DwdError, match=r"--holdout must be in \[0, 1\)"):
        holdout_period(fraction)
    with pytest.raises(DwdError, match=r"--holdout"):
        feed_calibration([{"x": np.zeros(1)}], [spec((1,))], fraction)


def numbered_feeds(n, name="x"):
    return [{name: np.full((1, 2), i, np.float32)} for i in range(n)]


def ids(part, name="x"):
    return [int(f[name][0, 0]) for f in part.batches()]


@pytest.mark.parametrize("n,fraction,held", [(10, 0.2, [4, 9]), (12, 0.25, [3, 7, 11]), (10, 0, []),
                                             (7, 0.5, [1, 3, 5])])
def test_every_kth_item_is_held_out(n, fraction, held):
    calib = feed_calibration(numbered_feeds(n), [spec((1, 2))], fraction)
    assert ids(calib.holdout) == held and calib.holdout.count == len(held)
    assert ids(calib.fit) == [i for i in range(n) if i not in held] and calib.fit.count == n - len(held)


def test_arrays_hold_out_the_same_items(tmp_path):
    folder = tmp_path / "arr"
    folder.mkdir()
    for i in range(10):
        np.save(folder / f"f{i:02d}.npy", np.full((1, 2), i, np.float32))
    calib = array_calibration(folder, [spec((1, 2))], 0.2)
    assert ids(calib.holdout) == [4, 9] and ids(calib.fit) == [0, 1, 2, 3, 5, 6, 7, 8]


def test_few_items_hold_out_the_same_in_every_source(tmp_path):
    folder = tmp_path / "arr"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"f{i}.npy", np.full((1, 2), i, np.float32))
    arrays = array_calibration(folder, [spec((1, 2))], 0.2)
    assert ids(arrays.holdout) == [2]  # the fallback: the last item
    feeds = feed_calibration(numbered_feeds(3), [spec((1, 2))], 0.2)
    assert ids(feeds.holdout) == ids(arrays.holdout)


# --- .npy / .npz ---------------------------------------------------------------------------------

def test_single_npy_file_is_one_feed(tmp_path):
    arr = np.random.default_rng(0).standard_normal((2, 3, 4, 4))  # float64 on disk
    np.save(tmp_path / "a.npy", arr)
    specs = [spec((1, 3, 4, 4), dynamic_batch=True)]
    calib = load_calibration(OptimizeConfig(calib=tmp_path / "a.npy"), specs)
    assert (calib.fit.count, calib.holdout.count) == (1, 0)
    (feed,) = feeds_of(calib.fit)
    assert feed["x"].dtype == np.float32 and feed["x"].shape == (2, 3, 4, 4)
    np.testing.assert_array_equal(feed["x"], arr.astype(np.float32))


def test_npy_shape_is_checked_against_the_input(tmp_path):
    np.save(tmp_path / "bad.npy", np.zeros((1, 3, 5, 4), np.float32))
    calib = array_calibration(tmp_path / "bad.npy", [spec((1, 3, 4, 4), dynamic_batch=True)], 0)
    with pytest.raises(DwdError, match=r"bad\.npy: array x has shape \[1, 3, 5, 4\], the model needs "
                                       r"\[1, 3, 4, 4\] \(any batch size\)"):
        feeds_of(calib.fit)
    # a fixed batch must match too
    np.save(tmp_path / "b2.npy", np.zeros((2, 3, 4, 4), np.float32))
    calib = array_calibration(tmp_path / "b2.npy", [spec((1, 3, 4, 4))], 0)
    with pytest.raises(DwdError, match=r"b2\.npy: array x has shape \[2, 3, 4, 4\], the model needs \[1, 3, 4, 4\]$"):
        feeds_of(calib.fit)
    np.save(tmp_path / "r3.npy", np.zeros((3, 4, 4), np.float32))
    with pytest.raises(DwdError, match=r"r3\.npy: array x has shape \[3, 4, 4\]"):
        feeds_of(array_calibration(tmp_path / "r3.npy", [spec((1, 3, 4, 4), dynamic_batch=True)], 0).fit)


def test_npy_for_a_two_input_model_is_an_error(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((1, 2), np.float32))
    calib = array_calibration(tmp_path / "a.npy", [spec((1, 2), "x"), spec((1, 2), "z")], 0)
    with pytest.raises(DwdError, match=r"a\.npy: a \.npy file can feed a single-input model; .*inputs x, z"):
        feeds_of(calib.fit)


def test_npz_folder_feeds_a_two_input_model(tmp_path):
    folder = tmp_path / "arrs"
    (folder / "sub").mkdir(parents=True)
    for i in range(5):
        np.savez(folder / ("sub" if i % 2 else ".") / f"f{i}.npz",
                 x=np.full((1, 2), i, np.float32), z=np.full((1, 3), -i, np.float64))
    specs = [spec((1, 2), "x"), spec((1, 3), "z")]
    calib = load_calibration(OptimizeConfig(calib=folder, holdout=0.2), specs)
    # files in path order: f0, f2, f4, sub/f1, sub/f3; the 5th (sub/f3) is held out
    assert ids(calib.fit) == [0, 2, 4, 1] and ids(calib.holdout) == [3]
    feed = feeds_of(calib.fit)[1]
    assert feed["z"].dtype == np.float32 and feed["z"].tolist() == [[-2, -2, -2]]
    assert calib.description == f"5 array files from {folder}"


def test_npz_keys_must_match_input_names(tmp_path):
    np.savez(tmp_path / "k.npz", x=np.zeros((1, 2), np.float32), w=np.zeros((1, 3), np.float32))
    specs = [spec((1, 2), "x"), spec((1, 3), "z")]
    with pytest.raises(DwdError, match=r"k\.npz: holds arrays \['w', 'x'\], the model's inputs are \['x', 'z'\]"):
        feeds_of(array_calibration(tmp_path / "k.npz", specs, 0).fit)
    np.savez(tmp_path / "s.npz", x=np.zeros((1, 2), np.float32), z=np.zeros((1, 4), np.float32))
    with pytest.raises(DwdError, match=r"s\.npz: array z has shape \[1, 4\], the model needs \[1, 3\]"):
        feeds_of(array_calibration(tmp_path / "s.npz", specs, 0).fit)


def test_corrupt_or_missing_array_sources(tmp_path):
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    with pytest.raises(DwdError, match=r"junk\.npy: cannot read array file"):
        feeds_of(array_calibration(tmp_path / "junk.npy", [spec((1, 2))], 0).fit)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DwdError, match=r"no \.npy/\.npz files found"):
        array_calibration(tmp_path / "empty", [spec((1, 2))], 0)
    (tmp_path / "data.txt").write_text("1 2")
    with pytest.raises(DwdError, match=r"data\.txt: expected a folder of images, or \.npy/\.npz files"):
        load_calibration(OptimizeConfig(calib=tmp_path / "data.txt"), [spec((1, 2))])


def test_upper_case_array_suffixes(tmp_path):
    folder = tmp_path / "arr"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((1, 2), np.float32))
    (folder / "a.npy").rename(folder / "A.NPY")
    calib = load_calibration(OptimizeConfig(calib=folder), [spec((1, 2))])
    assert calib.fit.count == 1


# --- feed iterables ------------------------------------------------------------------------------

def sources(n):
    """The same n feeds as a list, a generator, a zero-argument callable and a CalibrationDataReader."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(numbered_feeds(n))

        def get_next(self):
            return next(self.it, None)

    return {"list": numbered_feeds(n), "generator": (f for f in numbered_feeds(n)),
            "callable": lambda: iter(numbered_feeds(n)), "reader": Reader()}


@pytest.mark.parametrize("kind", ["list", "generator", "callable", "reader"])
def test_feed_iterables_give_identical_parts(kind):
    calib = feed_calibration(sources(10)[kind], [spec((1, 2))], 0.2)
    assert (calib.fit.count, calib.holdout.count) == (8, 2)
    for _ in range(3):  # re-iterable, whatever the source
        assert ids(calib.fit) == [0, 1, 2, 3, 5, 6, 7, 8]
        assert ids(calib.holdout) == [4, 9]
    assert calib.description == "10 feed dicts"


def test_a_generator_is_read_once():
    reads = []

    def gen():
        for f in numbered_feeds(6):
            reads.append(1)
            yield f
    calib = feed_calibration(gen(), [spec((1, 2))], 0.5)
    assert len(reads) == 6
    assert ids(calib.fit) == [0, 2, 4] and ids(calib.fit) == [0, 2, 4] and ids(calib.holdout) == [1, 3, 5]
    assert len(reads) == 6


def test_a_callable_streams_fresh_iterators():
    calls = []

    def make():
        calls.append(1)
        return iter(numbered_feeds(4))
    calib = feed_calibration(make, [spec((1, 2))], 0.5)
    before = len(calls)
    assert ids(calib.fit) == [0, 2] and ids(calib.holdout) == [1, 3]
    assert len(calls) == before + 2


@pytest.mark.parametrize("kind", ["list", "generator", "callable", "reader"])
def test_wrong_feed_keys_are_an_error(kind):
    with pytest.raises(DwdError, match=r"feeds have keys \['x'\], the model's inputs are \['images'\]"):
        feed_calibration(sources(3)[kind], [spec((1, 2), "images")], 0.2)


def test_empty_feed_iterable_is_an_error():
    for source in ([], iter([]), lambda: iter([])):
        with pytest.raises(DwdError, match="the feed iterable is empty"):
            feed_calibration(source, [spec((1, 2))], 0.2)


def test_api_calibration_takes_precedence_over_config_calib(tmp_path):
    calib = load_calibration(OptimizeConfig(calib=tmp_path / "missing", holdout=0.5), [spec((1, 2))],
                             numbered_feeds(4))
    assert ids(calib.holdout) == [1, 3]
    assert load_calibration(OptimizeConfig(), [spec((1, 2))]) is None


# --- DiskCache -----------------------------------------------------------------------------------

def counted_part(n, reads, name="x"):
    def batches():
        for i in range(n):
            reads.append(i)
            yield {name: np.full((2, 3), i, np.float32), "aux": np.arange(i + 1, dtype=np.int64)}
    return Part(batches, np.arange(n), n)


def as_list(part):
    return [(int(f["x"][0, 0]), f["x"].dtype, f["x"].shape, f["aux"].tolist()) for f in part.batches()]


def test_disk_cache_reads_the_source_once():
    reads = []
    expected = [(i, np.float32, (2, 3), list(range(i + 1))) for i in range(4)]
    with DiskCache() as cache:
        part = cache.wrap(counted_part(4, reads))
        assert part.count == 4 and part.labels.tolist() == [0, 1, 2, 3]
        assert as_list(part) == expected and reads == [0, 1, 2, 3]
        assert as_list(part) == expected and as_list(part) == expected
        assert reads == [0, 1, 2, 3]


def test_disk_cache_survives_an_abandoned_first_pass():
    reads = []
    expected = [(i, np.float32, (2, 3), list(range(i + 1))) for i in range(4)]
    with DiskCache() as cache:
        part = cache.wrap(counted_part(4, reads))
        first = next(iter(part.batches()))  # what optimize does to learn shapes
        assert int(first["x"][0, 0]) == 0
        for _ in range(3):
            assert as_list(part) == expected  # no duplicate of item 0
        assert reads == [0, 0, 1, 2, 3]


def test_disk_cache_survives_several_abandoned_passes_and_two_parts():
    reads_a, reads_b = [], []
    with DiskCache() as cache:
        a, b = cache.wrap(counted_part(3, reads_a)), cache.wrap(counted_part(2, reads_b))
        it = a.batches()
        next(it), next(it)
        next(iter(b.batches()))
        next(iter(a.batches()))
        assert [x[0] for x in as_list(b)] == [0, 1]
        assert [x[0] for x in as_list(a)] == [0, 1, 2]
        for _ in range(2):
            assert [x[0] for x in as_list(a)] == [0, 1, 2] and [x[0] for x in as_list(b)] == [0, 1]
        assert reads_a == [0, 1, 0, 0, 1, 2] and reads_b == [0, 0, 1]


def test_disk_cache_is_removed_on_close():
    cache = DiskCache()
    folder = Path(cache._dir.name)
    part = cache.wrap(counted_part(2, []))
    as_list(part)
    assert len(list(folder.iterdir())) == 4  # a raw file per feed and input
    cache.close()
    assert not folder.exists()


def test_disk_cache_keeps_each_feed_of_a_source_that_refills_one_array():
    """The files are written in a thread after the feed is yielded: what they hold must be the
    feed as it was, not the source's buffer refilled for the next one."""
    def refilled():
        buffer = np.zeros((64, 64), np.float32)
        for i in range(12):
            buffer[:] = i
            yield {"x": buffer}

    with DiskCache() as cache:
        part = cache.wrap(Part(refilled, None, 12))
        assert [float(f["x"][0, 0]) for f in part.batches()] == list(range(12))
        assert [float(f["x"].mean()) for f in part.batches()] == list(range(12))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_disk_cache_keeps_images_as_pixels_and_gives_the_same_feeds(tmp_path, rng, layout):
    """An image part is cached as uint8 pixels (a quarter of the float feed) and expanded on
    every read into exactly the feeds the part itself gives."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (9, 7, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    shape = (1, 3, 9, 7) if layout == "nchw" else (1, 9, 7, 3)
    pre = Preprocess(mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.25), channel_order="bgr", layout=layout)
    part = image_calibration(folder, [spec(shape)], pre, holdout=0).fit
    direct = [f["x"] for f in part.batches()]
    with DiskCache() as cache:
        cached = cache.wrap(part)
        for _ in range(2):  # the pass that fills the cache, then one that reads it
            feeds = [f["x"] for f in cached.batches()]
            assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(feeds, direct))
            assert len(feeds) == 3
        sizes = [p.stat().st_size for p in Path(cache._dir.name).iterdir()]
    assert sizes == [9 * 7 * 3] * 3  # one byte per pixel and channel


@pytest.mark.parametrize("name", ["file", "allow_pickle"])
def test_disk_cache_keeps_any_input_name(name):
    with DiskCache() as cache:
        part = cache.wrap(counted_part(2, [], name=name))
        for _ in range(2):
            assert [sorted(f) for f in part.batches()] == [sorted(["aux", name])] * 2


# --- resolve_input_specs -------------------------------------------------------------------------

def model_with_input(shape, rng):
    return conv_model(rng.standard_normal((2, 3, 3, 3)), None, shape)


def test_dynamic_batch_defaults_to_one(rng):
    (s,) = resolve_input_specs(model_with_input(["N", 3, 8, 8], rng), {}, "m.onnx")
    assert s == InputSpec("x", np.float32, (1, 3, 8, 8), True)
    (s,) = resolve_input_specs(model_with_input([2, 3, 8, 8], rng), {}, "m.onnx")
    assert s == InputSpec("x", np.float32, (2, 3, 8, 8), False)
    (s,) = resolve_input_specs(model_with_input(["N", 3, 8, 8], rng), {"x": (4, 3, 8, 8)}, "m.onnx")
    assert s.shape == (4, 3, 8, 8) and s.dynamic_batch


def test_other_dynamic_dims_need_input_shape(rng):
    model = model_with_input(["N", 3, "h", 8], rng)
    with pytest.raises(DwdError, match=r"m\.onnx: input x has dynamic dimensions \[N, 3, h, 8\]; give a shape "
                                       r"with --input-shape x:1,3,N,8"):
        resolve_input_specs(model, {}, "m.onnx")
    (s,) = resolve_input_specs(model, {"x": (1, 3, 5, 8)}, "m.onnx")
    assert s.shape == (1, 3, 5, 8)
    with pytest.raises(DwdError, match=r"--input-shape x: 3 dimensions given, but the input has 4"):
        resolve_input_specs(model, {"x": (1, 3, 5)}, "m.onnx")
    with pytest.raises(DwdError, match=r"--input-shape x: dimension 3 is fixed to 8"):
        resolve_input_specs(model, {"x": (1, 3, 5, 9)}, "m.onnx")


def test_initializers_listed_as_inputs_are_not_inputs(rng):
    model = model_with_input([1, 3, 8, 8], rng)
    model.graph.input.append(onnx.helper.make_tensor_value_info("W", onnx.TensorProto.FLOAT, [2, 3, 3, 3]))
    assert [s.name for s in resolve_input_specs(model, {}, "m.onnx")] == ["x"]


def test_input_without_any_shape_needs_input_shape():
    from onnx import TensorProto, helper

    from onnx_dwd.calib import resolve_input_specs
    from onnx_dwd.errors import DwdError
    vi = helper.make_tensor_value_info("x", TensorProto.FLOAT, None)
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [vi],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph)
    with pytest.raises(DwdError, match="no shape in the model.*--input-shape x:"):
        resolve_input_specs(model, {}, "m.onnx")
    (spec,) = resolve_input_specs(model, {"x": (2, 3, 4, 4)}, "m.onnx")
    assert spec.shape == (2, 3, 4, 4)


def test_max_images_limits_array_files_too(tmp_path, rng):
    from onnx_dwd import OptimizeConfig
    from onnx_dwd.api import load_calibration
    from onnx_dwd.calib import InputSpec
    spec = InputSpec("x", np.float32, (1, 3, 4, 4), True)
    for i in range(7):
        np.save(tmp_path / f"{i}.npy", rng.standard_normal((2, 3, 4, 4)).astype(np.float32))
    calib = load_calibration(OptimizeConfig(calib=tmp_path, max_images=5, holdout=0.2), [spec])
    assert calib.fit.count + calib.holdout.count == 5
