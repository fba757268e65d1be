"""Ops whose outputs carry no gradient (random, windows, strings, the piecewise constant
ai.onnx.ml ops and the Gradient op), and ArrayFeatureExtractor's rule (the other
differentiable ai.onnx.ml ops are in rules/ml.py).

NO_GRADIENT is keyed by op name alone: no two domains of the installed onnx share an op name.
"""

from __future__ import annotations

import numpy as np

from trainer.autodiff.registry import grad, no_gradient
from trainer.errors import ModelError
from trainer.graph import elem_type

# Random generators: samples are not functions of their inputs (which give shape, dtype or
# probabilities; PyTorch's bernoulli/multinomial have no gradient either).
no_gradient("RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Bernoulli", "Multinomial")
# Windows and mel filters: built from integer sizes and attributes only.
no_gradient("HannWindow", "HammingWindow", "BlackmanWindow", "MelWeightMatrix")
# Strings, image bytes, n-gram counts, bit reinterpretation, detection indices, set operations
# (torch.unique has no gradient), and the integer/boolean results of sequences and optionals.
no_gradient("StringConcat", "StringNormalizer", "StringSplit", "RegexFullMatch",
            "TfIdfVectorizer", "ImageDecoder", "BitCast", "NonMaxSuppression", "Unique",
            "OptionalHasElement", "SequenceLength", "SequenceEmpty")
# ai.onnx.ml: thresholds, encoders, maps and trees (piecewise constant or non-tensor results).
no_gradient("Binarizer", "CastMap", "CategoryMapper", "DictVectorizer", "LabelEncoder",
            "OneHotEncoder", "TreeEnsemble", "TreeEnsembleClassifier", "TreeEnsembleRegressor",
            "ZipMap")
# ai.onnx.preview.training: Gradient is itself a derivative (its rule would be a second-order
# graph); the optimizer steps have rules in rules/training.py.
no_gradient("Gradient")


@grad("ArrayFeatureExtractor", domain="ai.onnx.ml", inputs=(0,))
def array_feature_extractor_grad(ctx):
    # y = x[..., idx] (a 1-D x gives [1, k]): dX = dY @ onehot(idx, n), repeated indices add up
    x = ctx.I(0)
    n, dtype = ctx.shape(x)[-1], ctx.dtype(x)
    index = ctx.static_value(ctx.I(1))
    nodes = []
    if index is not None:
        onehot = ctx.const(np.eye(n, dtype=dtype)[np.asarray(index).reshape(-1) % n],
                           suffix="onehot")
    elif ctx.opset >= 10:
        col, wrapped, hit, onehot = (ctx.tmp(s) for s in ("index", "wrapped", "hit", "onehot"))
        nodes += [ctx.reshape(ctx.I(1), [-1, 1], col),
                  ctx.node("Mod", [col, ctx.const(np.int64(n), np.int64, "n")], [wrapped]),
                  ctx.node("Equal", [wrapped, ctx.const(np.arange(n), np.int64, "range")], [hit]),
                  ctx.node("Cast", [hit], [onehot], to=elem_type(dtype))]
    else:
        raise ModelError(f"node '{ctx.name}' (ArrayFeatureExtractor): computed indices need "
                         f"opset >= 10 for the gradient; the model has {ctx.opset}")
    if len(ctx.shape(x)) > 1:
        return [*nodes, ctx.node("MatMul", [ctx.GO(0), onehot], [ctx.GI(0)])]
    dx = ctx.tmp("dx")
    return [*nodes, ctx.node("MatMul", [ctx.GO(0), onehot], [dx]),
            ctx.reshape(dx, [n], ctx.GI(0))]
