"""Gradient rule of the ai.onnx_trainer CTCLoss (the `ctc` loss): d log_probs from the label
posteriors (kernels/ctc.py's CTCLossGrad); the labels, the steps and the counts take none.
CTCLossGrad is itself a derivative (its rule would be a second-order graph): no gradient."""

from __future__ import annotations

from trainer.autodiff.registry import grad, no_gradient
from trainer.kernels import CUSTOM_DOMAIN


@grad("CTCLoss", domain=CUSTOM_DOMAIN, inputs=(0,))
def ctc_loss_grad(ctx):
    steps = [ctx.I(2)] if ctx.I(2) else []  # (each sample's steps, where given)
    return [ctx.node("CTCLossGrad", [ctx.I(0), ctx.I(1), ctx.GO(0)] + steps, [ctx.GI(0)],
                     domain=CUSTOM_DOMAIN, blank=ctx.attr("blank", 0))]


no_gradient("CTCLossGrad")
