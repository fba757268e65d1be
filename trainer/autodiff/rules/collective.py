"""Gradient rules of the ai.onnx_trainer collectives."""

from __future__ import annotations

from trainer.autodiff.registry import grad
from trainer.kernels import CUSTOM_DOMAIN


@grad("AllReduce", domain=CUSTOM_DOMAIN)
def allreduce_grad(ctx):
    # y = sum_r x_r on every rank, each rank's loss reads its y: dx_r = sum_k dy_k
    return [ctx.node("AllReduce", [ctx.GO(0)], [ctx.GI(0)], domain=CUSTOM_DOMAIN)]
