"""ai.onnx.preview.training optimizer kernels: Adagrad, Adam and Momentum (one step, any number
of tensors; inputs are R, T, then the tensors grouped by role)."""

from __future__ import annotations

from trainer.kernels import host_ints, kernel

TRAINING = "ai.onnx.preview.training"


def _groups(inputs: tuple, roles: int, op: str) -> list[tuple]:
    if len(inputs) % roles:
        raise ValueError(f"{op}: {len(inputs)} tensor inputs is not a multiple of {roles}")
    k = len(inputs) // roles
    return [tuple(inputs[j * k + i] for j in range(roles)) for i in range(k)]


def _count(t) -> int:
    return host_ints(t.reshape(-1))[0]


@kernel("Adagrad", since=1, domain=TRAINING)
def Adagrad(xp, r, t, *inputs, decay_factor=0.0, epsilon=1e-6, norm_coefficient=0.0):
    xs, hs = [], []
    for x, g, h in _groups(inputs, 3, "Adagrad"):
        lr = r.astype(x.dtype) / (1 + t.astype(x.dtype) * decay_factor)
        g = norm_coefficient * x + g
        h_new = h + g * g
        xs.append((x - lr * g / (xp.sqrt(h_new) + epsilon)).astype(x.dtype))
        hs.append(h_new.astype(h.dtype))
    return tuple(xs + hs)


@kernel("Adam", since=1, domain=TRAINING)
def Adam(xp, r, t, *inputs, alpha=0.9, beta=0.999, epsilon=1e-6, norm_coefficient=0.0,
         norm_coefficient_post=0.0):
    step = _count(t)
    xs, vs, hs = [], [], []
    for x, g, v, h in _groups(inputs, 4, "Adam"):
        lr = r.astype(x.dtype)
        if step > 0:  # bias correction
            lr = lr * ((1 - beta**step) ** 0.5 / (1 - alpha**step))
        g = norm_coefficient * x + g
        v_new = alpha * v + (1 - alpha) * g
        h_new = beta * h + (1 - beta) * g * g
        x_new = x - lr * v_new / (xp.sqrt(h_new) + epsilon)
        xs.append(((1 - norm_coefficient_post) * x_new).astype(x.dtype))
        vs.append(v_new.astype(v.dtype))
        hs.append(h_new.astype(h.dtype))
    return tuple(xs + vs + hs)


@kernel("Momentum", since=1, domain=TRAINING)
def Momentum(xp, r, t, *inputs, alpha, beta, mode, norm_coefficient):
    if mode not in ("standard", "nesterov"):
        raise ValueError(f"Momentum: mode must be 'standard' or 'nesterov', got {mode!r}")
    beta_t = beta if _count(t) > 0 else 1.0
    xs, vs = [], []
    for x, g, v in _groups(inputs, 3, "Momentum"):
        lr = r.astype(x.dtype)
        g = norm_coefficient * x + g
        v_new = alpha * v + beta_t * g
        direction = g + alpha * v_new if mode == "nesterov" else v_new
        xs.append((x - lr * direction).astype(x.dtype))
        vs.append(v_new.astype(v.dtype))
    return tuple(xs + vs)
