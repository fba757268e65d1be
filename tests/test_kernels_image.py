"""Convolution, pooling, resampling and detection kernels against onnxruntime (or the ONNX
reference evaluator), over the attributes, opsets and dtypes the ONNX node suite leaves out."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.opcases import (
    KernelCase,
    KernelTable,
    distinct,
    node_model,
    ours_and_reference,
    run,
    run_ort,
    run_reference,
)
from trainer.kernels import get_kernel
from trainer.kernels.nn import _windows

F32, F16, F64 = np.float32, np.float16, np.float64
BF16 = np.dtype(ml_dtypes.bfloat16)
_rng = np.random.default_rng(11)


def normal(*shape: int, dtype=F32) -> np.ndarray:
    return np.asarray(_rng.standard_normal(shape), dtype=dtype)


def uniform(lo: float, hi: float, *shape: int, dtype=F32) -> np.ndarray:
    return np.asarray(_rng.uniform(lo, hi, shape), dtype=dtype)


def i64(*values) -> np.ndarray:
    return np.array(values, np.int64)


def f32(*values) -> np.ndarray:
    return np.array(values, F32)


_table = KernelTable(opset=19, atol=1e-05, suffix="")
CASES = _table.cases
add = _table.add
Case = KernelCase


# -- Resize / Upsample -------------------------------------------------------------------------
# Binary-exact scales: a tie (x.5) in nearest rounding is a tie in float32 (onnxruntime) and
# float64 (ours, the ONNX reference) alike.
_img = normal(1, 2, 5, 7)
_up, _down = f32(1, 1, 1.75, 2.25), f32(1, 1, 0.625, 0.4375)
for mode_ in ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil"):
    for ctm in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel"):
        for sid, sc in (("up", _up), ("down", _down)):
            # align_corners: onnxruntime divides by (output size - 1), the ONNX reference (and
            # the node suite, and we) by (scale * input size - 1)
            add("Resize", f"nearest-{mode_}-{ctm}-{sid}", [("X", _img), ("roi", None),
                                                          ("scales", sc)],
                mode="nearest", nearest_mode=mode_, coordinate_transformation_mode=ctm,
                ref="reference" if ctm == "align_corners" else "ort")
for mode in ("linear", "cubic"):
    for ctm in ("half_pixel", "asymmetric", "align_corners", "pytorch_half_pixel",
                "half_pixel_symmetric"):
        for sid, sc in (("up", _up), ("down", _down)):
            # The ONNX reference misplaces taps at x = integer + 4e-16 (half_pixel_symmetric)
            add("Resize", f"{mode}-{ctm}-{sid}", [("X", _img), ("roi", None), ("scales", sc)],
                mode=mode, coordinate_transformation_mode=ctm,
                ref="ort" if ctm == "half_pixel_symmetric" else "reference")
        add("Resize", f"{mode}-{ctm}-sizes", [("X", _img), ("roi", None), ("scales", None),
                                              ("sizes", i64(1, 2, 9, 4))],
            mode=mode, coordinate_transformation_mode=ctm, ref="reference")
    add("Resize", f"{mode}-sizes-ort", [("X", _img), ("roi", None), ("scales", None),
                                        ("sizes", i64(1, 2, 9, 4))], mode=mode)
    add("Resize", f"{mode}-scales-ort", [("X", _img), ("roi", None), ("scales", _up)],
        mode=mode)
add("Resize", "cubic-a-exclude-outside", [("X", _img), ("roi", None), ("scales", _up)],
    mode="cubic", cubic_coeff_a=-0.5, exclude_outside=1)
add("Resize", "cubic-exclude-outside-down", [("X", _img), ("roi", None), ("scales", _down)],
    mode="cubic", exclude_outside=1)
for mode in ("linear", "cubic"):
    for sid, sc in (("down", _down), ("down-more", f32(1, 1, 0.3, 0.25)), ("up", _up)):
        add("Resize", f"{mode}-antialias-{sid}", [("X", normal(1, 2, 11, 13)), ("roi", None),
                                                  ("scales", sc)],
            mode=mode, antialias=1, ref="reference")
    add("Resize", f"{mode}-antialias-sizes-axes", [("X", normal(2, 3, 12, 10)), ("roi", None),
                                                   ("scales", None), ("sizes", i64(5, 3))],
        mode=mode, antialias=1, axes=[2, 3], ref="reference")
for mode in ("nearest", "linear"):
    add("Resize", f"{mode}-tf-crop-and-resize", [("X", _img), ("roi", f32(0, 0, 0.2, -0.1, 1, 1,
                                                                            0.9, 1.3)),
                                                 ("scales", None), ("sizes", i64(1, 2, 4, 6))],
        mode=mode, coordinate_transformation_mode="tf_crop_and_resize",
        extrapolation_value=-3.0)
add("Resize", "tf-crop-and-resize-axes-scales", [("X", _img), ("roi", f32(0.1, 0.8)),
                                                 ("scales", f32(1.5))],
    mode="linear", coordinate_transformation_mode="tf_crop_and_resize", axes=[3],
    ref="reference")
for policy in ("not_larger", "not_smaller"):
    for mode in ("nearest", "linear"):
        add("Resize", f"{mode}-{policy}", [("X", _img), ("roi", None), ("scales", None),
                                           ("sizes", i64(8, 9))],
            mode=mode, axes=[3, 2], keep_aspect_ratio_policy=policy)
add("Resize", "axes-negative", [("X", _img), ("roi", None), ("scales", f32(2.0, 0.5))],
    mode="linear", axes=[-1, -2])
add("Resize", "1d-cubic", [("X", normal(9)), ("roi", None), ("scales", f32(1.6))], mode="cubic",
    ref="reference")
add("Resize", "3d-linear", [("X", normal(1, 1, 3, 4, 5)), ("roi", None),
                            ("scales", f32(1, 1, 1.5, 0.5, 2))], mode="linear")
add("Resize", "3d-nearest", [("X", normal(1, 2, 3, 4, 5)), ("roi", None),
                             ("scales", f32(1, 1, 2, 0.5, 1.5))], mode="nearest")
add("Resize", "uint8-linear", [("X", _rng.integers(0, 256, (1, 1, 4, 5), dtype=np.uint8)),
                               ("roi", None), ("scales", f32(1, 1, 1.5, 1.7))], mode="linear",
    ref="reference")
add("Resize", "int32-nearest", [("X", _rng.integers(-99, 99, (1, 1, 4, 5), dtype=np.int32)),
                                ("roi", None), ("scales", f32(1, 1, 1.5, 0.7))])
add("Resize", "float16-linear", [("X", normal(1, 1, 4, 5, dtype=F16)), ("roi", None),
                                 ("scales", _up)], mode="linear", rtol=2e-3, atol=2e-3)
add("Resize", "float64-cubic", [("X", normal(1, 1, 4, 5, dtype=F64)), ("roi", None),
                                ("scales", _up)], mode="cubic", ref="reference")
add("Resize", "opset13-sizes-no-roi", [("X", _img), ("roi", None), ("scales", None),
                                       ("sizes", i64(1, 2, 3, 11))], mode="linear", opset=13)
add("Resize", "opset11-roi-empty-scales", [("X", _img), ("roi", np.zeros(0, F32)),
                                           ("scales", np.zeros(0, F32)),
                                           ("sizes", i64(1, 2, 3, 11))], mode="cubic",
    opset=11)
add("Resize", "opset11-tf-half-pixel-for-nn", [("X", _img), ("roi", np.zeros(0, F32)),
                                               ("scales", _up)],
    coordinate_transformation_mode="tf_half_pixel_for_nn", opset=11)
for mode in ("nearest", "linear"):
    for sid, sc in (("up", f32(1, 1, 2.5, 1.5)), ("down", f32(1, 1, 0.6, 0.35))):
        add("Resize", f"opset10-{mode}-{sid}", [("X", _img), ("scales", sc)], mode=mode,
            opset=10)
    add("Upsample", f"opset9-{mode}", [("X", _img), ("scales", f32(1, 1, 2.5, 1.5))],
        mode=mode, opset=9)
    add("Upsample", f"opset7-{mode}", [("X", _img)], mode=mode, scales=[1.0, 1.0, 2.0, 3.5],
        opset=7)
add("Upsample", "opset9-int64", [("X", _rng.integers(0, 9, (1, 2, 3), dtype=np.int64)),
                                 ("scales", f32(1, 2, 3))], opset=9, ref="reference")

# -- GridSample / AffineGrid -------------------------------------------------------------------
_gx, _grid = normal(2, 3, 5, 6), uniform(-1.3, 1.3, 2, 4, 7, 2)
for align in (0, 1):
    for pad in ("zeros", "border", "reflection"):
        for mode in ("bilinear", "nearest", "bicubic"):  # cubic pads taps, as PyTorch does
            add("GridSample", f"16-{mode}-{pad}-align{align}", [("X", _gx), ("grid", _grid)],
                opset=16, mode=mode, padding_mode=pad, align_corners=align)
        for mode in ("linear", "nearest"):
            add("GridSample", f"20-3d-{mode}-{pad}-align{align}",
                [("X", normal(1, 2, 3, 4, 5)), ("grid", uniform(-1.3, 1.3, 1, 2, 3, 4, 3))],
                opset=20, mode=mode, padding_mode=pad, align_corners=align)
        if pad != "border":  # the ONNX reference clamps the location, not the taps
            add("GridSample", f"20-3d-cubic-{pad}-align{align}",
                [("X", normal(1, 1, 3, 4, 5)), ("grid", uniform(-1.2, 1.2, 1, 2, 2, 3, 3))],
                opset=20, mode="cubic", padding_mode=pad, align_corners=align,
                ref="reference")
add("GridSample", "far-reflection", [("X", _gx), ("grid", uniform(-5, 5, 2, 3, 3, 2))],
    opset=20, padding_mode="reflection")
add("GridSample", "float64", [("X", normal(1, 2, 4, 4, dtype=F64)),
                              ("grid", uniform(-1.1, 1.1, 1, 3, 3, 2, dtype=F64))], opset=20,
    mode="cubic")
add("GridSample", "1d-linear", [("X", normal(2, 3, 7)), ("grid", uniform(-1.2, 1.2, 2, 5, 1))],
    opset=22, ref="reference")
for align in (0, 1):
    add("AffineGrid", f"2d-align{align}", [("theta", normal(2, 2, 3)), ("size", i64(2, 3, 4, 5))],
        opset=20, align_corners=align)
    add("AffineGrid", f"3d-align{align}", [("theta", normal(2, 3, 4)),
                                           ("size", i64(2, 1, 3, 4, 5))], opset=20,
        align_corners=align)

# -- CenterCropPad / Col2Im ------------------------------------------------------------------
add("CenterCropPad", "crop-and-pad-odd", [("x", normal(5, 8, 3)), ("shape", i64(2, 11, 3))],
    opset=18)
add("CenterCropPad", "axes-int32-shape", [("x", normal(3, 6, 7)),
                                          ("shape", np.array([9, 4], np.int32))],
    opset=18, axes=[2, 1], ref="reference")
add("CenterCropPad", "int64-data", [("x", _rng.integers(0, 9, (4, 5))), ("shape", i64(7, 2))],
    opset=18)
for sid, kw in (("3d", {}), ("strides-pads-dilations", {"strides": [2, 1], "pads": [1, 0, 2, 1],
                                                        "dilations": [1, 2]})):
    block = [2, 3] if sid != "3d" else [2, 2, 2]
    image = [7, 8] if sid != "3d" else [3, 4, 3]
    k = len(image)
    st_, pd, dl = kw.get("strides", [1] * k), kw.get("pads", [0] * 2 * k), kw.get("dilations",
                                                                                  [1] * k)
    nb = np.prod([(image[i] + pd[i] + pd[i + k] - (block[i] - 1) * dl[i] - 1) // st_[i] + 1
                  for i in range(k)])
    add("Col2Im", sid, [("x", normal(2, 3 * int(np.prod(block)), int(nb))),
                        ("image_shape", i64(*image)), ("block_shape", i64(*block))], opset=18,
        **kw)

# -- DeformConv --------------------------------------------------------------------------------
add("DeformConv", "groups-offset-groups-mask-bias",
    [("X", normal(2, 4, 6, 7)), ("W", normal(6, 2, 3, 2)), ("offset", normal(2, 24, 3, 3)),
     ("B", normal(6)), ("mask", uniform(0, 1, 2, 12, 3, 3))],
    group=2, offset_group=2, strides=[2, 3], pads=[1, 0, 1, 2], dilations=[1, 2], rtol=1e-4)
add("DeformConv", "large-offsets", [("X", normal(1, 2, 5, 5)), ("W", normal(3, 2, 2, 2)),
                                    ("offset", normal(1, 8, 4, 4) * 3)], rtol=1e-4)
add("DeformConv", "float64", [("X", normal(1, 1, 4, 4, dtype=F64)),
                              ("W", normal(2, 1, 3, 3, dtype=F64)),
                              ("offset", normal(1, 18, 2, 2, dtype=F64))])

# -- RoiAlign / MaxRoiPool ---------------------------------------------------------------------
_rx = normal(2, 3, 9, 11)
_rois = f32([1.2, 0.5, 7.9, 6.1], [-2.0, -1.5, 4.5, 3.0], [3.0, 4.0, 13.0, 12.5],
            [5.5, 2.0, 5.9, 2.2])
_bidx = i64(0, 1, 1, 0)
for opset, ctms in ((10, [None]), (16, ["half_pixel", "output_half_pixel"])):
    for ctm in ctms:
        for mode in ("avg", "max"):
            for ratio in (0, 2):
                attrs = {} if ctm is None else {"coordinate_transformation_mode": ctm}
                add("RoiAlign", f"{opset}-{ctm}-{mode}-ratio{ratio}",
                    [("X", _rx), ("rois", _rois), ("batch_indices", _bidx)], opset=opset,
                    mode=mode, sampling_ratio=ratio, output_height=3, output_width=4,
                    spatial_scale=0.9, rtol=1e-4, **attrs)
add("MaxRoiPool", "scaled", [("X", _rx), ("rois", f32([0, 1.2, 0.5, 7.9, 6.1],
                                                      [1, -2.0, -1.5, 4.5, 3.0],
                                                      [1, 3.0, 4.0, 13.0, 12.5],
                                                      [0, 5.5, 2.0, 5.9, 2.2]))],
    opset=18, pooled_shape=[3, 2], spatial_scale=0.8)

# -- NonMaxSuppression -------------------------------------------------------------------------
_centers = uniform(0, 10, 2, 30, 2)
_sizes = uniform(0.5, 4, 2, 30, 2)
_corners = np.concatenate([_centers - _sizes / 2, _centers + _sizes / 2], axis=-1)
_flip = _corners.copy()
_flip[:, ::2] = _flip[:, ::2][:, :, [2, 3, 0, 1]]
_scores = uniform(0, 1, 2, 3, 30)
_scores[0, 0, 5] = _scores[0, 0, 9]  # a tie: the lower index goes first
for sid, boxes, cpb in (("corners", _corners, 0), ("flipped", _flip, 0),
                        ("center", np.concatenate([_centers, _sizes], -1).astype(F32), 1)):
    add("NonMaxSuppression", sid, [("boxes", boxes), ("scores", _scores),
                                   ("max", i64(7)), ("iou", f32(0.3)), ("score", f32(0.2))],
        opset=11, center_point_box=cpb)
add("NonMaxSuppression", "no-score-threshold", [("boxes", _corners), ("scores", _scores),
                                                ("max", i64(100)), ("iou", f32(0.1))], opset=10)
add("NonMaxSuppression", "no-max", [("boxes", _corners), ("scores", _scores)], opset=11)

# -- Conv / ConvTranspose (combinations beyond tests/test_kernels.py) -------------------------
add("Conv", "3d-groups-dilations-same-lower", [("X", normal(1, 4, 5, 6, 4)),
                                               ("W", normal(6, 2, 2, 3, 2)), ("B", normal(6))],
    group=2, dilations=[2, 1, 2], strides=[1, 2, 2], auto_pad="SAME_LOWER", rtol=1e-4,
    ref="reference")  # onnxruntime refuses dilations with SAME padding
add("Conv", "float16", [("X", normal(1, 3, 5, 5, dtype=F16)), ("W", normal(2, 3, 3, 3, dtype=F16))],
    pads=[1, 1, 1, 1], rtol=1e-2, atol=1e-2)
add("Conv", "float64-opset1", [("X", normal(1, 2, 5, dtype=F64)), ("W", normal(3, 2, 2,
                                                                             dtype=F64))],
    opset=1, strides=[2], ref="reference")
add("ConvTranspose", "1d-groups-dilations-output-padding",
    [("X", normal(2, 4, 5)), ("W", normal(4, 3, 3)), ("B", normal(6))],
    group=2, dilations=[2], strides=[3], output_padding=[2], pads=[1, 2], rtol=1e-4)
add("ConvTranspose", "output-shape-same-upper", [("X", normal(1, 2, 3, 4)),
                                                 ("W", normal(2, 2, 3, 2))],
    strides=[2, 3], output_shape=[7, 11], auto_pad="SAME_UPPER", rtol=1e-4)
# an output_shape beyond the full result: the zeros go at the end (they went half at the
# start: another output than onnxruntime's and the reference's; found by a sweep)
add("ConvTranspose", "output-shape-beyond-the-full-result",
    [("X", normal(1, 1, 3, 3)), ("W", normal(1, 1, 3, 2))], strides=[3, 3],
    output_shape=[11, 9], ref="reference", rtol=1e-4)
add("ConvTranspose", "output-shape-one-beyond", [("X", normal(1, 1, 1, 1)),
                                                 ("W", normal(1, 1, 1, 1))],
    strides=[2, 3], output_shape=[1, 3], ref="reference", rtol=1e-4)
add("ConvTranspose", "3d-same-lower", [("X", normal(1, 2, 2, 3, 2)),
                                       ("W", normal(2, 1, 2, 3, 2))],
    strides=[2, 2, 1], auto_pad="SAME_LOWER", rtol=1e-4)

# -- pooling -----------------------------------------------------------------------------------
add("MaxPool", "ceil-dilations-pads-indices", [("X", distinct(_rng, (1, 2, 8, 9), dtype=F32))],
    opset=12, n_out=2, kernel_shape=[2, 3], strides=[3, 2], dilations=[2, 2],
    pads=[1, 0, 1, 1], ceil_mode=1)
for inc in (0, 1):
    add("AveragePool", f"ceil-pads-cip{inc}", [("X", normal(1, 2, 7, 8))], opset=19,
        kernel_shape=[3, 3], strides=[2, 3], pads=[1, 1, 1, 0], ceil_mode=1,
        count_include_pad=inc)
for inc in (0, 1):  # (HF EfficientNet's AvgPool2d(1280, ceil_mode=True) on an 8x8 map)
    add("AveragePool", f"kernel-past-input-cip{inc}", [("X", normal(2, 3, 5, 6))], opset=19,
        kernel_shape=[40, 40], strides=[40, 40], ceil_mode=1, count_include_pad=inc)
    add("AveragePool", f"kernel-past-input-pads-cip{inc}", [("X", normal(2, 3, 5, 6))],
        opset=19, kernel_shape=[9, 7], strides=[9, 7], pads=[1, 0, 2, 1], ceil_mode=1,
        count_include_pad=inc)
_px = normal(2, 3, 7, 8)
for p in (1, 2, 3):
    add("LpPool", f"p{p}-pads-strides", [("X", _px)], opset=18, p=p, kernel_shape=[3, 2],
        strides=[2, 2], pads=[1, 0, 1, 1])
add("LpPool", "ceil-dilations", [("X", _px)], opset=18, kernel_shape=[2, 3], strides=[2, 2],
    dilations=[2, 1], ceil_mode=1, rtol=1e-4)
add("LpPool", "opset11-same-lower", [("X", _px)], opset=11, kernel_shape=[3, 3],
    auto_pad="SAME_LOWER")
add("LpPool", "opset2-1d", [("X", normal(2, 3, 9))], opset=2, kernel_shape=[3], strides=[2])
add("LpPool", "float64-3d", [("X", normal(1, 2, 4, 5, 3, dtype=F64))], opset=18,
    kernel_shape=[2, 2, 2], p=3, ref="reference")
add("GlobalLpPool", "p3", [("X", _px)], opset=2, p=3)
add("GlobalLpPool", "default-1d", [("X", normal(2, 3, 9))], opset=2)
_mp = distinct(_rng, (2, 3, 6, 7), dtype=F32)
add("MaxPool", "opset1", [("X", _mp)], opset=1, kernel_shape=[3, 2], strides=[2, 2],
    pads=[1, 0, 1, 1])
add("MaxPool", "opset8-indices-same-upper", [("X", _mp)], opset=8, n_out=2,
    kernel_shape=[3, 3], strides=[2, 2], auto_pad="SAME_UPPER")
add("MaxPool", "opset12-uint8-ceil", [("X", _rng.integers(0, 255, (1, 2, 5, 6), dtype=np.uint8))],
    opset=12, kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
add("AveragePool", "opset7-count-include-pad", [("X", _px)], opset=7, kernel_shape=[3, 3],
    pads=[1, 1, 1, 1], count_include_pad=1)
add("AveragePool", "float16", [("X", normal(1, 2, 5, 5, dtype=F16))], opset=19,
    kernel_shape=[2, 2], rtol=2e-3, atol=2e-3)
_pool_x = distinct(_rng, (1, 2, 4, 6), dtype=F32)
add("MaxUnpool", "roundtrip-3d", [("X", normal(1, 2, 2, 2, 3)),
                                  ("I", np.arange(24).reshape(1, 2, 2, 2, 3) * 2)],
    opset=11, kernel_shape=[2, 2, 2], strides=[2, 2, 2])

# -- CausalConvWithState -----------------------------------------------------------------------
for sid, ins, attrs in (
        ("bias-past-silu", [("x", normal(2, 3, 6)), ("w", normal(3, 1, 4)), ("b", normal(3)),
                            ("past", normal(2, 3, 3))], {"activation": "silu"}),
        ("no-past-short", [("x", normal(1, 2, 1)), ("w", normal(2, 1, 3))], {}),
        ("bfloat16", [("x", normal(1, 2, 5).astype(BF16)), ("w", normal(2, 1, 2).astype(BF16))],
         {})):
    add("CausalConvWithState", sid, ins, opset=27, n_out=2, ref="reference", rtol=1e-2,
        atol=1e-2, **attrs)


def _cast32(a):
    a = np.asarray(a)
    return a.astype(F32) if a.dtype == BF16 else a


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("c", CASES, ids=str)
def test_kernel_matches_reference(c: Case) -> None:
    ours, want = ours_and_reference(c)
    for name in want:
        got, exp = np.asarray(ours[name]), np.asarray(want[name])
        assert got.shape == exp.shape, f"{c.id} {name}: shape {got.shape} != {exp.shape}"
        assert got.dtype == exp.dtype, f"{c.id} {name}: dtype {got.dtype} != {exp.dtype}"
        if exp.dtype.kind in "fcV":
            np.testing.assert_allclose(_cast32(got), _cast32(exp), rtol=c.rtol, atol=c.atol,
                                       err_msg=c.id)
        else:
            np.testing.assert_array_equal(got, exp, err_msg=c.id)


# -- cases checked against explicit expectations ------------------------------------------------
def test_upsample_opset1_matches_opset7() -> None:
    x = normal(1, 2, 3, 4)
    for mode, mode7 in (("nearest", "nearest"), ("bilinear", "linear")):
        m1 = node_model("Upsample", [("X", x)], opset=1, mode=mode, height_scale=2.0,
                        width_scale=1.5)
        m1.ir_version = 3
        m7 = node_model("Upsample", [("X", x)], opset=7, mode=mode7, scales=[1.0, 1.0, 2.0, 1.5])
        np.testing.assert_allclose(run(m1, {"X": x})["y0"], run_ort(m7, {"X": x})["y0"],
                                   rtol=1e-6, atol=1e-6)


def test_averagepool_opset1_matches_opset7_without_pads_counted() -> None:
    # (the ONNX reference counts pads when the attribute is absent; opset 7 made excluding them
    # the explicit default)
    x, kw = _px, {"kernel_shape": [3, 2], "pads": [1, 1, 1, 0], "strides": [2, 1]}
    m1 = node_model("AveragePool", [("X", x)], opset=1, **kw)
    m7 = node_model("AveragePool", [("X", x)], opset=7, count_include_pad=0, **kw)
    np.testing.assert_allclose(run(m1, {"X": x})["y0"], run_ort(m7, {"X": x})["y0"],
                               rtol=1e-6, atol=1e-6)


def test_globallppool_opset1_float_p_matches_opset2() -> None:
    x = normal(2, 3, 4, 5)
    m1 = node_model("GlobalLpPool", [("X", x)], opset=1, p=3.0)
    m2 = node_model("GlobalLpPool", [("X", x)], opset=2, p=3)
    np.testing.assert_allclose(run(m1, {"X": x})["y0"], run_ort(m2, {"X": x})["y0"],
                               rtol=1e-5)


def test_maxunpool_inverts_maxpool_indices() -> None:
    x = _pool_x
    pool = node_model("MaxPool", [("X", x)], 2, opset=12, kernel_shape=[2, 2], strides=[2, 2])
    y, idx = (run(pool, {"X": x})[k] for k in ("y0", "y1"))
    unpool = node_model("MaxUnpool", [("X", y), ("I", idx)], opset=11, kernel_shape=[2, 2],
                        strides=[2, 2])
    got = run(unpool, {"X": y, "I": idx})["y0"]
    assert_same_as_ort = run_ort(unpool, {"X": y, "I": idx})["y0"]
    np.testing.assert_array_equal(got, assert_same_as_ort)
    np.testing.assert_array_equal(got != 0, np.isin(x, y))


def test_maxunpool_output_shape_pads_at_the_end() -> None:
    # ONNX's reference and backend test: scatter into the inferred shape, then zero-pad.
    x, idx = f32(5, 6, 7, 8).reshape(1, 1, 2, 2), i64(5, 7, 13, 15).reshape(1, 1, 2, 2)
    m = node_model("MaxUnpool", [("X", x), ("I", idx), ("S", i64(1, 1, 5, 5))], opset=11,
                   kernel_shape=[2, 2], strides=[2, 2])
    got = run(m, {"X": x, "I": idx, "S": i64(1, 1, 5, 5)})["y0"]
    np.testing.assert_array_equal(got, run_reference(m, {"X": x, "I": idx,
                                                         "S": i64(1, 1, 5, 5)})["y0"])


def test_maxpool_bfloat16_matches_float32() -> None:
    x = distinct(_rng, (1, 2, 5, 6), dtype=F32).astype(BF16)
    kw = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [2, 2]}
    got = run(node_model("MaxPool", [("X", x)], 2, opset=22, **kw), {"X": x})
    want = run(node_model("MaxPool", [("X", x.astype(F32))], 2, opset=22, **kw),
               {"X": x.astype(F32)})
    assert got["y0"].dtype == BF16
    np.testing.assert_array_equal(got["y0"].astype(F32), want["y0"])
    np.testing.assert_array_equal(got["y1"], want["y1"])


def test_nonmaxsuppression_keeps_iou_equal_to_threshold() -> None:
    boxes = f32([0, 0, 1, 2], [0, 1, 1, 3], [0, 0.5, 1, 2.5]).reshape(1, 3, 4)
    scores = f32(0.9, 0.8, 0.7).reshape(1, 1, 3)
    m = node_model("NonMaxSuppression", [("b", boxes), ("s", scores), ("m", i64(3)),
                                         ("t", f32(1 / 3))], opset=11)
    got = run(m, {"b": boxes, "s": scores, "m": i64(3), "t": f32(1 / 3)})["y0"]
    # box 1 overlaps box 0 with IoU exactly 1/3 (kept); box 2 overlaps box 0 by 0.6 (dropped)
    np.testing.assert_array_equal(got[:, 2], [0, 1])


@pytest.mark.parametrize("attrs", [
    {"mode": "linear"}, {"mode": "cubic", "exclude_outside": 1},
    {"mode": "cubic", "antialias": 1, "scales": f32(1, 1, 0.4, 0.7)},
    {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize",
     "roi": f32(0, 0, -0.2, 0.1, 1, 1, 0.7, 1.2), "extrapolation_value": 2.0}], ids=str)
def test_resize_gather_path_matches_dense_path(attrs, monkeypatch) -> None:
    import trainer.kernels.image as image

    attrs = dict(attrs)
    scales, roi = attrs.pop("scales", f32(1, 1, 1.6, 2.2)), attrs.pop("roi", None)
    x = normal(2, 3, 6, 7)
    m = node_model("Resize", [("X", x), ("roi", roi), ("scales", scales)], **attrs)
    feeds = {"X": x, "scales": scales} | ({} if roi is None else {"roi": roi})
    dense = run(m, feeds)["y0"]
    monkeypatch.setattr(image, "_DENSE_LIMIT", 0)
    np.testing.assert_allclose(run(m, feeds)["y0"], dense, rtol=1e-5, atol=1e-6)


def test_every_op_has_a_kernel_at_each_version() -> None:
    for op, opsets in (("Resize", [10, 11, 13, 18, 19]), ("Upsample", [1, 7, 9]),
                       ("MaxPool", [1, 8, 10, 11, 12, 22]), ("AveragePool", [1, 7, 10, 11, 19]),
                       ("LpPool", [1, 2, 11, 18]), ("GlobalLpPool", [1, 2]),
                       ("GridSample", [16, 20, 22]), ("RoiAlign", [10, 16, 22]),
                       ("MaxUnpool", [9, 11, 22]), ("DeformConv", [19, 22]),
                       ("NonMaxSuppression", [10, 11]), ("MaxRoiPool", [1, 22]),
                       ("Col2Im", [18]), ("CenterCropPad", [18]), ("AffineGrid", [20]),
                       ("CausalConvWithState", [27])):
        for v in opsets:
            assert get_kernel(op, v) is not None, (op, v)
    assert get_kernel("Resize", 10) is not get_kernel("Resize", 11)
    assert get_kernel("GridSample", 16) is not get_kernel("GridSample", 20)
    assert get_kernel("RoiAlign", 10) is not get_kernel("RoiAlign", 16)


# -- properties --------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 3), st.integers(1, 5), st.integers(1, 5),
       st.sampled_from(["nearest", "linear", "cubic"]))
def test_resize_integer_upscale_half_pixel_nearest_is_repeat(sh, sw, h, w, mode) -> None:
    x = normal(1, 1, h, w)
    m = node_model("Resize", [("X", x), ("roi", None), ("scales", f32(1, 1, sh, sw))],
                   mode="nearest", coordinate_transformation_mode="asymmetric",
                   nearest_mode="floor")
    got = run(m, {"X": x, "scales": f32(1, 1, sh, sw)})["y0"]
    np.testing.assert_array_equal(got, np.repeat(np.repeat(x, sh, axis=2), sw, axis=3))
    # any mode with unit scales is the identity
    m = node_model("Resize", [("X", x), ("roi", None), ("scales", f32(1, 1, 1, 1))], mode=mode)
    np.testing.assert_array_equal(run(m, {"X": x, "scales": f32(1, 1, 1, 1)})["y0"], x)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(2, 6), st.integers(2, 6), st.integers(0, 1),
       st.sampled_from(["linear", "nearest", "cubic"]))
def test_identity_affine_grid_samples_the_input(n, h, w, align, mode) -> None:
    x = normal(n, 2, h, w)
    theta = np.tile(f32([1, 0, 0], [0, 1, 0]), (n, 1, 1))
    size = i64(n, 2, h, w)
    grid = run(node_model("AffineGrid", [("t", theta), ("s", size)], opset=20,
                          align_corners=align), {"t": theta, "s": size})["y0"]
    m = node_model("GridSample", [("X", x), ("g", grid)], opset=20, mode=mode,
                   align_corners=align)
    np.testing.assert_allclose(run(m, {"X": x, "g": grid})["y0"], x, rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=2, max_size=2),
       st.lists(st.integers(1, 2), min_size=2, max_size=2),
       st.lists(st.integers(1, 2), min_size=2, max_size=2),
       st.lists(st.integers(0, 2), min_size=4, max_size=4))
def test_col2im_is_the_adjoint_of_im2col(block, strides, dilations, pads) -> None:
    image = [7, 6]
    x = normal(1, 2, *image, dtype=F64)
    padded = np.pad(x, [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    out = [(padded.shape[2 + i] - (block[i] - 1) * dilations[i] - 1) // strides[i] + 1
           for i in range(2)]
    cols = _windows(np, padded, block, strides, dilations, out)  # [1, 2, *out, *block]
    cols = cols.transpose(0, 1, 4, 5, 2, 3).reshape(1, 2 * np.prod(block), -1)
    c = normal(*cols.shape, dtype=F64)
    m = node_model("Col2Im", [("c", c), ("i", i64(*image)), ("b", i64(*block))], opset=18,
                   strides=strides, dilations=dilations, pads=pads)
    folded = run(m, {"c": c, "i": i64(*image), "b": i64(*block)})["y0"]
    np.testing.assert_allclose((cols * c).sum(), (x * folded).sum(), rtol=1e-10)


def _conv_transpose_by_definition(x, w, b, strides, pads, out_sp, group):
    """Cropped ConvTranspose in float64 from its definition: input i, tap k adds x[i] w[k] at
    full position i * s + k, output o = full position o + begin pad (no dilation)."""
    n, c = x.shape[:2]
    k = x.ndim - 2
    mg, cg = w.shape[1], c // group
    y = np.zeros((n, group * mg) + tuple(out_sp))
    for i in np.ndindex(*x.shape[2:]):
        for t in np.ndindex(*w.shape[2:]):
            o = tuple(i[d] * strides[d] + t[d] - pads[d] for d in range(k))
            if not all(0 <= o[d] < out_sp[d] for d in range(k)):
                continue
            for gi in range(group):
                xs = x[(slice(None), slice(gi * cg, (gi + 1) * cg)) + i].astype(np.float64)
                ws = w[(slice(gi * cg, (gi + 1) * cg), slice(None)) + t].astype(np.float64)
                y[(slice(None), slice(gi * mg, (gi + 1) * mg)) + o] += xs @ ws
    if b is not None:
        y += b.reshape((-1,) + (1,) * k)
    return y


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(1, 4), min_size=1, max_size=3),
       st.data(), st.booleans(), st.sampled_from([1, 2]))
def test_conv_transpose_by_phases_matches_the_definition(n, kernel, data, bias, group) -> None:
    """The strided ConvTranspose as one stride-1 Conv per output phase (also the input gradient
    of every strided Conv) against the definition: strides below, at and above the kernel
    (phases no tap reaches), asymmetric and negative pads (output_shape past the full
    result), output_padding, groups, 1-3 spatial axes."""
    from trainer.kernels import nn

    k = len(kernel)
    strides = data.draw(st.lists(st.integers(1, 4), min_size=k, max_size=k))
    if all(s == 1 for s in strides):
        strides[0] = 2
    spatial = data.draw(st.lists(st.integers(1, 5), min_size=k, max_size=k))
    pads = data.draw(st.lists(st.integers(-2, 3), min_size=2 * k, max_size=2 * k))
    full = [(spatial[d] - 1) * strides[d] + kernel[d] for d in range(k)]
    out_sp = [full[d] - pads[d] - pads[d + k] for d in range(k)]
    if min(out_sp) < 1:
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 16)))
    c, mg = 2 * group, 3
    x = rng.standard_normal((n, c) + tuple(spatial)).astype(F32)
    w = rng.standard_normal((c, mg) + tuple(kernel)).astype(F32)
    b = rng.standard_normal(group * mg).astype(F32) if bias else None
    got = nn.conv_transpose_into(np, x, w, b, strides, [1] * k, pads, [0] * k, full, group,
                                 method="phases")
    want = _conv_transpose_by_definition(x, w, b, strides, pads, out_sp, group)
    assert got.shape == want.shape and got.dtype == F32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _conv_by_definition(x, w, b, pads, out_sp):
    """A stride-1 2-D Conv in float64 from its definition (zero padding)."""
    kh, kw = w.shape[2:]
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pads[0], max(0, pads[2])),
                                       (pads[1], max(0, pads[3]))])
    y = np.zeros((x.shape[0], w.shape[0]) + tuple(out_sp))
    for a in range(kh):
        for c in range(kw):
            patch = xp[:, :, a:a + out_sp[0], c:c + out_sp[1]]
            y += np.einsum("nchw,mc->nmhw", patch, w[:, :, a, c].astype(np.float64))
    return y if b is None else y + b.reshape(-1, 1, 1)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.integers(1, 6), st.integers(1, 11),
       st.integers(1, 11), st.lists(st.integers(0, 2), min_size=4, max_size=4), st.booleans(),
       st.sampled_from([np.float32, np.float64]), st.integers(0, 2 ** 16))
def test_winograd_conv_matches_the_definition(n, c, m, h, wd, pads, bias, dtype, seed) -> None:
    """3x3 stride-1 convolutions by Winograd's F(2x2, 3x3) on the host (forced at every size),
    and their weight gradients (F(3x3, 2x2)): odd and even outputs (the last tiles cropped),
    asymmetric pads, bias or none, float32 and float64, against the definition in float64;
    the error is the im2col path's order."""
    from trainer.kernels import compiled, nn

    pytest.importorskip("numba")
    out_sp = [h + pads[0] + pads[2] - 2, wd + pads[1] + pads[3] - 2]
    if min(out_sp) < 1 or not compiled.enabled():
        return
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, wd)).astype(dtype)
    w = rng.standard_normal((m, c, 3, 3)).astype(dtype)
    b = rng.standard_normal(m).astype(dtype) if bias else None
    assert nn._winograd(np, x, w, [1, 1], [1, 1], pads, 1) == (18 * m * x.size >= 4_000_000)
    got = nn.winograd_into(x, w, b, pads, out_sp)
    want = _conv_by_definition(x, w, b, pads, out_sp)
    assert got.shape == want.shape and got.dtype == dtype
    tol = 2e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * np.sqrt(9 * c))
    # the weight gradient of the same convolution, from an output gradient dy
    dy = rng.standard_normal((n, m) + tuple(out_sp)).astype(dtype)
    dw = nn.winograd_weight_grad_into(x, dy, pads)
    xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])])
    want = np.stack([np.stack([np.einsum("nmhw,nchw->mc", dy.astype(np.float64),
                                         xp[:, :, a:a + out_sp[0], e:e + out_sp[1]])
                               for e in range(3)], -1) for a in range(3)], -2)
    assert dw.shape == (m, c, 3, 3) and dw.dtype == dtype
    np.testing.assert_allclose(dw, want, rtol=tol,
                               atol=tol * np.sqrt(n * out_sp[0] * out_sp[1]) * 4)


def test_large_3x3_convolutions_and_their_input_gradients_take_winograd(monkeypatch) -> None:
    """On the host with the compiled loops, a 3x3 stride-1 Conv above WINOGRAD_MIN_FLOPS, a
    stride-1 ConvTranspose (a Conv's input gradient) as the Conv of its flipped kernel, and the
    weight gradient, run Winograd's; a smaller one, a strided one and a grouped one keep
    im2col (then the results are the same bits with the compiled path off). Float32 results
    within twice the im2col path's distance from the float64 definition."""
    pytest.importorskip("numba")
    from trainer.kernels import compiled, convloops, nn

    calls = []
    real = convloops.input_transform
    monkeypatch.setattr(convloops, "input_transform", lambda *a: (calls.append(1), real(*a)))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16, 16, 16)).astype(F32)
    w = rng.standard_normal((16, 16, 3, 3)).astype(F32)
    y = nn.conv_into(np, x, w, None, [1, 1], [1, 1], [1, 1, 1, 1], [16, 16], 1)
    assert calls
    want = _conv_by_definition(x, w, None, [1, 1, 1, 1], [16, 16])
    monkeypatch.setenv(compiled.ENV, "0")
    im2col = nn.conv_into(np, x, w, None, [1, 1], [1, 1], [1, 1, 1, 1], [16, 16], 1)
    monkeypatch.delenv(compiled.ENV)
    assert np.abs(y - want).max() <= 2 * np.abs(im2col - want).max()
    calls.clear()
    gy = rng.standard_normal((8, 16, 16, 16)).astype(F32)
    dx = nn.conv_transpose_into(np, gy, w, None, [1, 1], [1, 1], [1, 1, 1, 1], [0, 0],
                                [18, 18], 1)
    assert calls
    np.testing.assert_allclose(dx, _conv_transpose_by_definition(
        gy, w, None, [1, 1], [1, 1], [16, 16], 1), rtol=2e-5, atol=1e-4)
    calls.clear()  # the weight gradient, with dy of the forward's shape
    dw = nn.conv_weight_grad_into(np, x, gy, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1)
    assert calls
    monkeypatch.setenv(compiled.ENV, "0")
    np.testing.assert_allclose(dw, nn.conv_weight_grad_into(
        np, x, gy, [3, 3], [1, 1], [1, 1], [1, 1, 1, 1], 1), rtol=1e-5, atol=1e-3)
    monkeypatch.delenv(compiled.ENV)
    calls.clear()
    small = x[:1, :2, :6, :6]
    for args in [(small, w[:2, :2]), (x, w, [2, 2]), (x[:, :8], w[:, :8], [1, 1], 2)]:
        xi, wi = args[:2]
        strides = args[2] if len(args) > 2 else [1, 1]
        group = args[3] if len(args) > 3 else 1
        wg = wi if group == 1 else wi[:, :wi.shape[1] // group]
        out = [(xi.shape[2] + 2 - 3) // strides[0] + 1, (xi.shape[3] + 2 - 3) // strides[1] + 1]
        got = nn.Conv(np, xi, wg, strides=strides, pads=[1, 1, 1, 1], group=group)[0]
        monkeypatch.setenv(compiled.ENV, "0")
        ref = nn.Conv(np, xi, wg, strides=strides, pads=[1, 1, 1, 1], group=group)[0]
        monkeypatch.delenv(compiled.ENV)
        assert got.shape[2:] == tuple(out)
        np.testing.assert_array_equal(got, ref)
    assert not calls


def run_op(op: str, inputs, **attrs) -> np.ndarray:
    """The first output of op's opset-18 kernel."""
    return get_kernel(op, 18)(np, *inputs, **attrs)[0]


def test_conv_transpose_output_shape_with_batch_and_channels_is_refused() -> None:
    """ConvTranspose's output_shape gives the spatial sizes only (as onnxruntime checks); one
    with N and C too is refused by name, not read as a 1x1 output."""
    x = np.zeros((1, 2, 3, 3), F32)
    w = np.zeros((2, 1, 3, 3), F32)
    with pytest.raises(ValueError, match="spatial sizes only"):
        run_op("ConvTranspose", [x, w], strides=[2, 2], output_shape=[1, 1, 7, 6])
    y = run_op("ConvTranspose", [x, w], strides=[2, 2], output_shape=[7, 6])
    assert y.shape == (1, 1, 7, 6)


def test_col2im_input_that_does_not_match_the_blocks_is_refused() -> None:
    """Col2Im's input must hold one column per sliding block of the padded image (12 here);
    another count is refused, not folded into a made-up channel count."""
    image, block = np.array([5, 6], np.int64), np.array([2, 2], np.int64)
    attrs = {"dilations": [2, 1], "pads": [1, 0, 0, 1], "strides": [1, 2]}
    y = run_op("Col2Im", [np.ones((1, 8, 12), F32), image, block], **attrs)
    assert y.shape == (1, 2, 5, 6)
    with pytest.raises(ValueError, match="must be \\[N, C \\* 4, 12\\]"):
        run_op("Col2Im", [np.ones((1, 8, 6), F32), image, block], **attrs)


@pytest.mark.parametrize("scale,length,want", [(1.4, 5, 7), (1.8, 5, 9), (7 / 3, 3, 7),
                                               (7 / 6, 6, 7), (0.6, 4, 2), (2.0, 3, 6)])
def test_resize_output_length_from_float32_scales(scale, length, want) -> None:
    """floor(length * scale) taken in float32, the scales' type, as onnxruntime (and PyTorch,
    whose exporter writes F.interpolate's scale_factor so) take it: 5 * float32(1.4) rounds to
    7; the product in float64, 6.99999988, gave 6 rows, where a U-Net's skip connection has 7."""
    from onnx import helper

    from tests.opcases import make_model
    from trainer.kernels import get_kernel

    x = np.random.default_rng(0).standard_normal((1, 2, length)).astype(np.float32)
    scales = np.array([1, 1, scale], np.float32)
    (y,) = get_kernel("Resize", 13)(np, x, None, scales, mode="linear")
    assert y.shape == (1, 2, want)
    ref = run_ort(make_model([helper.make_node("Resize", ["x", "", "sc"], ["y"], mode="linear")],
                             inputs={"x": x}, initializers={"sc": scales}, opset=13), {"x": x})
    np.testing.assert_allclose(y, ref["y"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ctm,nearest_mode", [("asymmetric", "floor"),
                                               ("half_pixel", "round_prefer_floor"),
                                               ("pytorch_half_pixel", "round_prefer_floor"),
                                               ("asymmetric", "round_prefer_ceil")])
def test_resize_nearest_picks_onnxruntimes_pixels_at_any_scale(ctm, nearest_mode) -> None:
    """Nearest resizing by float32 scales such as 0.6, 1.1 or 2.2 (F.interpolate's
    scale_factor, exported as asymmetric/floor): the source coordinate in float64 kept the
    float32 scale's rounding, 3 / float32(0.6) = 4.9999998 took pixel 4 where onnxruntime
    and PyTorch take 5 (28 of 88 cases apart from PyTorch); an axis whose length the scale
    keeps (8 rows by 1.1) was resampled, repeating its first row (found by a torch.nn layer
    sweep). The coordinate is computed in float32 and such an axis is copied, as onnxruntime
    does."""
    from onnx import helper

    from tests.opcases import make_model

    for n in (3, 5, 7, 8, 10, 11, 13):
        x = np.arange(n * n, dtype=F32).reshape(1, 1, n, n)
        for s in (0.3, 0.45, 0.6, 0.7, 1.1, 1.5, 2.2, 2.5, 3.3):
            scales = np.array([1, 1, s, s], F32)
            attrs = {"mode": "nearest", "coordinate_transformation_mode": ctm,
                     "nearest_mode": nearest_mode}
            (y,) = get_kernel("Resize", 19)(np, x, None, scales, **attrs)
            ref = run_ort(make_model([helper.make_node("Resize", ["x", "", "sc"], ["y"],
                                                       **attrs)],
                                     inputs={"x": x}, initializers={"sc": scales}, opset=19),
                          {"x": x})["y"]
            np.testing.assert_array_equal(y, ref, err_msg=f"{n} rows by {s}")


def test_resize_nearest_by_scale_factor_is_pytorchs_interpolate() -> None:
    import torch

    for n in (5, 8, 10):
        x = np.arange(n * n, dtype=F32).reshape(1, 1, n, n)
        for s in (0.6, 1.1, 2.2):
            (y,) = get_kernel("Resize", 19)(np, x, None, np.array([1, 1, s, s], F32),
                                            mode="nearest",
                                            coordinate_transformation_mode="asymmetric",
                                            nearest_mode="floor")
            want = torch.nn.functional.interpolate(torch.from_numpy(x), scale_factor=s,
                                                   mode="nearest").numpy()
            np.testing.assert_array_equal(y, want, err_msg=f"{n} rows by {s}")


def test_resize_with_both_scales_and_sizes_and_a_conv_that_does_not_fit_are_refused() -> None:
    """Resize given scales and sizes took the scales, and a Conv whose kernel_shape or channels
    disagree with its weight ran on whatever fit; onnxruntime refuses both."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    x = np.ones((1, 2, 4, 4), np.float32)
    with pytest.raises(ModelError, match="scales and sizes are both given"):
        get_kernel("Resize", 13)(np, x, None, np.array([1, 1, 2, 2], np.float32),
                                 np.array([1, 2, 8, 8]))
    w = np.ones((3, 2, 3, 3), np.float32)
    with pytest.raises(ModelError, match=r"kernel_shape \[2, 2\] does not match the weight's "
                                         r"spatial shape \[3, 3\]"):
        get_kernel("Conv", 11)(np, x, w, kernel_shape=[2, 2])
    with pytest.raises(ModelError, match="the input needs 4 axes and 1 x group 2 = 2 channels"):
        get_kernel("Conv", 11)(np, x[:, :1], w[:, :1][:2], group=2)
    assert get_kernel("Conv", 11)(np, x, w, kernel_shape=[3, 3])[0].shape == (1, 3, 2, 2)


def test_conv_transpose_refuses_an_output_padding_past_its_stride() -> None:
    """output_padding must lie below the stride or the dilation (PyTorch and onnxruntime refuse
    more); the engine added that many rows of the bias alone."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    x, w = np.ones((1, 2, 3, 3), np.float32), np.ones((2, 1, 3, 3), np.float32)
    f = get_kernel("ConvTranspose", 11)
    with pytest.raises(ModelError, match=r"axis 0: 2, stride 2, dilation 1"):
        f(np, x, w, strides=[2, 2], output_padding=[2, 1])
    assert f(np, x, w, strides=[2, 2], output_padding=[1, 1])[0].shape == (1, 1, 8, 8)


@pytest.mark.parametrize("op,attrs,x_shape,w_shape,said", [
    ("Conv", {}, (1, 1, 2, 5), (1, 1, 3, 3), "the window (kernel 3, dilation 1: 3 wide) is "
     "wider than spatial axis 0 of the input, 2 with pads 0 and 0: no output"),
    ("Conv", {"group": 3}, (1, 6, 2, 5), (3, 2, 3, 3), "is wider than spatial axis 0"),
    ("MaxPool", {"kernel_shape": [4]}, (1, 1, 3), None, "is wider than spatial axis 0"),
    ("ConvTranspose", {"dilations": [2], "pads": [2, 2]}, (2, 2, 3), (2, 2, 1),
     "ConvTranspose: the output's spatial axis 0 would be -1 long (the full result 3, less "
     "pads 2 and 2)"),
    # (an auto_pad of no known value ran as NOTSET; onnxruntime refuses it)
    ("Conv", {"auto_pad": "bogus"}, (1, 1, 4, 4), (1, 1, 3, 3),
     "auto_pad 'bogus' is none of NOTSET, SAME_UPPER, SAME_LOWER and VALID"),
    ("MaxPool", {"kernel_shape": [2], "auto_pad": b"same"}, (1, 1, 4), None, "auto_pad 'same'"),
    ("ConvTranspose", {"auto_pad": "BOGUS"}, (1, 1, 4), (1, 1, 3), "auto_pad 'BOGUS'"),
])
def test_a_geometry_without_output_is_refused(op, attrs, x_shape, w_shape, said) -> None:
    """onnxruntime refuses these ("Invalid input shape", "Computed output dimension is <=
    0"); the engine gave an empty result and zero gradients (Conv), a NumPy reshape error
    (grouped Conv), or a result of negative size whose input gradient had another shape
    (ConvTranspose)."""
    from trainer.errors import ModelError

    x = np.ones(x_shape)
    args = [x] if w_shape is None else [x, np.ones(w_shape)]
    with pytest.raises(ModelError) as err:
        get_kernel(op, 18)(np, *args, **attrs)
    assert said in str(err.value), str(err.value)


# (ai.onnx_trainer's op for the gradient of a MaxPool before opset 8: test_kernels' coverage)
TESTED_OPS = {"MaxPoolIndices"}


@pytest.mark.parametrize("attrs", [
    {"kernel_shape": [2, 2], "strides": [2, 2]},
    {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]},
    {"kernel_shape": [2, 2], "strides": [2, 2], "storage_order": 1},
    {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1},
    {"kernel_shape": [2, 2], "dilations": [2, 2]},
    {"kernel_shape": [3, 3], "auto_pad": "SAME_UPPER", "strides": [2, 2]}])
def test_max_pool_indices_are_onnxruntimes_max_pool_indices(attrs) -> None:
    """ai.onnx_trainer.MaxPoolIndices(X, Y) gives what MaxPool's Indices output (opset 8 on)
    gives, at any opset: onnxruntime's, ties included (the first maximal element)."""
    from onnx import helper

    from tests.opcases import make_model
    from trainer.kernels import CUSTOM_DOMAIN

    x = np.round(np.random.default_rng(0).standard_normal((2, 3, 7, 6)), 1).astype(F32)
    ref = run_ort(make_model([helper.make_node("MaxPool", ["x"], ["y", "i"], **attrs)],
                             inputs={"x": x}, outputs=["y", "i"], opset=12), {"x": x})
    (got,) = get_kernel("MaxPoolIndices", 1, CUSTOM_DOMAIN)(np, x, ref["y"], **attrs)
    np.testing.assert_array_equal(got, ref["i"])
