"""Signal, random, string, image, ai.onnx.ml and ai.onnx.preview.training kernels against
onnxruntime, the ONNX reference evaluator, or (random ops) their distributions."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import AttributeProto, TensorProto, helper

from tests.opcases import make_model, run, run_ort, run_reference
from trainer.executor import Executor
from trainer.kernels.signal import DFT_20

F32, F64 = np.float32, np.float64
ML, TRAINING = "ai.onnx.ml", "ai.onnx.preview.training"
_rng = np.random.default_rng(11)
# Ops this file checks (for registry-coverage tests that look beyond ONNX's node suite).
TESTED_OPS = {
    "DFT", "STFT", "HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix",
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
    "Multinomial", "StringConcat", "StringSplit", "StringNormalizer", "RegexFullMatch",
    "TfIdfVectorizer", "ImageDecoder", "ArrayFeatureExtractor", "Binarizer", "LabelEncoder",
    "TreeEnsemble", "Adagrad", "Adam", "Momentum", "StopGradient"}


def model(op: str, inputs: dict, n_out: int = 1, *, opset: int = 18, domain: str = "",
          names: list[str] | None = None, **attrs):
    """One `op` node over `inputs` (graph inputs; a None value is an absent optional input)."""
    names = names or list(inputs)
    node = helper.make_node(op, [n if inputs.get(n) is not None else "" for n in names],
                            [f"y{i}" for i in range(n_out)], domain=domain, **attrs)
    present = {k: v for k, v in inputs.items() if v is not None}
    extra = {domain: 5 if domain == ML else 1} if domain else None
    return make_model([node], inputs=present, outputs=list(node.output), opset=opset,
                      extra_opsets=extra), present


def check(m, feeds, want: dict, rtol=1e-4, atol=1e-5, dtype=None):
    """Our outputs equal `want` (dtype: the dtype every output must have, else want's)."""
    got = run(m, feeds)
    for k, w in want.items():
        g = np.asarray(got[k])
        w = np.asarray(w)
        w = w.astype(object) if w.dtype.kind == "U" else w  # the reference's str arrays
        assert g.shape == w.shape, f"{k}: shape {g.shape} != {w.shape}"
        assert g.dtype == (dtype or w.dtype), f"{k}: dtype {g.dtype} != {dtype or w.dtype}"
        if w.dtype.kind in "fc":
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, err_msg=k)
        else:
            np.testing.assert_array_equal(g, w, err_msg=k)


def against_ort(m, feeds, **tol):
    check(m, feeds, run_ort(m, feeds), **tol)


def against_reference(m, feeds, **kw):
    check(m, feeds, run_reference(m, feeds), **kw)


def signal(*shape, dtype=F32):
    return _rng.standard_normal(shape).astype(dtype)


# -- signal ----------------------------------------------------------------------------------
DFT_CASES = [
    # (input shape, axis, inverse, onesided, dft_length, dtype)
    ((2, 8, 1), 1, 0, 0, None, F32),
    ((2, 8, 2), 1, 1, 0, None, F32),
    ((3, 6, 5, 1), 2, 0, 1, None, F32),
    ((3, 6, 5, 1), -3, 0, 1, 8, F32),
    ((3, 6, 5, 2), 1, 0, 0, 4, F32),
    ((3, 6, 5, 2), -2, 1, 0, 9, F64),
    ((2, 7, 4, 2), 1, 1, 1, None, F32),
    ((2, 7, 4, 2), 1, 1, 1, 11, F64),
    ((4, 9, 1), 1, 0, 0, 12, F64),
]


@pytest.mark.parametrize("shape,axis,inverse,onesided,n,dtype", DFT_CASES)
def test_dft_20_against_ort(shape, axis, inverse, onesided, n, dtype):
    feeds = {"x": signal(*shape, dtype=dtype),
             "n": None if n is None else np.array(n, np.int64), "axis": np.array(axis)}
    m, feeds = model("DFT", feeds, opset=20, inverse=inverse, onesided=onesided)
    if inverse and onesided and n is not None and n // 2 + 1 != shape[axis]:
        # onnxruntime's IRFFT disagrees with numpy.fft.irfft (the spec's reference) when
        # dft_length does not fit the one-sided input length
        against_reference(m, feeds)
    else:
        against_ort(m, feeds)


@pytest.mark.parametrize("shape,axis,inverse,onesided,n,dtype", DFT_CASES[:6])
def test_dft_17_axis_attribute(shape, axis, inverse, onesided, n, dtype):
    feeds = {"x": signal(*shape, dtype=dtype), "n": None if n is None else np.array(n)}
    m, feeds = model("DFT", feeds, opset=17, axis=axis, inverse=inverse, onesided=onesided)
    against_ort(m, feeds)


def test_dft_default_axis_and_half_precision():
    x = signal(2, 3, 8, 1)
    m, feeds = model("DFT", {"x": x}, opset=20)           # axis -2: the last signal axis
    check(m, feeds, {"y0": np.stack([np.fft.fft(x[..., 0], axis=2).real,
                                     np.fft.fft(x[..., 0], axis=2).imag], -1).astype(F32)})
    m, feeds = model("DFT", {"x": x.astype(np.float16)}, opset=20)
    y = run(m, feeds)["y0"]
    assert y.dtype == np.float16 and y.shape == (2, 3, 8, 2)
    with pytest.raises(Exception, match="out of range"):
        run(*model("DFT", {"x": x, "axis": np.array(3)}, opset=20, names=["x", "n", "axis"]))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=3), st.data())
def test_dft_inverse_round_trip(dims, data):
    x = signal(*dims, 2, dtype=F64)
    axis = data.draw(st.integers(-len(dims) - 1, len(dims) - 1).filter(lambda a: a != -1))
    ax = np.array(axis)
    spectrum = DFT_20(np, x, None, ax)[0]
    np.testing.assert_allclose(DFT_20(np, spectrum, None, ax, inverse=1)[0], x, atol=1e-12)
    real = x[..., :1]
    half = DFT_20(np, real, None, ax, onesided=1)[0]
    n = np.array(real.shape[axis])
    np.testing.assert_allclose(DFT_20(np, half, n, ax, inverse=1, onesided=1)[0], real,
                               atol=1e-12)


@pytest.mark.parametrize("shape,step,window,length,onesided", [
    ((1, 64, 1), 8, 16, None, 1),
    ((2, 50, 1), 5, None, 10, 0),
    ((2, 50, 2), 7, 12, 12, 0),
    ((1, 33, 1), 4, None, 9, 1),
])
def test_stft_against_ort(shape, step, window, length, onesided):
    feeds = {"x": signal(*shape), "step": np.array(step),
             "w": None if window is None else np.hanning(window).astype(F32),
             "len": None if length is None else np.array(length)}
    m, feeds = model("STFT", feeds, opset=17, onesided=onesided)
    against_ort(m, feeds, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("op", ["HannWindow", "HammingWindow", "BlackmanWindow"])
@pytest.mark.parametrize("size,periodic,dtype", [(10, 1, 1), (10, 0, 1), (7, 1, 11),
                                                 (16, 0, 11), (5, 1, 7)])
def test_windows_against_ort(op, size, periodic, dtype):
    m, feeds = model(op, {"n": np.array(size, np.int64)}, opset=17, periodic=periodic,
                     output_datatype=dtype)
    against_ort(m, feeds, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bins,n_fft,rate,lo,hi,dtype", [
    (8, 16, 8192, 0.0, 4096.0, 1), (10, 64, 16000, 20.0, 7600.0, 1),
    (5, 31, 8000, 100.0, 3000.0, 11), (12, 128, 22050, 0.0, 11025.0, 1),
])
def test_mel_weight_matrix_against_ort(bins, n_fft, rate, lo, hi, dtype):
    feeds = {"bins": np.array(bins), "n_fft": np.array(n_fft), "rate": np.array(rate),
             "lo": np.array(lo, F32), "hi": np.array(hi, F32)}
    m, feeds = model("MelWeightMatrix", feeds, opset=17, output_datatype=dtype)
    against_ort(m, feeds)


# -- random ----------------------------------------------------------------------------------
def _sample(op, inputs=None, opset=22, seed=0, **attrs):
    m, feeds = model(op, inputs or {}, opset=opset, **attrs)
    return Executor(m, np, seed=seed).run(feeds)["y0"]


@pytest.mark.parametrize("dtype,np_dtype", [(1, F32), (11, F64), (10, np.float16)])
def test_random_uniform_and_normal(dtype, np_dtype):
    u = _sample("RandomUniform", shape=[200, 50], dtype=dtype, low=-2.0, high=3.0)
    assert u.shape == (200, 50) and u.dtype == np_dtype
    assert u.min() >= -2.0 and u.max() <= 3.0 and abs(float(u.mean()) - 0.5) < 0.1
    z = _sample("RandomNormal", shape=[200, 50], dtype=dtype, mean=1.5, scale=2.0)
    assert z.shape == (200, 50) and z.dtype == np_dtype
    assert abs(float(z.astype(F64).mean()) - 1.5) < 0.1
    assert abs(float(z.astype(F64).std()) - 2.0) < 0.1
    assert np.isfinite(z.astype(F64)).all()


def test_random_scalar_and_empty_shapes():
    node = helper.make_node("RandomNormal", [], ["y0"])
    node.attribute.append(helper.make_attribute("shape", [], attr_type=AttributeProto.INTS))
    y = run(make_model([node], outputs=["y0"], opset=22))["y0"]
    assert isinstance(y, np.ndarray) and y.shape == () and y.dtype == F32
    assert _sample("RandomUniform", shape=[0, 3], dtype=11).shape == (0, 3)
    y = _sample("Bernoulli", {"x": np.array(1.0, F64)})
    assert isinstance(y, np.ndarray) and y.shape == () and y == 1.0


def test_random_like_ops_take_shape_and_dtype():
    x = np.zeros((3, 4, 5), F64)
    y = _sample("RandomUniformLike", {"x": x})
    assert y.shape == x.shape and y.dtype == F64 and ((y >= 0) & (y < 1)).all()
    y = _sample("RandomNormalLike", {"x": x}, dtype=TensorProto.FLOAT)
    assert y.shape == x.shape and y.dtype == F32
    y = _sample("RandomUniformLike", {"x": np.zeros((2, 3), np.int64)}, dtype=1, low=5.0,
                high=6.0)
    assert y.dtype == F32 and ((y >= 5) & (y <= 6)).all()


def test_random_draws_are_reproducible_per_executor_seed():
    a = _sample("RandomNormal", shape=[64], seed=3)
    b = _sample("RandomNormal", shape=[64], seed=3)
    c = _sample("RandomNormal", shape=[64], seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_bernoulli():
    p = np.tile(np.array([0.0, 1.0, 0.3], F32), 2000).reshape(-1, 3)
    y = _sample("Bernoulli", {"x": p})
    assert y.dtype == F32 and y.shape == p.shape
    assert (y[:, 0] == 0).all() and (y[:, 1] == 1).all()
    assert abs(float(y[:, 2].mean()) - 0.3) < 0.03
    y = _sample("Bernoulli", {"x": p.astype(F64)}, dtype=TensorProto.BOOL, seed=1)
    assert y.dtype == bool and y[:, 1].all() and not y[:, 0].any()


def test_multinomial():
    logits = np.log(np.array([[0.2, 0.8, 0.0], [0.0, 0.0, 1.0]], F32) + 1e-30)
    y = _sample("Multinomial", {"x": logits}, sample_size=4000)
    assert y.shape == (2, 4000) and y.dtype == np.int32
    assert set(np.unique(y[0])) <= {0, 1} and abs(float((y[0] == 1).mean()) - 0.8) < 0.03
    assert (y[1] == 2).all()
    y = _sample("Multinomial", {"x": logits}, dtype=TensorProto.INT64, sample_size=3)
    assert y.dtype == np.int64 and y.min() >= 0 and y.max() <= 2


# -- strings ---------------------------------------------------------------------------------
def strings(*values, shape=None):
    a = np.array(values, dtype=object)
    return a.reshape(shape) if shape is not None else a


@pytest.mark.parametrize("x,y", [
    (strings("a", "bc"), strings("x", "")),
    (strings("a", "b", "c", "d", shape=(2, 2)), strings("!", "?")),
    (strings("ünï"), strings("a", "b", "c", shape=(3, 1))),
    (np.array("s", dtype=object), np.array("t", dtype=object)),
])
def test_string_concat_against_ort(x, y):
    m, feeds = model("StringConcat", {"x": x, "y": y}, opset=20)
    against_ort(m, feeds)


@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(1, 3), max_size=3), st.lists(st.integers(1, 3), max_size=3))
def test_string_concat_broadcasts_like_numpy(sa, sb):
    try:
        shape = np.broadcast_shapes(tuple(sa), tuple(sb))
    except ValueError:
        return
    a = np.full(sa, "a", dtype=object)
    b = np.full(sb, "bc", dtype=object)
    m, feeds = model("StringConcat", {"x": a, "y": b}, opset=20)
    y = run(m, feeds)["y0"]
    assert y.shape == shape and y.dtype == object and (y == "abc").all()


@pytest.mark.parametrize("x,attrs", [
    (strings("a,b,,c", ",x", "y"), {"delimiter": ","}),
    (strings("a--b--c", "--", "q", shape=(3, 1)), {"delimiter": "--", "maxsplit": 1}),
    (strings(" a  b ", "c  d", "   "), {}),
    (strings("one two three four"), {"maxsplit": 2}),
])
def test_string_split_against_ort(x, attrs):
    m, feeds = model("StringSplit", {"x": x}, 2, opset=20, **attrs)
    against_ort(m, feeds)


@pytest.mark.parametrize("x,attrs", [
    (strings("a,b,,c", ",x", ""), {"delimiter": ","}),
    (strings(" a  b ", "\tc\nd", "   ", ""), {}),
])
def test_string_split_edges_against_reference(x, attrs):
    """Where onnxruntime departs from the spec (and the reference): it finds no substring in
    "" with a delimiter, and splits only on spaces, not on all whitespace."""
    m, feeds = model("StringSplit", {"x": x}, 2, opset=20, **attrs)
    against_reference(m, feeds)


@pytest.mark.parametrize("x,attrs", [
    (strings("Monday", "TUESDAY", "monday", "Wed"),
     {"stopwords": ["monday", "wed"], "case_change_action": "LOWER"}),
    (strings("Monday", "monday", "x", shape=(1, 3)),
     {"stopwords": ["monday"], "is_case_sensitive": 1, "case_change_action": "UPPER"}),
    (strings("a", "b", shape=(1, 2)), {"stopwords": ["A", "B"]}),
    (strings("Keep", "Case"), {}),
])
def test_string_normalizer_against_ort(x, attrs):
    m, feeds = model("StringNormalizer", {"x": x}, locale="C", **attrs)
    against_ort(m, feeds)


@pytest.mark.parametrize("pattern,values", [
    (r"\d{3}-\d{4}", ["555-1234", "5551234", "555-12345", "٣٣٣-٣٣٣٣"]),
    (r"(?i)hello\s+\w+", ["HeLLo world", "hello", "hello wörld", "hello   x_1"]),
    (r"[a-c]*\z", ["abcabc", "abd", ""]),
    (r"(?P<w>\w+)@(?<d>\w+)\.com", ["me@host.com", "me@host.org", "é@a.com"]),
    (r"a|b|", ["a", "b", "", "ab"]),
])
def test_regex_full_match_against_ort(pattern, values):
    m, feeds = model("RegexFullMatch", {"x": strings(*values)}, opset=20, pattern=pattern)
    against_ort(m, feeds)


TFIDF_POOL = dict(ngram_counts=[0, 4, 10], ngram_indexes=[8, 0, 1, 2, 3, 4, 5, 6, 7],
                  pool_int64s=[2, 3, 5, 4, 5, 6, 7, 8, 6, 7, 3, 3, 3, 5, 6, 8])


@pytest.mark.parametrize("x,attrs", [
    (np.array([1, 3, 3, 3, 7, 8, 6, 7, 5, 6, 8, 3], np.int64),
     dict(mode="TF", min_gram_length=1, max_gram_length=3, max_skip_count=2)),
    (np.array([[1, 3, 3, 3, 7, 8], [8, 6, 7, 5, 6, 8]], np.int32),
     dict(mode="IDF", min_gram_length=2, max_gram_length=3, max_skip_count=1,
          weights=[0.5, 1, 2, 3, 4, 5, 6, 7, 8])),
    (np.array([[3, 3, 3, 3, 5, 6], [2, 2, 3, 4, 5, 6]], np.int64),
     dict(mode="TFIDF", min_gram_length=1, max_gram_length=2, max_skip_count=3,
          weights=[0.5, 1, 2, 3, 4, 5, 6, 7, 8])),
])
def test_tfidf_vectorizer_against_ort(x, attrs):
    m, feeds = model("TfIdfVectorizer", {"x": x}, opset=9, **TFIDF_POOL, **attrs)
    against_ort(m, feeds)


def test_tfidf_vectorizer_strings_against_ort():
    x = strings("the", "cat", "sat", "on", "the", "cat", "mat", "x", shape=(2, 4))
    m, feeds = model("TfIdfVectorizer", {"x": x}, opset=9, mode="TFIDF", min_gram_length=1,
                     max_gram_length=2, max_skip_count=1, ngram_counts=[0, 3],
                     ngram_indexes=[3, 0, 1, 2, 4], weights=[1.0, 2.0, 3.0, 4.0, 5.0],
                     pool_strings=["cat", "the", "mat", "the", "cat", "cat", "sat"])
    against_ort(m, feeds)


def _encoded(fmt: str, mode: str = "RGB") -> tuple[np.ndarray, np.ndarray]:
    PIL = pytest.importorskip("PIL.Image")
    img = _rng.integers(0, 256, (12, 9, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.fromarray(img).convert(mode).save(buf, format=fmt)
    return np.frombuffer(buf.getvalue(), np.uint8).copy(), img


@pytest.mark.parametrize("fmt,pixel_format", [("PNG", "RGB"), ("PNG", "BGR"),
                                              ("BMP", "Grayscale"), ("JPEG", "RGB")])
def test_image_decoder_against_reference(fmt, pixel_format):
    data, img = _encoded(fmt)
    m, feeds = model("ImageDecoder", {"x": data}, opset=20, pixel_format=pixel_format)
    against_reference(m, feeds)
    y = run(m, feeds)["y0"]
    if fmt == "PNG":  # lossless
        np.testing.assert_array_equal(y, img if pixel_format == "RGB" else img[:, :, ::-1])


def test_image_decoder_grayscale_source_and_bad_stream():
    data, _ = _encoded("PNG", mode="L")
    m, feeds = model("ImageDecoder", {"x": data}, opset=20)
    assert run(m, feeds)["y0"].shape == (12, 9, 3)            # gray source as RGB
    m, feeds = model("ImageDecoder", {"x": np.arange(20, dtype=np.uint8)}, opset=20,
                     pixel_format="Grayscale")
    y = run(m, feeds)["y0"]
    assert y.shape == (0, 0, 1) and y.dtype == np.uint8


# -- ai.onnx.ml ------------------------------------------------------------------------------
def ml_model(op, inputs, version, **attrs):
    node = helper.make_node(op, list(inputs), ["y0"], domain=ML, **attrs)
    return make_model([node], inputs=inputs, outputs=["y0"], opset=18,
                      extra_opsets={ML: version}), inputs


@pytest.mark.parametrize("x,idx", [
    (np.arange(24, dtype=F32).reshape(2, 3, 4), np.array([3, 0, 3])),
    (np.arange(5, dtype=np.int64), np.array([[4, 1]])),
    (strings("a", "b", "c", "d", shape=(2, 2)), np.array([1])),
])
def test_array_feature_extractor_against_ort(x, idx):
    against_ort(*ml_model("ArrayFeatureExtractor", {"x": x, "i": idx}, 1))


def test_binarizer_against_ort_and_reference():
    x = _rng.standard_normal((3, 4)).astype(F32)
    against_ort(*ml_model("Binarizer", {"x": x}, 1, threshold=0.2))
    # onnxruntime implements float32 only
    against_reference(*ml_model("Binarizer", {"x": x.astype(F64)}, 1))
    against_reference(*ml_model("Binarizer", {"x": np.array([[1, 5, 9]])}, 1, threshold=4.0))


@pytest.mark.parametrize("x,version,attrs", [
    (strings("b", "z", "a"), 1, dict(classes_strings=["a", "b", "c"], default_int64=-7)),
    (np.array([2, 0, 9], np.int64), 1, dict(classes_strings=["a", "b", "c"],
                                            default_string="?")),
    (strings("x", "q", "y"), 2, dict(keys_strings=["x", "y"], values_floats=[1.5, -2.0])),
    (np.array([[3, 1], [7, 3]], np.int64), 2,
     dict(keys_int64s=[3, 7], values_strings=["three", "seven"])),
    (np.array([0.5, 7.0, 2.0, -1.0], F32), 2,
     dict(keys_floats=[0.5, 2.0], values_int64s=[5, 20], default_int64=0)),
    (np.array([4, 8, 1], np.int64), 4,
     dict(keys_int64s=[8, 4], values_int64s=[80, 40], default_int64=-3)),
    (strings("a", "zz"), 4,
     dict(keys_strings=["a"],
          values_tensor=helper.make_tensor("v", TensorProto.STRING, [1], [b"A"]))),
])
def test_label_encoder_against_ort(x, version, attrs):
    against_ort(*ml_model("LabelEncoder", {"x": x}, version, **attrs))


def test_label_encoder_spec_points():
    # v4: the last of repeated keys wins (onnxruntime keeps the first); tensor keys and values
    x = np.array([[3, 1], [7, 3]], np.int64)
    against_reference(*ml_model("LabelEncoder", {"x": x}, 4, keys_int64s=[3, 7, 3],
                                values_strings=["three", "seven", "last"]))
    against_reference(*ml_model(
        "LabelEncoder", {"x": np.array([1.0, 2.5, 9.0])}, 4,
        keys_tensor=helper.make_tensor("k", TensorProto.DOUBLE, [2], [2.5, 1.0]),
        values_tensor=helper.make_tensor("v", TensorProto.INT32, [2], [25, 10]),
        default_tensor=helper.make_tensor("d", TensorProto.INT32, [1], [-5])))
    # a NaN key matches NaN inputs (v2: bit-wise look-up; v4: any NaN)
    for version in (2, 4):
        m, feeds = ml_model("LabelEncoder", {"x": np.array([0.5, np.nan, 2.0, -1.0], F32)},
                            version, keys_floats=[0.5, 2.0, float("nan")],
                            values_int64s=[5, 20, 99], default_int64=0)
        check(m, feeds, {"y0": np.array([5, 99, 20, 0])})
    # values_tensor without default_tensor: the type's default (-1 for integers)
    m, feeds = ml_model("LabelEncoder", {"x": strings("a", "b")}, 4, keys_strings=["a"],
                        values_tensor=helper.make_tensor("v", TensorProto.INT16, [1], [7]))
    check(m, feeds, {"y0": np.array([7, -1], np.int16)})


def tree_attrs(splits_dtype=TensorProto.FLOAT, **over):
    """Two trees over 3 features and 2 targets; tree 1 uses each comparison mode."""
    # tree 0: n0 (f0 <= 0.5) ? leaf0 : n1;  n1 (f1 < -0.2) ? leaf1 : leaf2
    # tree 1: n2 (f2 >= 0) ? n3 : n4;  n3 (f0 > 1) ? leaf3 : leaf4;
    #         n4 (f1 == 0.25) ? leaf5 : n5;  n5 (f2 != -1) ? leaf6 : leaf7
    attrs = dict(
        tree_roots=[0, 2], n_targets=2,
        nodes_featureids=[0, 1, 2, 0, 1, 2],
        nodes_modes=helper.make_tensor("m", TensorProto.UINT8, [6], [0, 1, 2, 3, 4, 5]),
        nodes_splits=helper.make_tensor("s", splits_dtype, [6],
                                        [0.5, -0.2, 0.0, 1.0, 0.25, -1.0]),
        nodes_truenodeids=[0, 1, 3, 3, 5, 6], nodes_trueleafs=[1, 1, 0, 1, 1, 1],
        nodes_falsenodeids=[1, 2, 4, 4, 5, 7], nodes_falseleafs=[0, 1, 0, 1, 0, 1],
        nodes_missing_value_tracks_true=[1, 0, 0, 1, 0, 1],
        leaf_targetids=[0, 1, 0, 1, 0, 1, 0, 1],
        leaf_weights=helper.make_tensor("w", splits_dtype, [8],
                                        [1.0, -2.0, 3.0, 0.5, 4.0, -1.5, 2.5, 6.0]),
    )
    attrs.update(over)
    return attrs


TREE_X = np.array([[0.1, 0.25, 1.0], [2.0, -1.0, -1.0], [0.7, 0.25, -3.0], [np.nan, 0.0, 0.0],
                   [0.9, np.nan, np.nan], [1.5, 0.0, 2.0]], F32)


@pytest.mark.parametrize("aggregate", [0, 1, 2, 3])
@pytest.mark.parametrize("post", [0, 1, 2, 3])
def test_tree_ensemble_against_ort(aggregate, post):
    m, feeds = ml_model("TreeEnsemble", {"x": TREE_X}, 5,
                        **tree_attrs(aggregate_function=aggregate, post_transform=post))
    # onnxruntime reads post_transform 1 as LOGISTIC and 2 as SOFTMAX, against the spec's
    # SOFTMAX (1), LOGISTIC (2): its model gets the swapped code
    ort_post = {1: 2, 2: 1}.get(post, post)
    ort_model, _ = ml_model("TreeEnsemble", {"x": TREE_X}, 5,
                            **tree_attrs(aggregate_function=aggregate, post_transform=ort_post))
    check(m, feeds, run_ort(ort_model, feeds))


def test_tree_ensemble_float64_and_membership():
    attrs = tree_attrs(TensorProto.DOUBLE)
    against_ort(*ml_model("TreeEnsemble", {"x": TREE_X.astype(F64)}, 5, **attrs))
    # tree 0's root becomes a set-membership test on feature 0 {0.1, 2.0}; n5 tests {-1, 7}
    modes = helper.make_tensor("m", TensorProto.UINT8, [6], [6, 1, 2, 3, 4, 6])
    members = helper.make_tensor("mv", TensorProto.FLOAT, [6],
                                 [0.1, 2.0, np.nan, -1.0, 7.0, np.nan])
    attrs = tree_attrs(nodes_modes=modes, membership_values=members)
    against_ort(*ml_model("TreeEnsemble", {"x": TREE_X}, 5, **attrs))


def test_tree_ensemble_probit_is_close_to_the_exact_inverse():
    from statistics import NormalDist

    attrs = tree_attrs(post_transform=4, aggregate_function=0,
                       leaf_weights=helper.make_tensor("w", TensorProto.FLOAT, [8],
                                                       [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.8]))
    m, feeds = ml_model("TreeEnsemble", {"x": TREE_X}, 5, **attrs)
    raw = run(*ml_model("TreeEnsemble", {"x": TREE_X}, 5, **dict(attrs, post_transform=0)))
    got = run(m, feeds)["y0"]
    inside = (raw["y0"] > 0) & (raw["y0"] < 1)
    assert inside.sum() >= 6
    want = [NormalDist().inv_cdf(float(p)) for p in raw["y0"][inside]]
    np.testing.assert_allclose(got[inside], want, atol=5e-3)
    against_ort(m, feeds)  # same approximation; scores of 0 give -inf


# -- ai.onnx.preview.training ----------------------------------------------------------------
def training_model(op, r, t, tensors: list[np.ndarray], n_out: int, **attrs):
    names = [f"t{i}" for i in range(len(tensors))]
    inputs = {"r": r, "t": t, **dict(zip(names, tensors, strict=True))}
    node = helper.make_node(op, list(inputs), [f"y{i}" for i in range(n_out)], domain=TRAINING,
                            **attrs)
    return make_model([node], inputs=inputs, outputs=list(node.output), opset=18,
                      extra_opsets={TRAINING: 1}), inputs


@pytest.mark.parametrize("step,dtype", [(0, F32), (3, F32), (7, F64)])
def test_adagrad_against_reference(step, dtype):
    xs = [_rng.standard_normal((3, 4)).astype(dtype), _rng.standard_normal(5).astype(dtype)]
    gs = [_rng.standard_normal(a.shape).astype(dtype) for a in xs]
    hs = [np.abs(_rng.standard_normal(a.shape)).astype(dtype) for a in xs]
    against_reference(*training_model("Adagrad", np.array(0.1, dtype), np.array(step),
                                      xs + gs + hs, 4, decay_factor=0.5, epsilon=1e-4,
                                      norm_coefficient=0.01))


@pytest.mark.parametrize("step,dtype", [(0, F32), (1, F32), (10, F64)])
def test_adam_against_reference(step, dtype):
    xs = [_rng.standard_normal((2, 3)).astype(dtype), _rng.standard_normal(4).astype(dtype)]
    gs = [_rng.standard_normal(a.shape).astype(dtype) for a in xs]
    vs = [_rng.standard_normal(a.shape).astype(dtype) for a in xs]
    hs = [np.abs(_rng.standard_normal(a.shape)).astype(dtype) for a in xs]
    # the reference evaluator returns float32 for float64 Adam: values only, dtype ours
    against_reference(*training_model("Adam", np.array(0.05, dtype), np.array(step),
                                      xs + gs + vs + hs, 6, alpha=0.8, beta=0.95,
                                      epsilon=1e-3, norm_coefficient=0.02,
                                      norm_coefficient_post=0.1), dtype=np.dtype(dtype))


@pytest.mark.parametrize("mode", ["standard", "nesterov"])
@pytest.mark.parametrize("step", [0, 2])
def test_momentum_against_reference(mode, step):
    xs = [_rng.standard_normal((2, 3)).astype(F32), _rng.standard_normal(4).astype(F32)]
    gs = [_rng.standard_normal(a.shape).astype(F32) for a in xs]
    vs = [_rng.standard_normal(a.shape).astype(F32) for a in xs]
    against_reference(*training_model("Momentum", np.array(0.1, F32), np.array(step),
                                      xs + gs + vs, 4, alpha=0.9, beta=0.5, mode=mode,
                                      norm_coefficient=0.01))


def test_stop_gradient_is_the_identity_that_passes_no_gradient() -> None:
    """ai.onnx_trainer.StopGradient (PyTorch's .detach() in a training graph): y = x *
    StopGradient(x) has the value x^2 and the gradient x, not 2x."""
    from tests.gradcheck import gradients
    from trainer.autodiff import training_info
    from trainer.kernels import CUSTOM_DOMAIN

    x = np.random.default_rng(0).standard_normal((3, 4))
    nodes = [helper.make_node("StopGradient", ["X"], ["s"], domain=CUSTOM_DOMAIN),
             helper.make_node("Mul", ["X", "s"], ["y"]),
             helper.make_node("ReduceSum", ["y"], ["L"], keepdims=0)]
    m = make_model(nodes, initializers={"X": x}, outputs=["L"],
                   extra_opsets={CUSTOM_DOMAIN: 1})
    np.testing.assert_array_equal(run(m, fetch=["s"])["s"], x)
    grads, tm = gradients(m, ["X"])
    np.testing.assert_allclose(grads["X"], x, rtol=1e-12)
    loss = training_info(tm).loss
    np.testing.assert_allclose(run(tm, fetch=[loss])[loss], (x * x).sum(), rtol=1e-12)


def test_signal_ops_name_a_last_axis_that_is_no_real_or_complex_part():
    """DFT on [2, 6] returned a [2, 2] tensor (the last axis read as real and imaginary parts),
    and STFT on a real signal [batch, length] failed with an IndexError: both say what the
    last axis must hold."""
    from trainer.errors import ModelError
    from trainer.kernels import get_kernel

    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    with pytest.raises(ModelError, match=r"real \(size 1\) or complex .* got shape \(2, 6\)"):
        get_kernel("DFT", 20)(np, x)
    with pytest.raises(ModelError, match="needs a trailing axis of 1: Unsqueeze it"):
        get_kernel("STFT", 17)(np, x, np.array(2))
    y, = get_kernel("STFT", 17)(np, x[..., None], np.array(2), None, np.array(4))
    assert y.shape == (2, 2, 3, 2)
