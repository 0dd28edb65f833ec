"""Dataset readers and image / mask loading: known pixel values and named errors."""

import numpy as np
import pytest
from PIL import Image

from fiseclip_jax.data import (
    MVTEC_CATEGORIES,
    MVTEC_TEXTURES,
    Category,
    DataError,
    Sample,
    list_folder,
    list_mvtec,
    list_visa,
    load_image,
    load_mask,
    validate_category,
)


def save(path, array, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kw).save(path)
    return path


def make_mvtec(root, category="widget", size=(6, 8)):
    """Tiny MVTec-layout category: 2 good, 2 'crack' with masks."""
    h, w = size
    rng = np.random.default_rng(0)
    for name in ("000.png", "001.png"):
        save(root / category / "test" / "good" / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        save(root / category / "test" / "crack" / name, rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        mask = np.zeros((h, w), np.uint8)
        mask[1:3, 2:4] = 255
        save(root / category / "ground_truth" / "crack" / name.replace(".png", "_mask.png"), mask)
    return root


# ------------------------------------------------------------ real MVTec AD
def test_real_bottle_category(mvtec_root):
    (bottle,) = list_mvtec(mvtec_root, ["bottle"])
    assert bottle.name == "bottle" and bottle.dataset == "mvtec" and bottle.class_name == "bottle"
    assert len(bottle.samples) == 83
    assert sum(s.mask_path is not None for s in bottle.samples) == 63
    assert sum(s.label == 0 and s.defect == "good" for s in bottle.samples) == 20
    assert all((s.label == 1) == (s.mask_path is not None) for s in bottle.samples)
    paths = [s.path for s in bottle.samples]
    assert paths == sorted(paths)  # defect folder, then file name
    validate_category(bottle)
    anomalous = next(s for s in bottle.samples if s.label == 1)
    image, mask = load_image(anomalous.path), load_mask(anomalous.mask_path)
    assert image.dtype == np.uint8 and image.shape == (*mask.shape, 3) and mask.any()


# -------------------------------------------------------------- MVTec layout
def test_list_mvtec_layout_and_names(tmp_path):
    make_mvtec(tmp_path, "metal_nut")
    (cat,) = list_mvtec(tmp_path)
    assert cat.class_name == "metal nut"
    assert [(s.defect, s.label) for s in cat.samples] == [("crack", 1)] * 2 + [("good", 0)] * 2
    assert cat.samples[0].mask_path == str(tmp_path / "metal_nut/ground_truth/crack/000_mask.png")
    assert cat.samples[2].mask_path is None
    validate_category(cat)
    assert "metal_nut" in MVTEC_CATEGORIES
    assert set(MVTEC_TEXTURES) == {"carpet", "grid", "leather", "tile", "wood"}


def test_unknown_category_lists_found_ones(tmp_path):
    make_mvtec(tmp_path, "widget")
    with pytest.raises(DataError, match=r"'bottle'.*found: widget"):
        list_mvtec(tmp_path, "bottle")


def test_defect_image_without_mask(tmp_path):
    make_mvtec(tmp_path)
    (tmp_path / "widget/ground_truth/crack/001_mask.png").unlink()
    (cat,) = list_mvtec(tmp_path)
    with pytest.raises(DataError, match=r"crack/001\.png has no mask"):
        validate_category(cat)


def test_mask_size_differs_from_image(tmp_path):
    make_mvtec(tmp_path, size=(6, 8))
    save(tmp_path / "widget/ground_truth/crack/000_mask.png", np.zeros((6, 7), np.uint8))
    (cat,) = list_mvtec(tmp_path)
    with pytest.raises(DataError, match=r"000_mask\.png is 7x6 but its image .*crack/000\.png is 8x6"):
        validate_category(cat)


def test_truncated_image(tmp_path):
    make_mvtec(tmp_path)
    path = tmp_path / "widget/test/good/001.png"
    save(path, np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"good/001\.png"):
        load_image(path)
    (cat,) = list_mvtec(tmp_path)
    with pytest.raises(DataError, match=r"good/001\.png"):
        validate_category(cat)
    path.write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"good/001\.png"):
        load_image(path)
    with pytest.raises(DataError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


# ------------------------------------------------------------ image modes
def test_image_modes_load_to_uint8_rgb(tmp_path):
    folder = tmp_path / "mixed"
    gray = np.array([[0, 7, 128, 255]], np.uint8)
    save(folder / "a_gray.png", gray)  # L
    rgba = np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255], [1, 2, 3, 4]]], np.uint8)
    save(folder / "b_rgba.png", rgba)  # alpha dropped, colours as stored
    pal = Image.new("P", (4, 1))
    pal.putpalette([0, 0, 0, 255, 0, 0, 0, 128, 255] + [0] * (256 * 3 - 9))
    pal.putdata([0, 1, 2, 1])
    pal.save(folder / "c_palette.png")
    sixteen = np.array([[0, 257, 40000, 65535]], np.uint16)
    save(folder / "d_sixteen.png", sixteen)  # I;16: scaled, 40000 must not clip to 255
    assert Image.open(folder / "d_sixteen.png").mode in ("I;16", "I")
    assert Image.open(folder / "c_palette.png").mode == "P"

    cat = list_folder(folder)
    assert cat.name == "mixed" and cat.dataset == "folder" and not cat.has_masks
    assert [s.label for s in cat.samples] == [None] * 4
    images = [load_image(s.path) for s in cat.samples]
    for image in images:
        assert image.dtype == np.uint8 and image.shape == (1, 4, 3)
    np.testing.assert_array_equal(images[0], np.repeat(gray[..., None], 3, -1))
    np.testing.assert_array_equal(images[1], rgba[..., :3])
    np.testing.assert_array_equal(images[2][0], [[0, 0, 0], [255, 0, 0], [0, 128, 255], [255, 0, 0]])
    # round(v * 255 / 65535): 257 -> 1, 40000 -> 155.6 -> 156.
    np.testing.assert_array_equal(images[3][0], np.repeat([[0], [1], [156], [255]], 3, -1))


# -------------------------------------------------------------------- masks
def test_load_mask_resize_rules(tmp_path):
    # Left half of a 4x4 mask set. PIL bilinear 4 -> 8 samples source x = j/2 - 1/4:
    # columns 0-2 stay 1.0, column 3 is 0.75, column 4 is 0.25, columns 5-7 are 0.
    mask = np.zeros((4, 4), np.uint8)
    mask[:, :2] = 255
    path = save(tmp_path / "m.png", mask)
    np.testing.assert_array_equal(load_mask(path), mask > 0)
    loose = load_mask(path, 8)
    strict = load_mask(path, 8, strict=True)
    assert loose.dtype == bool and loose.shape == (8, 8)
    np.testing.assert_array_equal(loose, np.tile(np.arange(8) < 4, (8, 1)))  # > 0.5
    np.testing.assert_array_equal(strict, np.tile(np.arange(8) < 3, (8, 1)))  # == 1.0
    # VisA-style masks marked with 1, and coloured RGB masks, are foreground too.
    ones = save(tmp_path / "ones.png", (mask > 0).astype(np.uint8))
    np.testing.assert_array_equal(load_mask(ones, 8), loose)
    colour = np.zeros((4, 4, 3), np.uint8)
    colour[:, :2, 1] = 200
    np.testing.assert_array_equal(load_mask(save(tmp_path / "c.png", colour)), mask > 0)


# ----------------------------------------------------------------- folders
def test_folder_with_labels_and_masks(tmp_path):
    rng = np.random.default_rng(0)
    img = lambda: rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)  # noqa: E731
    root = tmp_path / "parts"
    save(root / "good" / "g1.PNG", img())
    save(root / "scratch" / "s1.jpg", img())
    save(root / "scratch" / "s2.bmp", img())
    save(root / "dent" / "d1.tif", img())
    (root / "scratch" / "notes.txt").write_text("not an image")
    masks = tmp_path / "masks"
    save(masks / "scratch" / "s1.png", np.full((5, 5), 255, np.uint8))  # nested, <stem>.png
    save(masks / "s2_mask.png", np.full((5, 5), 255, np.uint8))  # flat, <stem>_mask.png
    save(masks / "d1_mask.png", np.full((5, 5), 255, np.uint8))

    cat = list_folder(root, masks=masks, name="my_part")
    assert cat.name == "my_part" and cat.class_name == "my part" and cat.has_masks
    got = {tuple(s.path.rsplit("/", 2)[-2:]): (s.label, s.defect, s.mask_path) for s in cat.samples}
    assert got == {
        ("dent", "d1.tif"): (1, "dent", str(masks / "d1_mask.png")),
        ("good", "g1.PNG"): (0, "good", None),
        ("scratch", "s1.jpg"): (1, "scratch", str(masks / "scratch" / "s1.png")),
        ("scratch", "s2.bmp"): (1, "scratch", str(masks / "s2_mask.png")),
    }
    validate_category(cat)

    (masks / "d1_mask.png").unlink()
    with pytest.raises(DataError, match=r"dent/d1\.tif has no mask"):
        validate_category(list_folder(root, masks=masks))
    # Without a masks folder, anomalous images need none.
    validate_category(list_folder(root))


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty_dir"
    (empty / "sub").mkdir(parents=True)
    (empty / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="empty_dir"):
        list_folder(empty)
    with pytest.raises(DataError, match="no_such_dir"):
        list_folder(tmp_path / "no_such_dir")


# -------------------------------------------------------------------- VisA
def test_list_visa(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["object,split,label,image,mask"]
    for obj in ("pipe_fryum", "candle"):
        for i, (split, label) in enumerate([("train", "normal"), ("test", "normal"), ("test", "anomaly")]):
            folder = "Normal" if label == "normal" else "Anomaly"
            image = f"{obj}/Data/Images/{folder}/{i:03d}.JPG"
            save(tmp_path / image, rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
            mask = ""
            if label == "anomaly":
                mask = f"{obj}/Data/Masks/Anomaly/{i:03d}.png"
                save(tmp_path / mask, np.ones((4, 6), np.uint8))
            rows.append(f"{obj},{split},{label},{image},{mask}")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")

    cats = list_visa(tmp_path)
    assert [c.name for c in cats] == ["candle", "pipe_fryum"]
    assert cats[1].class_name == "pipe fryum"
    for cat in cats:
        assert cat.dataset == "visa" and len(cat.samples) == 2  # train row skipped
        normal, anomalous = sorted(cat.samples, key=lambda s: s.label)
        assert (normal.label, normal.defect, normal.mask_path) == (0, "good", None)
        assert anomalous.label == 1 and anomalous.mask_path.endswith("Masks/Anomaly/002.png")
        validate_category(cat)
        assert load_mask(anomalous.mask_path).all()
    with pytest.raises(DataError, match=r"'pcb1'.*found: candle, pipe_fryum"):
        list_visa(tmp_path, ["pcb1"])
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows + ["candle,test,weird,x.JPG,"]) + "\n")
    with pytest.raises(DataError, match=r"1cls\.csv line 8"):
        list_visa(tmp_path)
    with pytest.raises(DataError, match=r"1cls\.csv"):
        list_visa(tmp_path / "split_csv")


def test_validate_empty_category():
    with pytest.raises(DataError, match="no samples"):
        validate_category(Category("x", "folder", ()))
    assert Sample("a.png", None, None, None).label is None
