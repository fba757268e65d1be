"""Gradients of convolution, pooling and resampling ops against float64 finite differences and
onnxruntime: Conv/ConvTranspose in every geometry, pools at every opset form, LRN, Col2Im,
MaxUnpool, CausalConvWithState, Resize/Upsample, GridSample, AffineGrid, CenterCropPad,
DeformConv, RoiAlign, MaxRoiPool."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from tests.gradcheck import (
    ATOL,
    RTOL,
    Case,
    CaseTable,
    check_case,
    check_float32,
    finite_differences,
    gradients,
    ints,
    loss_model,
    nonzero,
    normal,
)
from tests.opcases import distinct, make_model
from trainer.errors import ModelError

_rng = np.random.default_rng(2024)
table = CaseTable()
add = table.add


def pool_input(*shape: int) -> np.ndarray:
    return distinct(_rng, shape, spread=2.0)


# -- Conv ---------------------------------------------------------------------------------------
add("Conv", "group2-dilation-stride", [("X", normal(2, 4, 7, 6)), ("W", normal(6, 2, 2, 3)),
                                       ("B", normal(6))],
    group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 0, 0, 1])
add("Conv", "depthwise-stride2", [("X", normal(2, 3, 6, 6)), ("W", normal(3, 1, 3, 3)),
                                  ("B", normal(3))], group=3, strides=[2, 2], pads=[1, 1, 1, 1])
add("Conv", "depthwise-multiplier2", [("X", normal(1, 2, 5, 5)), ("W", normal(4, 1, 3, 2))],
    group=2)
add("Conv", "valid", [("X", normal(1, 2, 6, 5)), ("W", normal(3, 2, 3, 3))], auto_pad="VALID",
    strides=[2, 2])
add("Conv", "uncovered-tail", [("X", normal(1, 2, 9, 4)), ("W", normal(2, 2, 2, 2))],
    strides=[4, 1], dilations=[1, 2])
# (onnxruntime's Conv rejects dilations with SAME padding)
add("Conv", "same-upper-stride3", [("X", normal(1, 2, 7, 6)), ("W", normal(2, 2, 3, 2))],
    strides=[3, 2], auto_pad="SAME_UPPER")
add("Conv", "same-lower-group", [("X", normal(1, 4, 5, 6)), ("W", normal(4, 2, 2, 3))],
    strides=[1, 2], auto_pad="SAME_LOWER", group=2)
add("Conv", "1d-group", [("X", normal(2, 4, 9)), ("W", normal(2, 2, 3)), ("B", normal(2))],
    group=2, strides=[2], pads=[2, 1])
add("Conv", "3d-group-dilation", [("X", normal(1, 4, 5, 4, 5)), ("W", normal(2, 2, 2, 2, 2)),
                                  ("B", normal(2))], group=2, dilations=[2, 1, 2],
    strides=[1, 2, 1], pads=[0, 1, 1, 1, 0, 0])
add("Conv", "1x1", [("X", normal(2, 3, 4, 4)), ("W", normal(5, 3, 1, 1))])
add("Conv", "only-X", [("X", normal(1, 2, 5, 5)), ("W", normal(3, 2, 3, 3))], wrt=["X"],
    strides=[2, 2], pads=[1, 1, 1, 1])
add("Conv", "only-B", [("X", normal(1, 2, 5, 5)), ("W", normal(3, 2, 3, 3)), ("B", normal(3))],
    wrt=["B"])
add("Conv", "uncovered-tail-opset7", [("X", normal(1, 2, 9, 4)), ("W", normal(2, 2, 2, 2))],
    strides=[4, 1], opset=7)
for _o in (11, 7):
    add("Conv", f"group2-opset{_o}", [("X", normal(1, 4, 6, 6)), ("W", normal(4, 2, 3, 3)),
                                      ("B", normal(4))], group=2, strides=[3, 3], opset=_o)

# -- ConvTranspose ------------------------------------------------------------------------------
add("ConvTranspose", "output-shape-beyond-the-full-result",
    [("X", normal(1, 1, 3, 3)), ("W", normal(1, 1, 3, 2))], strides=[3, 3],
    output_shape=[11, 9])
add("ConvTranspose", "basic", [("X", normal(2, 3, 4, 4)), ("W", normal(3, 2, 3, 3)),
                               ("B", normal(2))])
add("ConvTranspose", "stride2-pads-outpad", [("X", normal(1, 2, 3, 4)),
                                             ("W", normal(2, 3, 3, 2))],
    strides=[2, 3], pads=[1, 0, 0, 1], output_padding=[1, 2])
add("ConvTranspose", "dilation", [("X", normal(1, 2, 4, 3)), ("W", normal(2, 2, 2, 3)),
                                  ("B", normal(2))], dilations=[2, 2], strides=[2, 1])
add("ConvTranspose", "group2", [("X", normal(2, 4, 3, 3)), ("W", normal(4, 3, 2, 2)),
                                ("B", normal(6))], group=2, strides=[2, 2], pads=[0, 1, 1, 0])
add("ConvTranspose", "depthwise", [("X", normal(1, 3, 4, 4)), ("W", normal(3, 1, 3, 3))],
    group=3, strides=[2, 2], pads=[1, 1, 1, 1])
add("ConvTranspose", "output-shape", [("X", normal(1, 2, 3, 3)), ("W", normal(2, 2, 3, 3))],
    strides=[2, 2], output_shape=[7, 8])
add("ConvTranspose", "output-shape-smaller", [("X", normal(1, 2, 3, 3)),
                                              ("W", normal(2, 2, 3, 3))],
    strides=[2, 2], output_shape=[5, 6])
add("ConvTranspose", "same-upper", [("X", normal(1, 2, 3, 4)), ("W", normal(2, 2, 3, 2))],
    strides=[2, 2], auto_pad="SAME_UPPER")
add("ConvTranspose", "same-lower", [("X", normal(1, 2, 3, 3)), ("W", normal(2, 3, 2, 3))],
    strides=[2, 1], auto_pad="SAME_LOWER")
add("ConvTranspose", "valid", [("X", normal(1, 2, 3, 3)), ("W", normal(2, 2, 2, 2))],
    strides=[2, 2], auto_pad="VALID")
add("ConvTranspose", "1d", [("X", normal(2, 3, 5)), ("W", normal(3, 2, 3)), ("B", normal(2))],
    strides=[2], pads=[1, 2], output_padding=[1])
add("ConvTranspose", "3d", [("X", normal(1, 2, 2, 3, 2)), ("W", normal(2, 2, 2, 2, 2)),
                            ("B", normal(2))], strides=[2, 1, 2], pads=[0, 1, 1, 0, 0, 1])
add("ConvTranspose", "only-W", [("X", normal(2, 2, 3, 3)), ("W", normal(2, 2, 3, 3))],
    wrt=["W"], strides=[2, 2], output_padding=[1, 0])
add("ConvTranspose", "output-shape-smaller-opset9", [("X", normal(1, 2, 3, 3)),
                                                     ("W", normal(2, 2, 3, 3))],
    strides=[2, 2], output_shape=[5, 6], opset=9)
add("ConvTranspose", "opset11", [("X", normal(1, 2, 3, 3)), ("W", normal(2, 2, 2, 2)),
                                 ("B", normal(2))], strides=[2, 2], pads=[1, 0, 0, 1], opset=11)

# -- MaxPool: scatter from opset 16 (or without overlap from 11), one-hot taps before ----------
_MAXPOOL = [  # id, shape, attributes
    ("overlap", (1, 2, 5, 5), {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("pads", (2, 1, 5, 6), {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 1, 1, 0]}),
    ("nonoverlap", (1, 2, 4, 6), {"kernel_shape": [2, 2], "strides": [2, 2]}),
    ("ceil", (1, 1, 6, 7), {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}),
    ("dilation", (1, 2, 7, 6), {"kernel_shape": [2, 2], "dilations": [2, 2]}),
    ("dilation-ceil-pads", (1, 2, 8, 9), {"kernel_shape": [3, 2], "dilations": [2, 1],
                                          "strides": [2, 2], "pads": [1, 0, 1, 1],
                                          "ceil_mode": 1}),
    ("storage-order1", (2, 1, 5, 4), {"kernel_shape": [2, 3], "strides": [1, 1],
                                      "storage_order": 1}),
    ("same-lower", (1, 2, 5, 5), {"kernel_shape": [3, 2], "strides": [2, 2],
                                  "auto_pad": "SAME_LOWER"}),
    ("1d", (2, 2, 9), {"kernel_shape": [3], "strides": [2], "pads": [1, 1]}),
    ("3d", (1, 1, 4, 5, 4), {"kernel_shape": [2, 3, 2], "strides": [1, 2, 2]}),
    ("stride-exceeds-kernel", (1, 2, 7, 7), {"kernel_shape": [2, 2], "strides": [3, 3]}),
]
for _id, _shape, _attrs in _MAXPOOL:
    _x = pool_input(*_shape)
    for _o in (18, 12, 10):
        if _o == 10 and "dilations" in _attrs and "ceil_mode" in _attrs:
            _o = 11
        add("MaxPool", f"{_id}-opset{_o}", [("X", _x)], opset=_o, **_attrs)
add("MaxPool", "indices-output", [("X", pool_input(1, 2, 4, 4))], n_out=2, kernel_shape=[2, 2])
add("MaxPool", "opset8", [("X", pool_input(1, 2, 5, 5))], opset=8, kernel_shape=[3, 3],
    strides=[2, 2], pads=[1, 1, 1, 1])
add("MaxPool", "opset8-storage-order1", [("X", pool_input(1, 1, 4, 5))], opset=8,
    kernel_shape=[2, 3], storage_order=1)

# -- AveragePool, LpPool, global pools --------------------------------------------------------
add("AveragePool", "3d-cip1", [("X", normal(1, 2, 4, 5, 4))], kernel_shape=[2, 3, 2],
    strides=[2, 1, 2], pads=[1, 1, 0, 0, 1, 1], count_include_pad=1)
add("AveragePool", "dilation-ceil-opset19", [("X", normal(1, 2, 7, 8))], kernel_shape=[2, 3],
    dilations=[2, 1], strides=[2, 2], ceil_mode=1, pads=[0, 1, 1, 0], opset=19)
add("AveragePool", "same-lower-cip1", [("X", normal(1, 1, 5, 6))], kernel_shape=[3, 2],
    strides=[2, 2], auto_pad="SAME_LOWER", count_include_pad=1)
add("AveragePool", "opset10-ceil", [("X", normal(1, 2, 6, 6))], kernel_shape=[3, 3],
    strides=[2, 2], ceil_mode=1, opset=10)
for _inc in (0, 1):  # (one window over all of x, the kernel far past it: HF EfficientNet's)
    add("AveragePool", f"kernel-past-input-cip{_inc}", [("X", normal(2, 3, 5, 6))],
        kernel_shape=[40, 40], strides=[40, 40], ceil_mode=1, count_include_pad=_inc,
        opset=19)
    add("AveragePool", f"kernel-past-input-pads-cip{_inc}", [("X", normal(1, 2, 5, 6))],
        kernel_shape=[9, 7], strides=[9, 7], pads=[1, 0, 2, 1], ceil_mode=1,
        count_include_pad=_inc, opset=19)
for _p in (2, 3, 1):
    add("LpPool", f"p{_p}-pads-stride", [("X", nonzero(2, 2, 5, 6))], p=_p,
        kernel_shape=[3, 2], strides=[2, 2], pads=[1, 0, 1, 1])
    add("GlobalLpPool", f"p{_p}", [("X", nonzero(2, 3, 3, 4))], p=_p)
add("LpPool", "ceil-dilation", [("X", nonzero(1, 2, 7, 6))], kernel_shape=[2, 2],
    dilations=[2, 1], strides=[2, 2], ceil_mode=1)
add("LpPool", "1d-same-upper", [("X", nonzero(2, 2, 7))], kernel_shape=[3], strides=[2],
    auto_pad="SAME_UPPER")
add("LpPool", "opset11", [("X", nonzero(1, 2, 5, 5))], kernel_shape=[2, 2], opset=11)
add("LpPool", "zero-window", [("X", np.concatenate([np.zeros((1, 1, 2, 4)),
                                                    nonzero(1, 1, 2, 4)], axis=2))],
    kernel_shape=[2, 2], strides=[2, 2])
add("GlobalLpPool", "1d", [("X", nonzero(2, 3, 5))])
# (before opset 9 the sign of x in their gradients is written without Sign)
add("LpPool", "p1-opset8", [("X", nonzero(1, 2, 5, 5))], kernel_shape=[2, 2], p=1, opset=8)
add("GlobalLpPool", "p3-opset8", [("X", nonzero(2, 3, 3, 4))], p=3, opset=8)
add("GlobalMaxPool", "2d", [("X", pool_input(2, 3, 4, 5))])
add("GlobalMaxPool", "3d", [("X", pool_input(1, 2, 3, 2, 4))])
add("GlobalAveragePool", "3d", [("X", normal(2, 2, 3, 2, 4))])

# -- MaxUnpool, Col2Im, LRN ---------------------------------------------------------------------
_idx = np.array([0, 3, 9, 14, 17, 23, 25, 30, 36, 39, 44, 47, 49, 55, 56, 63]).reshape(1, 2, 2, 4)
add("MaxUnpool", "basic", [("X", normal(1, 2, 2, 4)), ("I", _idx)], kernel_shape=[2, 2],
    strides=[2, 2])
add("MaxUnpool", "output-shape-larger", [("X", normal(1, 2, 2, 4)), ("I", _idx),
                                         ("S", ints(1, 2, 5, 9))],
    kernel_shape=[2, 2], strides=[2, 2])
add("MaxUnpool", "output-shape-smaller", [("X", normal(1, 2, 2, 4)), ("I", _idx),
                                          ("S", ints(1, 2, 3, 8))],
    kernel_shape=[2, 2], strides=[2, 2])
add("MaxUnpool", "pads", [("X", normal(1, 1, 3, 3)),
                          ("I", np.array([4, 0, 8, 1, 3, 6, 2, 7, 5]).reshape(1, 1, 3, 3))],
    kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
add("Col2Im", "basic", [("X", normal(2, 8, 9)), ("img", ints(4, 4)), ("blk", ints(2, 2))])
add("Col2Im", "stride-dilation-pads", [("X", normal(1, 12, 6)), ("img", ints(5, 6)),
                                       ("blk", ints(2, 3))],
    strides=[2, 2], dilations=[2, 1], pads=[1, 0, 0, 1])
add("Col2Im", "3d", [("X", normal(1, 8, 8)), ("img", ints(3, 3, 3)), ("blk", ints(2, 2, 2))])
for _size in (3, 4, 1):
    add("LRN", f"size{_size}", [("X", normal(2, 5, 3, 2))], size=_size, alpha=0.3, beta=0.7,
        bias=1.5)
add("LRN", "defaults-rank3", [("X", normal(2, 4, 3))], size=5)
add("LRN", "rank2", [("X", normal(3, 6))], size=3, alpha=0.5)

# -- CausalConvWithState (opset 27; onnxruntime has no kernel for it) --------------------------
_ccws = {"X": normal(2, 3, 5), "W": normal(3, 1, 3), "B": normal(3), "P": normal(2, 3, 2)}
for _act in ("none", "silu"):
    add("CausalConvWithState", f"{_act}-state", [(n, _ccws[n]) for n in "XWBP"], n_out=2,
        opset=27, activation=_act)
    add("CausalConvWithState", f"{_act}-no-state", [("X", _ccws["X"]), ("W", _ccws["W"])],
        n_out=2, opset=27, activation=_act)
add("CausalConvWithState", "short-input", [("X", normal(1, 2, 2)), ("W", normal(2, 1, 4)),
                                           ("B", None), ("P", normal(1, 2, 3))],
    n_out=2, opset=27)
add("CausalConvWithState", "state-only", [(n, _ccws[n]) for n in "XWBP"], n_out=2, use=(1,),
    opset=27)
# onnxruntime has no CausalConvWithState, and its LRN takes 4-D inputs and odd sizes only, its
# MaxUnpool no output_shape below the inferred shape
NO_ORT = {"CausalConvWithState", "LRN-size4", "LRN-defaults-rank3", "LRN-rank2",
          "MaxUnpool-output-shape-smaller"}

# -- Resize / Upsample ----------------------------------------------------------------------------
def f32(*v: float) -> np.ndarray:
    return np.array(v, np.float32)


_x4 = normal(2, 3, 4, 5)
add("Resize", "nearest-2x", [("X", _x4), ("roi", None), ("scales", f32(1, 1, 2, 2))])
add("Resize", "nearest-3x-asym-floor", [("X", normal(1, 2, 3, 4)), ("roi", None),
                                        ("scales", f32(1, 1, 3, 3))],
    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
add("Resize", "nearest-down-ceil", [("X", normal(1, 2, 6, 7)), ("roi", None),
                                    ("scales", f32(1, 1, 0.5, 0.6))], nearest_mode="ceil")
add("Resize", "nearest-1.5x-tf-half-pixel", [("X", normal(1, 1, 4, 4)), ("roi", None),
                                             ("scales", f32(1, 1, 1.5, 1.5))],
    coordinate_transformation_mode="tf_half_pixel_for_nn", nearest_mode="round_prefer_ceil")
for _ctm in ("half_pixel", "align_corners", "pytorch_half_pixel", "asymmetric",
             "half_pixel_symmetric"):
    add("Resize", f"linear-up-{_ctm}", [("X", _x4), ("roi", None),
                                        ("scales", f32(1, 1, 1.5, 2.2))],
        mode="linear", coordinate_transformation_mode=_ctm, opset=19)
add("Resize", "linear-down", [("X", normal(1, 2, 7, 8)), ("roi", None),
                              ("scales", f32(1, 1, 0.6, 0.5))], mode="linear")
add("Resize", "linear-down-antialias", [("X", normal(1, 2, 7, 8)), ("roi", None),
                                        ("scales", f32(1, 1, 0.6, 0.5))], mode="linear",
    antialias=1)
add("Resize", "cubic-up", [("X", _x4), ("roi", None), ("scales", f32(1, 1, 2, 1.6))],
    mode="cubic")
add("Resize", "cubic-exclude-outside-a", [("X", _x4), ("roi", None),
                                          ("scales", f32(1, 1, 1.7, 2))],
    mode="cubic", exclude_outside=1, cubic_coeff_a=-0.5)
add("Resize", "cubic-down-antialias", [("X", normal(1, 1, 9, 8)), ("roi", None),
                                       ("scales", f32(1, 1, 0.5, 0.7))], mode="cubic",
    antialias=1)
add("Resize", "tf-crop-and-resize", [("X", normal(1, 2, 5, 6)),
                                     ("roi", f32(0, 0, 0.2, -0.1, 1, 1, 0.9, 1.2)),
                                     ("scales", f32(1, 1, 1.6, 1.5))],
    mode="linear", coordinate_transformation_mode="tf_crop_and_resize",
    extrapolation_value=0.5)
add("Resize", "sizes", [("X", _x4), ("roi", None), ("scales", None), ("sizes", ints(2, 3, 7, 3))],
    mode="linear")
add("Resize", "sizes-not-larger-axes", [("X", _x4), ("roi", None), ("scales", None),
                                        ("sizes", ints(9, 9))],
    mode="linear", axes=[2, 3], keep_aspect_ratio_policy="not_larger")
add("Resize", "outer-axes", [("X", normal(2, 3, 4, 2)), ("roi", None),
                             ("scales", f32(1.5, 2, 1, 1))])
add("Resize", "rank3-all-axes-linear", [("X", normal(3, 4, 5)), ("roi", None),
                                        ("scales", f32(1.4, 0.8, 1.3))], mode="linear")
add("Resize", "opset13-linear", [("X", _x4), ("roi", None), ("scales", f32(1, 1, 2, 2))],
    mode="linear", opset=13)
add("Resize", "opset11-nearest-sizes", [("X", _x4), ("roi", f32()), ("scales", f32()),
                                        ("sizes", ints(2, 3, 8, 7))], opset=11)
add("Resize", "opset10-linear", [("X", _x4), ("scales", f32(1, 1, 2, 1.5))], mode="linear",
    opset=10)
add("Resize", "opset10-nearest", [("X", _x4), ("scales", f32(1, 1, 2, 0.5))], opset=10)
add("Upsample", "opset9-nearest", [("X", _x4), ("scales", f32(1, 1, 2, 3))], opset=9)
add("Upsample", "opset9-linear", [("X", _x4), ("scales", f32(1, 1, 2, 1.5))], mode="linear",
    opset=9)
add("Upsample", "opset7-bilinear-attr", [("X", _x4)], scales=[1.0, 1.0, 2.0, 2.0],
    mode="linear", opset=7)

# -- CenterCropPad, AffineGrid ------------------------------------------------------------------
add("CenterCropPad", "crop-and-pad", [("X", normal(2, 5, 4)), ("shape", ints(3, 7))],
    axes=[1, 2])
add("CenterCropPad", "all-axes", [("X", normal(3, 4, 6)), ("shape", ints(2, 5, 3))])
add("CenterCropPad", "negative-axis", [("X", normal(2, 3, 5)), ("shape", ints(2))], axes=[-1])
for _ac in (0, 1):
    add("AffineGrid", f"2d-align{_ac}", [("theta", normal(2, 2, 3)), ("size", ints(2, 3, 4, 5))],
        align_corners=_ac, opset=20)
add("AffineGrid", "3d", [("theta", normal(2, 3, 4)), ("size", ints(2, 1, 3, 2, 4))], opset=20)

# -- GridSample ---------------------------------------------------------------------------------
_gx, _gg = normal(2, 3, 4, 5), _rng.uniform(-1.25, 1.25, (2, 3, 4, 2))
for _mode in ("bilinear", "bicubic", "nearest"):
    for _pad in ("zeros", "border", "reflection"):
        for _ac in (0, 1):
            add("GridSample", f"{_mode}-{_pad}-align{_ac}", [("X", _gx), ("grid", _gg)],
                mode=_mode, padding_mode=_pad, align_corners=_ac, opset=16)
add("GridSample", "3d-linear-border", [("X", normal(1, 2, 3, 4, 3)),
                                       ("grid", _rng.uniform(-1.2, 1.2, (1, 2, 3, 2, 3)))],
    mode="linear", padding_mode="border", opset=20)
add("GridSample", "3d-linear-reflection", [("X", normal(1, 2, 3, 4, 3)),
                                           ("grid", _rng.uniform(-1.3, 1.3, (1, 2, 2, 2, 3)))],
    mode="linear", padding_mode="reflection", align_corners=1, opset=20)
add("GridSample", "opset20-cubic-zeros", [("X", _gx), ("grid", _gg)], mode="cubic", opset=20)
add("GridSample", "only-grid", [("X", _gx), ("grid", _gg)], wrt=["grid"], opset=20)
add("GridSample", "far-outside-reflection", [("X", normal(1, 1, 3, 4)),
                                             ("grid", _rng.uniform(-4, 4, (1, 5, 5, 2)))],
    padding_mode="reflection", opset=20)

# -- DeformConv ---------------------------------------------------------------------------------
_dx = normal(2, 4, 5, 5)
add("DeformConv", "basic", [("X", _dx), ("W", normal(3, 4, 2, 2)),
                            ("offset", 0.8 * normal(2, 8, 4, 4))], opset=19)
add("DeformConv", "bias-mask-groups", [("X", _dx), ("W", normal(4, 2, 3, 2)),
                                       ("offset", normal(2, 2 * 6 * 2, 3, 2)), ("B", normal(4)),
                                       ("mask", _rng.uniform(0, 1, (2, 2 * 6, 3, 2)))],
    group=2, offset_group=2, strides=[1, 2], pads=[0, 1, 0, 0], dilations=[1, 2], opset=19)
add("DeformConv", "mask-no-bias", [("X", normal(1, 2, 4, 4)), ("W", normal(2, 2, 2, 2)),
                                   ("offset", normal(1, 8, 3, 3)), ("B", None),
                                   ("mask", _rng.uniform(0, 1, (1, 4, 3, 3)))], opset=19)

# -- RoiAlign, MaxRoiPool (w.r.t. X) -----------------------------------------------------------
_rx = normal(2, 3, 6, 7)
_rois = np.array([[0.3, 0.6, 4.2, 3.9], [1.1, 0.2, 6.8, 5.7], [-1.5, 2.0, 3.0, 7.5],
                  [2.0, 1.0, 2.6, 1.4]])
_bi = ints(0, 1, 1, 0)
for _mode in ("avg", "max"):
    add("RoiAlign", f"{_mode}-adaptive", [("X", _rx), ("rois", _rois), ("bi", _bi)], wrt=["X"],
        mode=_mode, output_height=2, output_width=3, opset=16)
    add("RoiAlign", f"{_mode}-sr2-output-half-pixel", [("X", _rx), ("rois", _rois),
                                                       ("bi", _bi)],
        wrt=["X"], mode=_mode, output_height=3, output_width=2, sampling_ratio=2,
        spatial_scale=0.8, coordinate_transformation_mode="output_half_pixel", opset=16)
add("RoiAlign", "avg-opset10-sr3", [("X", _rx), ("rois", _rois), ("bi", _bi)], wrt=["X"],
    output_height=2, output_width=2, sampling_ratio=3, opset=10)
add("RoiAlign", "avg-opset11-adaptive-scale", [("X", _rx), ("rois", 2 * _rois), ("bi", _bi)],
    wrt=["X"], output_height=2, output_width=2, spatial_scale=0.5, opset=11)
_mr = np.array([[0, 0.4, 1.2, 3.6, 4.4], [1, 1.0, 0.0, 6.2, 5.0], [1, -2.0, 3.0, 2.0, 9.0],
                [0, 3.0, 2.0, 3.0, 2.0]])
add("MaxRoiPool", "basic", [("X", pool_input(2, 3, 6, 7)), ("rois", _mr)], wrt=["X"],
    pooled_shape=[2, 3], opset=16)
add("MaxRoiPool", "scaled", [("X", pool_input(2, 2, 5, 6)),
                             ("rois", _mr * np.array([1, 2, 2, 2, 2]))], wrt=["X"],
    pooled_shape=[3, 2], spatial_scale=0.5, opset=16)

CASES = table.cases


# -- tests ------------------------------------------------------------------------------------
def check_without_ort(c: Case) -> None:
    """check_case for ops onnxruntime cannot run: finite differences only."""
    model = loss_model(c)
    wrt = c.params()
    grads, _ = gradients(model, wrt, **c.build)
    values = {n: a for n, a in [*c.inputs, *c.extra.items()] if n in wrt}
    fd = finite_differences(model, values)
    for p in wrt:
        np.testing.assert_allclose(grads[p], fd[p], rtol=RTOL, atol=ATOL, err_msg=f"d/d{p}")


@pytest.mark.parametrize("c", CASES, ids=str)
def test_rule_matches_finite_differences(c: Case) -> None:
    if c.op in NO_ORT or c.id in NO_ORT:
        check_without_ort(c)
    else:
        check_case(c)


@pytest.mark.parametrize("c", [c for c in CASES if not {c.op, c.id} & NO_ORT], ids=str)
def test_rule_float32_training_graph(c: Case) -> None:
    check_float32(c)


def test_global_maxpool_ties_split_like_torch_amax() -> None:
    x = np.array([[[[1.0, 3.0], [3.0, 0.5]], [[2.0, 2.0], [2.0, 2.0]]]])
    r = np.array([[[[1.5]], [[-2.0]]]])
    nodes = [helper.make_node("GlobalMaxPool", ["X"], ["y"]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    grads, _ = gradients(make_model(nodes, initializers={"X": x, "R": r}, outputs=["L"]), ["X"])
    xt = torch.tensor(x, requires_grad=True)
    (torch.amax(xt, dim=(2, 3), keepdim=True) * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-12)


@pytest.mark.parametrize("opset", [18, 12])
def test_maxpool_ties_go_to_the_first_element_like_torch(opset: int) -> None:
    x = np.array([[[[1.0, 2.0, 2.0, 0.0], [2.0, 1.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0]]]])
    r = np.arange(1.0, 3.0).reshape(1, 1, 1, 2)
    nodes = [helper.make_node("MaxPool", ["X"], ["y"], kernel_shape=[2, 2], strides=[1, 2],
                              pads=[0, 0, 1, 0]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    r = np.random.default_rng(0).standard_normal((1, 1, 3, 2))
    model = make_model(nodes, initializers={"X": x, "R": r}, outputs=["L"], opset=opset)
    grads, _ = gradients(model, ["X"])
    xt = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.max_pool2d(xt, (2, 2), stride=(1, 2), padding=0, ceil_mode=False)
    y = torch.nn.functional.max_pool2d(torch.nn.functional.pad(xt, (0, 0, 0, 1),
                                                               value=-np.inf),
                                       (2, 2), stride=(1, 2))
    (y * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-12)


def test_maxpool_unpool_duplicates_take_the_gradient_like_torch() -> None:
    # Duplicate indices: the forward keeps one write, but as in PyTorch every duplicate reads
    # the gradient of its position (max_unpool's backward is a gather).
    x = normal(1, 1, 2, 2)
    idx = np.array([0, 5, 5, 15]).reshape(1, 1, 2, 2)
    r = normal(1, 1, 4, 4)
    nodes = [helper.make_node("MaxUnpool", ["X", "I"], ["y"], kernel_shape=[2, 2],
                              strides=[2, 2]),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={"X": x, "I": idx, "R": r}, outputs=["L"])
    grads, _ = gradients(model, ["X"])
    xt = torch.tensor(x, requires_grad=True)
    y = torch.nn.functional.max_unpool2d(xt, torch.tensor(idx), 2, 2)
    (y * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(grads["X"], xt.grad.numpy(), rtol=1e-12)


def _grad_of(op: str, inputs: dict, wrt: list[str], r: np.ndarray, opset: int = 18, **attrs):
    nodes = [helper.make_node(op, list(inputs), ["y"], **attrs),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    model = make_model(nodes, initializers={**inputs, "R": r}, outputs=["L"], opset=opset)
    return gradients(model, wrt)[0]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_gradients_match_torch(mode: str, padding: str, align: int) -> None:
    x, grid = normal(2, 2, 4, 5), _rng.uniform(-1.4, 1.4, (2, 3, 4, 2))
    r = normal(2, 2, 3, 4)
    ours = _grad_of("GridSample", {"X": x, "G": grid}, ["X", "G"], r, opset=16, mode=mode,
                    padding_mode=padding, align_corners=align)
    xt, gt = torch.tensor(x, requires_grad=True), torch.tensor(grid, requires_grad=True)
    y = torch.nn.functional.grid_sample(xt, gt, mode=mode, padding_mode=padding,
                                        align_corners=bool(align))
    (y * torch.tensor(r)).sum().backward()
    np.testing.assert_allclose(ours["X"], xt.grad.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ours["G"], gt.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_resize_large_axes_use_gathers(monkeypatch) -> None:
    # Above DENSE_LIMIT an axis adjoint gathers each input's readers instead of a dense MatMul.
    from trainer.autodiff.rules import image

    monkeypatch.setattr(image, "DENSE_LIMIT", 0)
    for c in [c for c in CASES if c.op in ("Resize", "Upsample")][::3]:
        _, tm = gradients(loss_model(c), c.params())
        ops = {n.op_type for n in tm.graph.node if "/Grad/" in n.name}
        assert "MatMul" not in ops, c.id
        check_case(c)


def test_resize_nearest_integer_upsampling_is_a_block_sum() -> None:
    c = next(c for c in CASES if c.id == "Resize-nearest-2x")
    _, tm = gradients(loss_model(c), c.params())
    ops = [n.op_type for n in tm.graph.node if n.name.startswith("Resize_0/Grad/")]
    assert ops == ["Reshape", "ReduceSum"]


@pytest.mark.parametrize("case_id", ["RoiAlign-max-adaptive", "MaxRoiPool-basic"])
def test_roi_max_gradients_need_opset_16(case_id: str) -> None:
    import dataclasses

    c = dataclasses.replace(next(c for c in CASES if c.id == case_id), opset=13)
    with pytest.raises(ModelError, match="opset >= 16"):
        gradients(loss_model(c), ["X"])


def test_roi_align_adaptive_sampling_needs_opset_11() -> None:
    import dataclasses

    c = dataclasses.replace(next(c for c in CASES if c.id == "RoiAlign-avg-opset10-sr3"),
                            attrs={"output_height": 2, "output_width": 2})
    with pytest.raises(ModelError, match="opset >= 11"):
        gradients(loss_model(c), ["X"])


def test_resize_needs_constant_scales() -> None:
    x = normal(1, 1, 2, 3)
    nodes = [helper.make_node("Identity", ["s0"], ["s"]),
             helper.make_node("Resize", ["X", "", "s"], ["y"], mode="linear"),
             helper.make_node("Mul", ["y", "R"], ["p"]),
             helper.make_node("ReduceSum", ["p"], ["L"], keepdims=0)]
    # scales computed from a float initializer (a would-be parameter) are not constants
    model = make_model(nodes, initializers={"X": x, "R": normal(1, 1, 4, 6),
                                            "s0": np.array([1, 1, 2, 2], np.float32)},
                       outputs=["L"])
    with pytest.raises(ModelError, match="scales must be a constant"):
        gradients(model, ["X"])


@pytest.mark.parametrize("opset", [1, 6, 7])
def test_a_max_pool_before_opset_8_trains_through_the_engines_own_indices(opset):
    """Before opset 8 MaxPool has no Indices, which its gradient reads: such models were
    refused (every old model-zoo CNN). The backward computes them with the engine's own
    ai.onnx_trainer.MaxPoolIndices; `check MODEL` calls them trainable, as training is. The
    gradient against float64 finite differences, overlapping windows and padding too."""
    from trainer.autodiff import build_training_graph
    from trainer.kernels import CUSTOM_DOMAIN
    from trainer.report import model_report

    for attrs in ({"kernel_shape": [2, 2], "strides": [2, 2]},
                  {"kernel_shape": [3, 3], "strides": [1, 1], "pads": [1, 1, 1, 1]}):
        c = Case(f"MaxPool-{opset}", "MaxPool", [("X", pool_input(1, 2, 5, 5))], attrs,
                 opset=opset)
        model = loss_model(c)
        grads, tm = gradients(model, ["X"])
        fd = finite_differences(model, {"X": c.inputs[0][1]})
        np.testing.assert_allclose(grads["X"], fd["X"], rtol=1e-6, atol=1e-6)
        assert any(n.op_type == "MaxPoolIndices" and n.domain == CUSTOM_DOMAIN
                   for n in tm.graph.node)
    w = np.random.default_rng(0).standard_normal((2, 1, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0)]
    model = make_model(nodes, inputs={"x": np.ones((1, 1, 4, 4), np.float32)},
                       initializers={"W": w}, outputs=["loss"], opset=opset)
    report = model_report(model)
    assert report.ok, report.text()
    build_training_graph(model, {"type": "output", "output": "loss"}, "all")


def test_check_and_training_agree_on_opset_6_broadcasts():
    """Opsets 1-6 broadcast a bias through attributes (`broadcast: 1`, `axis`): every
    such Add and Gemm was refused by training while `check MODEL` called it trainable. A bias
    added per channel trains now; a product broadcast along a middle axis is refused by both."""
    from trainer.autodiff import build_training_graph, training_info
    from trainer.report import LEGACY_AXIS, model_report

    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    for op in ("Add", "Mul"):
        nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                 helper.make_node(op, ["c", "b"], ["p"], broadcast=1, axis=1),
                 helper.make_node("ReduceSum", ["p"], ["loss"], keepdims=0)]
        model = make_model(nodes, inputs={"x": np.ones((1, 1, 4, 4), np.float32)},
                           initializers={"W": w, "b": np.ones(2, np.float32)},
                           outputs=["loss"], opset=6)
        report = model_report(model)
        row = next(r for r in report.nodes if r.op == op)
        spec = {"type": "output", "output": "loss"}
        if op == "Add":
            assert report.ok and row.gradient != LEGACY_AXIS, report.text()
            info = training_info(build_training_graph(model, spec, "all"))
            assert set(info.gradients) == {"W", "b"}
        else:
            assert row.gradient == LEGACY_AXIS and not report.ok
            with pytest.raises(ModelError, match="along axis 1, not the last axes"):
                build_training_graph(model, spec, "all")


@pytest.mark.parametrize("xs,ws,attrs", [
    ((2, 2, 3), (2, 3, 1), dict(strides=[2], dilations=[2], pads=[0, 1])),
    ((1, 2, 3, 2), (2, 2, 1, 1), dict(strides=[2, 3], pads=[0, 0, 1, 2]))])
def test_conv_transpose_weight_gradient_of_a_1_wide_kernel_with_end_pads(xs, ws, attrs):
    """The planned weight gradient (ConvWeightGrad, fused) drops the end pads, where a 1-wide
    kernel's strided positions reach into them: its pointwise path read fewer positions than
    dY holds and failed. As torch's autograd, fed at run time (constants fold it away)."""
    import torch

    from trainer.autodiff import reverse
    from trainer.executor import Executor

    rng = np.random.default_rng(3)
    x, w = rng.standard_normal(xs), rng.standard_normal(ws)
    k = len(xs) - 2
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    conv = torch.nn.functional.conv_transpose1d if k == 1 else \
        torch.nn.functional.conv_transpose2d
    full = conv(tx, tw, stride=attrs["strides"], dilation=attrs.get("dilations", 1))
    ty = full[(...,) + tuple(slice(b, n - e) for b, e, n in zip(
        attrs["pads"][:k], attrs["pads"][k:], full.shape[2:], strict=True))]
    u = rng.standard_normal(tuple(ty.shape))
    ty.backward(torch.tensor(u))
    g = helper.make_graph([helper.make_node("ConvTranspose", ["x", "w"], ["y"], **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, xs),
                           helper.make_tensor_value_info("w", TensorProto.DOUBLE, ws)],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE,
                                                         list(ty.shape))])
    model = reverse(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]),
                    ["x", "w"], ["y"], shapes={"x": xs, "w": ws})
    ex = Executor(model, np)
    for _ in range(2):  # (the second run takes the plan, with the fused weight gradient)
        got = ex.run({"x": x, "w": w, "y_grad": u})
        np.testing.assert_allclose(got["w_grad"], tw.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["x_grad"], tx.grad.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("opset", [12, 18])
def test_maxpool_windows_of_padding_alone_pass_no_gradient(opset):
    """Dilations let a window hold padding alone (its output -inf, whatever x is): its Indices
    entry pointed outside x (-1) or at another row's element, and the backward's scatter failed
    ("'list' argument must have no negative elements") or would have added its dY there. Such
    a window now passes nothing back; the others as a brute-force argmax does (planned run too,
    where the backward is fused)."""
    from trainer.autodiff import reverse
    from trainer.executor import Executor

    attrs = dict(kernel_shape=[2, 2], dilations=[1, 4], pads=[0, 2, 1, 2], strides=[1, 1])
    rng = np.random.default_rng(0)
    x = rng.permutation(18).astype(np.float64).reshape(1, 2, 3, 3)
    g = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], **attrs)], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 2, 3, 3])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 2, 3, 3])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    y = Executor(model, np).run({"x": x})["y"]
    u = rng.standard_normal(y.shape)
    want = np.zeros_like(x)
    empty = 0
    for n, c, i, j in np.ndindex(*y.shape):
        taps = [(i + a, j - 2 + 4 * b) for a in range(2) for b in range(2)]
        real = [(h, w) for h, w in taps if 0 <= h < 3 and 0 <= w < 3]
        if not real:
            empty += 1
            assert y[n, c, i, j] == -np.inf
            continue
        h, w = max(real, key=lambda t: x[n, c, t[0], t[1]])
        want[n, c, h, w] += u[n, c, i, j]
    assert empty > 0
    ex = Executor(reverse(model, ["x"], ["y"], shapes={"x": x.shape}), np)
    for _ in range(2):  # (unplanned, then planned)
        np.testing.assert_array_equal(ex.run({"x": x, "y_grad": u})["x_grad"], want)


@pytest.mark.parametrize("opset", [12, 18])
def test_maxpool_pads_of_the_kernels_size_pass_no_gradient_from_their_windows(opset):
    """kernel 1 with pads 1: the first and last windows hold padding alone. Their Indices, kept
    in the plane, name the elements next to them, and the scatter without `add` (windows that
    do not overlap) wrote their zeros over those elements' dY: dX [2 3 4 5 0] for [2 3 4 5 6]
    (found by a regression sweep). Planned run too."""
    from trainer.autodiff import reverse
    from trainer.executor import Executor

    g = helper.make_graph([helper.make_node("MaxPool", ["x"], ["y"], kernel_shape=[1],
                                            pads=[1, 1])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 1, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 1, 7])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    x = np.array([[[3.0, 1.0, 4.0, 1.5, 5.0]]])
    u = np.arange(1.0, 8.0).reshape(1, 1, 7)
    ex = Executor(reverse(model, ["x"], ["y"], shapes={"x": x.shape}), np)
    for _ in range(2):
        np.testing.assert_array_equal(ex.run({"x": x, "y_grad": u})["x_grad"], [[[2, 3, 4, 5, 6]]])


@pytest.mark.parametrize("opset", [3, 6])
def test_an_old_model_zoo_cnn_trains_as_its_modern_form(tmp_path, opset):
    """An AlexNet-style CNN as opsets 1-6 wrote it (Conv, a bias Add broadcast along axis 1,
    Relu, LRN, MaxPool without Indices, a Reshape, Gemm with a broadcast C) was refused by
    training at its first bias; it trains step for step as the same network written at opset
    13 (NumPy broadcasting, MaxPool with Indices)."""
    import io

    from trainer.config import config_from_dict
    from trainer.train import Trainer

    rng = np.random.default_rng(0)
    values = {"Wc": rng.standard_normal((4, 1, 3, 3)).astype(np.float32) * 0.5,
              "bc": rng.standard_normal(4).astype(np.float32) * 0.1,
              "W": rng.standard_normal((3, 64)).astype(np.float32) * 0.2,
              "b": rng.standard_normal(3).astype(np.float32) * 0.1}
    x = rng.standard_normal((24, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=rng.integers(0, 3, 24))

    def model(old: bool) -> onnx.ModelProto:
        inits = [numpy_helper.from_array(v, k) for k, v in values.items()]
        if old:
            bias = [helper.make_node("Add", ["c", "bc"], ["cb"], broadcast=1, axis=1)]
            flat = (helper.make_node("Reshape", ["p"], ["f"], shape=[-1, 64]) if opset < 5 else
                    helper.make_node("Reshape", ["p", "shape"], ["f"]))
            gemm = helper.make_node("Gemm", ["f", "W", "b"], ["logits"], broadcast=1, transB=1)
        else:
            bias = [helper.make_node("Reshape", ["bc", "chw"], ["bc3"]),
                    helper.make_node("Add", ["c", "bc3"], ["cb"])]
            flat = helper.make_node("Reshape", ["p", "shape"], ["f"])
            gemm = helper.make_node("Gemm", ["f", "W", "b"], ["logits"], transB=1)
            inits.append(numpy_helper.from_array(np.array([4, 1, 1], np.int64), "chw"))
        if not old or opset >= 5:
            inits.append(numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"))
        nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], kernel_shape=[3, 3],
                                  pads=[1, 1, 1, 1]), *bias,
                 helper.make_node("Relu", ["cb"], ["r"]),
                 helper.make_node("LRN", ["r"], ["l"], size=3),
                 helper.make_node("MaxPool", ["l"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                 flat, gemm]
        inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])]
        if old:  # (IR 3: initializers are graph inputs too)
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, t.dims) for t in inits]
        g = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info(
            "logits", TensorProto.FLOAT, ["N", 3])], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset if old else 13)],
                                 ir_version=3 if old else 8)

    runs = []
    for old in (True, False):
        onnx.save(model(old), tmp_path / f"m{old}.onnx")
        t = Trainer(config_from_dict({
            "model": f"m{old}.onnx", "output": f"o{old}.onnx", "device": "cpu", "steps": 3,
            "data": {"train": {"path": "d.npz", "inputs": {"x": "x"},
                               "targets": {"label": "y"}}, "batch_size": 8, "shuffle": False},
            "loss": {"type": "cross_entropy", "output": "logits", "target": "label"},
            "optimizer": {"type": "sgd", "lr": 0.1}, "log": {"every_steps": 1}}, tmp_path),
            stream=io.StringIO())
        t.fit()
        runs.append(([r["loss"] for r in t.history if "loss" in r], t.trained_values()))
    (old_losses, old_values), (new_losses, new_values) = runs
    np.testing.assert_allclose(old_losses, new_losses, rtol=1e-6)
    for k in values:
        np.testing.assert_allclose(old_values[k], new_values[k], rtol=1e-5, atol=1e-7,
                                   err_msg=k)
        assert not np.array_equal(old_values[k], values[k])
