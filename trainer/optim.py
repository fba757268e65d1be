"""Optimizers over one flat parameter buffer, step for step as torch.optim (plus LAMB).

Parameter groups are element ranges of the buffer: a per-group setting becomes a per-element
vector only where the groups disagree, so a step stays a handful of whole-buffer operations.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from trainer.config import ConfigError
from trainer.errors import TrainerError
from trainer.kernels import compiled

Layout = Sequence[tuple[str, int, int]]  # (tensor name, offset, size) in the flat buffer
Scalar = Any  # a Python float, or a per-element vector where parameter groups differ


class Optimizer:
    """Shared machinery: merged per-group settings, per-element expansion, state, step count.

    `groups` is a list of (tensor names, settings overriding the top-level ones); tensors that no
    group names form group 0 with the top-level settings, so `lrs[0]` is always the top-level lr.
    """

    defaults: ClassVar[dict[str, Any]] = {}
    switches: ClassVar[tuple[str, ...]] = ("maximize",)  # one value for the whole optimizer
    momentum_key: ClassVar[str | None] = None  # what one-cycle cycles: "momentum" | "betas"

    def __init__(self, xp, size: int, dtype, *, layout: Layout | None = None,
                 groups: Sequence[tuple[Sequence[str], Mapping[str, Any]]] = (),
                 **settings: Any):
        unknown = set(settings) - set(self.defaults)
        if unknown:
            raise TypeError(f"{type(self).__name__}: unknown settings {sorted(unknown)}")
        self.xp, self.size, self.dtype = xp, int(size), np.dtype(dtype)
        top = {**self.defaults, **settings}
        self.settings = top
        self.groups: list[dict[str, Any]] = [dict(top)]
        layout = list(layout) if layout is not None else [("", 0, self.size)]
        self.layout = sorted(((n, int(o), int(k)) for n, o, k in layout), key=lambda t: t[1])
        index = {name: i for i, (name, _, _) in enumerate(self.layout)}
        tensor_group = [0] * len(self.layout)
        for names, overrides in groups:
            bad = set(overrides) & set(self.switches)
            if bad or set(overrides) - set(self.defaults):
                raise TypeError(f"group settings {sorted(overrides)} are not per-group "
                                f"settings of {type(self).__name__}")
            self.groups.append({**top, **overrides})
            for name in names:
                if tensor_group[index[name]]:
                    raise ValueError(f"tensor '{name}' is in two parameter groups")
                tensor_group[index[name]] = len(self.groups) - 1
        self.base_lrs = [float(g["lr"]) for g in self.groups]
        used = sorted({g for g, (_, _, n) in zip(tensor_group, self.layout, strict=True) if n})
        self._used = used or [0]
        # groups that hold tensors, counting the tensors of other ranks' shards (ZeRO-1 lists
        # every tensor, its part here maybe empty): the logged lr is the first one's
        self.used_groups = tuple(sorted(set(tensor_group))) or (0,)
        # Where several groups hold elements: the group of every element, as runs of equal
        # group (NumPy fills a few hundred slices faster than it gathers) or ids for a gather.
        self._gid = self._runs = None
        if len(self._used) > 1:
            gid = np.zeros(self.size, np.int32)
            for g, (_, o, n) in zip(tensor_group, self.layout, strict=True):
                gid[o:o + n] = g
            starts = np.flatnonzero(np.diff(gid, prepend=-1))
            if xp is np and len(starts) <= 512:
                ends = np.append(starts[1:], self.size)
                self._runs = [(int(a), int(b), int(gid[a])) for a, b in zip(starts, ends,
                                                                              strict=True)]
            self._gid = xp.asarray(gid)
        self._filled: dict[str, tuple[float, ...]] = {}  # values each vector holds now
        self._vectors: dict[str, Any] = {}
        self._constants: dict[str, Scalar] = {}
        self.state: dict[str, Any] = {}
        self.steps = 0
        # (SGD: the groups whose momentum buffer has begun; a loaded state: after a step)
        self._started = [False] * len(self.groups)
        self.w1 = xp.empty(self.size, self.dtype)  # scratch, reused by every step
        self._w2 = None  # a second scratch, made on first use (SGD, Adam need none)
        self._kernels: dict[tuple, object] = {}
        self.kernel_error: str | None = None
        self._init_state()

    @property
    def w2(self):
        if self._w2 is None:
            self._w2 = self.xp.empty(self.size, self.dtype)
        return self._w2

    def _vector(self, name: str):
        """A preallocated per-element buffer kept under `name`."""
        if name not in self._vectors:
            self._vectors[name] = self.xp.empty(self.size, self.dtype)
        return self._vectors[name]

    # -- per-group settings ------------------------------------------------------------------
    def _expand(self, name: str, values: Sequence[float]) -> Scalar:
        """Per-group values -> one Python float if the groups holding elements agree, else a
        per-element vector (a buffer kept under `name`)."""
        first = values[self._used[0]]
        if self._gid is None or all(values[g] == first for g in self._used):
            return first
        buf = self._vector(name)
        key = tuple(values)
        if self._filled.get(name) != key:  # e.g. a constant lr fills its vector once
            vals = np.asarray(values, self.dtype)
            if self._runs is not None:
                for a, b, g in self._runs:
                    buf[a:b] = vals[g]
            else:
                self.xp.take(self.xp.asarray(vals), self._gid, out=buf)
            self._filled[name] = key
        return buf

    def _const(self, name: str, fn) -> Scalar:
        """fn(group settings) per group, expanded; cached until the settings change."""
        if name not in self._constants:
            self._constants[name] = self._expand(name, [float(fn(g)) for g in self.groups])
        return self._constants[name]

    def _each(self, name: str, fn) -> Scalar:
        """fn(group index, group settings) per group, expanded afresh (values that change per
        step: learning rates, bias corrections)."""
        return self._expand(name, [float(fn(i, g)) for i, g in enumerate(self.groups)])

    def _any(self, key: str) -> bool:
        return any(self.groups[g][key] for g in self._used)

    def set_momentum(self, value: float) -> None:
        """Set every group's momentum (SGD, RMSprop) or beta1 (Adam family, LAMB), as
        torch.optim.lr_scheduler.OneCycleLR does before each step."""
        key = self.momentum_key
        if key is None:
            raise TrainerError(f"optimizer {type(self).__name__} has no momentum or beta1 to "
                               "cycle; set schedule.cycle_momentum: false")
        for g in self.groups:
            g[key] = (value, g[key][1]) if key == "betas" else value
        self._constants.clear()
        self._init_state()

    # -- state ---------------------------------------------------------------------------------
    def _init_state(self) -> None:
        """Allocate the state this configuration needs (called again when settings change)."""

    def _zeros(self, name: str, fill: Scalar = 0.0):
        if name not in self.state:
            buf = self.xp.zeros(self.size, self.dtype)
            if not isinstance(fill, float) or fill:
                buf[...] = fill
            self.state[name] = buf
        return self.state[name]

    def _extra_state(self) -> dict[str, np.ndarray]:
        """Small host-side state beside the per-element buffers (e.g. NAdam's mu product)."""
        return {}

    def _load_extra(self, state: Mapping[str, Any]) -> None:
        """Restore what _extra_state returned."""

    # extra state that checkpoints of earlier versions do not hold (_load_extra makes do)
    optional_state: tuple[str, ...] = ()

    def state_dict(self) -> dict[str, Any]:
        """Arrays to checkpoint: 'steps', the per-element buffers and any extra state."""
        return {"steps": np.array(self.steps), **self.state, **self._extra_state()}

    def state_keys_match(self, keys: Iterable[str]) -> bool:
        """Whether a saved state with these keys is this optimizer's (optional_state aside)."""
        keys, mine = set(keys), set(self.state_dict())
        return keys <= mine and mine - keys <= set(self.optional_state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        mine = self.state_dict()
        if not self.state_keys_match(state):
            raise TrainerError(f"optimizer state holds {sorted(state)}, expected {sorted(mine)}")
        for k, v in state.items():
            if k != "steps" and tuple(np.shape(v)) != tuple(np.shape(mine[k])):
                raise TrainerError(f"optimizer state '{k}' has shape {np.shape(v)}, expected "
                                   f"{tuple(np.shape(mine[k]))}: the parameters or groups "
                                   "changed")
        if not (np.ndim(state["steps"]) == 0 and float(state["steps"]) == int(state["steps"])
                and int(state["steps"]) >= 0):  # (a damaged checkpoint: the resume says so)
            raise ValueError(f"the optimizer's step count {state['steps']} is not a whole "
                             "number of at least 0")
        self.steps = int(state["steps"])
        for k, buf in self.state.items():
            buf[...] = self.xp.asarray(state[k])
        self._load_extra(state)

    # -- the step ------------------------------------------------------------------------------
    def step(self, p, g, lr: float | Sequence[float]) -> None:
        """Update p in place from gradient g (g is not modified). lr: one learning rate per
        group (group 0 = the top-level settings), or a single float for the top-level group
        that the other groups scale by their configured ratio."""
        if isinstance(lr, float | int) or np.ndim(lr) == 0:
            top = self.base_lrs[0]
            lrs = [float(lr) if b == top else float(lr) * (b / top) for b in self.base_lrs]
        else:
            lrs = [float(x) for x in lr]
            if len(lrs) != len(self.groups):
                raise ValueError(f"{len(lrs)} learning rates for {len(self.groups)} groups")
        self.steps += 1
        self._update(p, g, lrs)

    def _update(self, p, g, lrs: list[float]) -> None:
        raise NotImplementedError

    def _grad(self, p, g, weight_decay: Scalar = 0.0):
        """The gradient torch's update starts from: -g if maximize, plus weight_decay * p
        (in its own buffer, so w1 and w2 stay free)."""
        xp = self.xp
        maximize = self.settings["maximize"]
        if _zero(weight_decay) and not maximize:
            return g
        out = self._vector("grad")
        if _zero(weight_decay):
            return xp.negative(g, out=out)
        xp.multiply(p, weight_decay, out=out)
        return xp.subtract(out, g, out=out) if maximize else xp.add(g, out, out=out)

    def _decay(self, p, lrs: list[float]) -> Scalar:
        """Decoupled weight decay (AdamW): p *= 1 - lr * weight_decay; returns the coupled
        weight decay still to add to the gradient (0 when decoupled)."""
        if not self.settings.get("decoupled_weight_decay"):
            return self._const("weight_decay", lambda g: g["weight_decay"])
        decay = [1 - lrs[i] * g["weight_decay"] for i, g in enumerate(self.groups)]
        if all(self.groups[g]["weight_decay"] == 0 for g in self._used):
            return 0.0
        if self._runs is not None and len({decay[g] for g in self._used}) > 1:
            # (on the host, a scalar product per run of the groups that decay, instead of a
            # per-element vector: no parameter-sized buffer, fewer elements touched)
            for a, b, gi in self._runs:
                if self.groups[gi]["weight_decay"]:
                    p[a:b] *= decay[gi]
        else:
            p *= self._each("decay", lambda i, g: decay[i])
        return 0.0

    # -- one generated kernel per update (GPU; host: compiled) ---------------------------------
    def _fusable(self) -> bool:
        """Whether _fused_update may run: a device with a kernel API, or the host with the
        compiled loops on (NumPy first: a missing module attribute costs NumPy 1.6 us, each
        step)."""
        if self.kernel_error:
            return False
        if self.xp is np:  # (without parameter groups: with them, the NumPy form keeps its
            # per-group products, where the loop would read parameter-sized vectors of them)
            return self._gid is None and compiled.enabled()
        return getattr(self.xp, "ElementwiseKernel", None) is not None

    def _kernel(self, key: tuple, params: Sequence[str], outs: Sequence[str],
                lines: Sequence[str]):
        """The update as one cupy.ElementwiseKernel (every name of type T, the buffers' float
        type; `outs` are read and written in place), made once per key; None where xp has no
        kernel API or a kernel failed (the update then runs as the xp operations, which the
        body repeats one by one in the same order, so both round alike). On the host, the same
        body as one compiled loop over the buffers (_HostUpdate): one pass instead of one per
        operation, the same roundings."""
        if self.xp is np:
            if self.kernel_error is not None or not compiled.enabled():
                return None
            k = self._kernels.get(key)
            if k is None:
                k = self._kernels[key] = _HostUpdate(type(self).__name__.lower(), params, outs,
                                                     lines, self.dtype)
            return k
        make = None if self.xp is np else getattr(self.xp, "ElementwiseKernel", None)
        if make is None or self.kernel_error is not None:
            return None
        k = self._kernels.get(key)
        if k is None:
            body = "\n".join(lines)
            name = (f"onnx_trainer_{type(self).__name__.lower()}_"
                    + hashlib.sha1(body.encode()).hexdigest()[:10])
            try:
                k = self._kernels[key] = make(", ".join(f"T {n}" for n in params),
                                              ", ".join(f"T {n}" for n in outs), body, name)
            except Exception as exc:  # noqa: BLE001 - the xp operations run instead
                self._kernel_failed(exc)
                return None
        return k

    def _launch(self, k, *args) -> bool:
        try:
            k(*args)
            return True
        except Exception as exc:  # noqa: BLE001 - the xp operations run instead
            self._kernel_failed(exc)
            return False

    def _kernel_failed(self, exc: Exception) -> None:
        self.kernel_error = f"{type(exc).__name__}: {exc}"
        warnings.warn(f"the fused {type(self).__name__} kernel failed ({self.kernel_error}); "
                      "the update runs as separate operations", RuntimeWarning, stacklevel=4)

    def _grad_source(self, weight_decay: Scalar, decoupled: bool) -> tuple[list, list[str]]:
        """(extra arguments: ("wd", value), or "decay" for the caller's per-step decoupled
        decay; C lines) making `d`, the gradient the update starts from, as _decay and _grad
        do (p, g the buffers)."""
        args, lines = [], ["T d = g;"]
        if decoupled and not _zero(weight_decay):
            lines.append("p = p * decay;")  # (the decay value: the caller's, per step)
            args.append("decay")
            weight_decay = 0.0
        maximize = self.settings["maximize"]
        if not _zero(weight_decay):
            args.append(("wd", weight_decay))
            lines += ["T q = p * wd;", "d = q - g;" if maximize else "d = g + q;"]
        elif maximize:
            lines.append("d = -g;")
        return args, lines

    def _ema_sq(self, v, g, beta: Scalar, one_minus: Scalar) -> None:
        """v = beta * v + (1 - beta) * g * g (torch: mul_(beta).addcmul_(g, g, 1 - beta))."""
        w = self.xp.multiply(g, g, out=self.w1)
        w *= one_minus
        v *= beta
        v += w

    def _lerp(self, m, g, weight: Scalar) -> None:
        """m += weight * (g - m) (torch's lerp_)."""
        w = self.xp.subtract(g, m, out=self.w1)
        w *= weight
        m += w


class _HostUpdate:
    """An optimizer's kernel body (the `T name = a op b;` lines _fused_update writes for the
    device) as one compiled host loop over the flat buffers: each element's values are read
    once, every operation is the NumPy path's in the same order and dtype (scalars are passed
    in the buffers' dtype, as NumPy takes a Python float next to an array), so the results are
    the NumPy update's bit for bit. Compiled once per layout of the values (a scalar, or a
    per-element vector: not used on the host so far, see _fusable), cached on disk
    (compiled.generated)."""

    _IDENT = re.compile(r"[A-Za-z_]\w*")

    def __init__(self, kind: str, params: Sequence[str], outs: Sequence[str],
                 lines: Sequence[str], dtype):
        self.kind, self.params, self.outs, self.lines = kind, list(params), list(outs), lines
        self.scalar = np.dtype(dtype).type
        self._fns: dict[tuple, Any] = {}

    def source(self, vectors: tuple[bool, ...]) -> str:
        """The module source of the loop, `vectors[k]`: whether params[k] is per-element."""
        def local(text: str) -> str:
            return self._IDENT.sub(lambda m: "np.sqrt" if m.group(0) == "sqrt"
                                   else m.group(0) + "_v", text)
        body = [f"{n}_v = {n}[i]" if vec else f"{n}_v = {n}"
                for n, vec in zip(self.params, vectors, strict=True)]
        body += [f"{n}_v = {n}[i]" for n in self.outs]
        for line in self.lines:
            text = line.strip().rstrip(";")
            if "(" in text.replace("sqrt(", ""):
                raise ValueError(f"no host form for the kernel line {line!r}")
            body.append(local(text[2:] if text.startswith("T ") else text))
        body += [f"{n}[i] = {n}_v" for n in self.outs]
        args = ", ".join([*self.params, *self.outs])
        return (f"@JIT\ndef run({args}):\n    for i in range({self.outs[0]}.size):\n"
                + "".join(f"        {b}\n" for b in body))

    def __call__(self, *args) -> None:
        k = len(self.params)
        vectors = tuple(isinstance(a, np.ndarray) and a.ndim == 1 for a in args[:k])
        fn = self._fns.get(vectors)
        if fn is None:
            text = self.source(vectors)
            name = f"{self.kind}_{hashlib.sha1(text.encode()).hexdigest()[:12]}"
            fn = self._fns[vectors] = compiled.generated(name, text)
        fn(*[a if vec else self.scalar(a) for a, vec in zip(args[:k], vectors, strict=True)],
           *args[k:])


def _zero(x: Scalar) -> bool:
    return isinstance(x, float) and x == 0.0


class SGD(Optimizer):
    """torch.optim.SGD: weight decay, momentum with dampening, Nesterov, maximize."""

    defaults = {"lr": 1e-3, "momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0,
                "nesterov": False, "maximize": False}
    switches = ("nesterov", "maximize")
    momentum_key = "momentum"

    def _init_state(self) -> None:
        if self._any("momentum"):
            self._zeros("momentum_buffer")

    optional_state = ("momentum_started",)

    def _extra_state(self):
        return {"momentum_started": np.array(self._started, np.int8)}

    def _load_extra(self, state):
        started = np.asarray(state.get("momentum_started", ())).reshape(-1)
        # (a checkpoint of an earlier version: every group has begun after a step)
        self._started = [bool(x) for x in started] if len(started) == len(self.groups) \
            else [self.steps >= 1] * len(self.groups)

    def _momentum_terms(self) -> tuple[Scalar, Scalar]:
        """(a, b) of this step's buffer update buf = a * buf + b * d, per group, as torch's
        SGD: a group's buffer starts as a copy of d at its first step with momentum (not
        always the run's first: a onecycle momentum may start at 0), then takes momentum * buf
        + (1 - dampening) * d. A group without momentum takes d (its "buffer" is d; torch
        leaves its buffer, which only a onecycle momentum, every group's, would use again,
        and a step where every group's momentum is 0 does not come here). Which groups have
        had a step with momentum is part of the state (momentum_started)."""
        started = self._started
        a = self._each("buf*", lambda i, s: s["momentum"] if started[i] else 0.0)
        b = self._each("d*", lambda i, s: 1 - s["dampening"] if s["momentum"] and started[i]
                       else 1.0)
        self._started = [st or bool(s["momentum"]) for st, s in zip(started, self.groups,
                                                                     strict=True)]
        return a, b

    def _update(self, p, g, lrs):
        if self._fused_update(p, g, lrs):
            return
        xp = self.xp
        d = self._grad(p, g, self._const("weight_decay", lambda s: s["weight_decay"]))
        if self._any("momentum"):
            buf = self.state["momentum_buffer"]
            mom = self._const("momentum", lambda s: s["momentum"])
            a, b = self._momentum_terms()
            if _zero(a) and b == 1.0:  # (every group's first step with momentum)
                buf[...] = d
            else:
                buf *= a
                w = xp.multiply(d, b, out=self.w1)
                buf += w
            if self.settings["nesterov"]:
                w = xp.multiply(buf, mom, out=self.w1)
                d = xp.add(d, w, out=self.w1)
            else:
                d = buf
        w = xp.multiply(d, self._each("lr", lambda i, s: lrs[i]), out=self.w1)
        p -= w

    def _fused_update(self, p, g, lrs) -> bool:
        """The update above as one kernel (where xp has them); False where it did not run."""
        if not self._fusable():
            return False
        extra, lines = self._grad_source(
            self._const("weight_decay", lambda s: s["weight_decay"]), False)
        values = dict(v for v in extra if isinstance(v, tuple))
        outs = ["p"]
        momentum = self._any("momentum")
        if momentum:
            outs.append("buf")
            values["mom"] = self._const("momentum", lambda s: s["momentum"])
            started = list(self._started)
            a, b = self._momentum_terms()
            if _zero(a) and b == 1.0:
                lines.append("buf = d;")
            else:
                values["bufa"], values["db"] = a, b
                lines += ["buf = buf * bufa;", "T w = d * db;", "buf = buf + w;"]
            if self.settings["nesterov"]:
                lines += ["T n = buf * mom;", "d = d + n;"]
            else:
                lines.append("d = buf;")
        values["lr"] = self._each("lr", lambda i, s: lrs[i])
        lines += ["T u = d * lr;", "p = p - u;"]
        names = ["g", *values]
        k = self._kernel(("sgd", tuple(names), *lines), names, outs, lines)
        if k is None:
            if momentum:  # (the unfused update takes this step's terms again)
                self._started = started
            return False
        state = [self.state["momentum_buffer"]] if momentum else []
        if self._launch(k, g, *values.values(), p, *state):
            return True
        if momentum:
            self._started = started
        return False


class Adam(Optimizer):
    """torch.optim.Adam (decoupled_weight_decay=True: AdamW), with amsgrad and maximize."""

    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                "amsgrad": False, "maximize": False, "decoupled_weight_decay": False}
    switches = ("amsgrad", "maximize", "decoupled_weight_decay")
    momentum_key = "betas"

    def __init__(self, xp, size, dtype, *, decoupled: bool | None = None, **kw):
        if decoupled is not None:  # the earlier spelling of decoupled_weight_decay
            kw["decoupled_weight_decay"] = decoupled
        super().__init__(xp, size, dtype, **kw)

    def _init_state(self) -> None:
        self._zeros("exp_avg")
        self._zeros("exp_avg_sq")
        if self.settings["amsgrad"]:
            self._zeros("max_exp_avg_sq")

    def _moments(self, p, g, lrs):
        """Weight decay, then the two moment updates; returns the gradient used."""
        g = self._grad(p, g, self._decay(p, lrs))
        self._lerp(self.state["exp_avg"], g, self._const("1-b1", lambda s: 1 - s["betas"][0]))
        self._ema_sq(self.state["exp_avg_sq"], g, self._const("b2", lambda s: s["betas"][1]),
                     self._const("1-b2", lambda s: 1 - s["betas"][1]))
        return g

    def _update(self, p, g, lrs):
        if not self.settings["amsgrad"] and self._fused_update(p, g, lrs):
            return
        xp, t = self.xp, self.steps
        self._moments(p, g, lrs)
        v = self.state["exp_avg_sq"]
        if self.settings["amsgrad"]:
            v = xp.maximum(self.state["max_exp_avg_sq"], v, out=self.state["max_exp_avg_sq"])
        denom = xp.sqrt(v, out=self.w1)
        denom /= self._each("bc2_sqrt", lambda i, s: (1 - s["betas"][1] ** t) ** 0.5)
        denom += self._const("eps", lambda s: s["eps"])
        w = xp.divide(self.state["exp_avg"], denom, out=self.w1)
        w *= self._each("step_size", lambda i, s: lrs[i] / (1 - s["betas"][0] ** t))
        p -= w

    def _fused_update(self, p, g, lrs) -> bool:
        """The update above (without amsgrad) as one kernel; False where it did not run."""
        if not self._fusable():
            return False
        t = self.steps
        wd = self._const("weight_decay", lambda s: s["weight_decay"])
        decoupled = bool(self.settings.get("decoupled_weight_decay"))
        extra, lines = self._grad_source(wd, decoupled)
        values = {}
        for v in extra:
            if v == "decay":
                values["decay"] = self._each("decay", lambda i, s: 1 - lrs[i] * s["weight_decay"])
            else:
                values[v[0]] = v[1]
        values.update({
            "omb1": self._const("1-b1", lambda s: 1 - s["betas"][0]),
            "b2": self._const("b2", lambda s: s["betas"][1]),
            "omb2": self._const("1-b2", lambda s: 1 - s["betas"][1]),
            "bc2": self._each("bc2_sqrt", lambda i, s: (1 - s["betas"][1] ** t) ** 0.5),
            "eps": self._const("eps", lambda s: s["eps"]),
            "step": self._each("step_size", lambda i, s: lrs[i] / (1 - s["betas"][0] ** t))})
        lines += ["T e = d - m;", "e = e * omb1;", "m = m + e;",
                  "T s = d * d;", "s = s * omb2;", "v = v * b2;", "v = v + s;",
                  "T den = sqrt(v);", "den = den / bc2;", "den = den + eps;",
                  "T u = m / den;", "u = u * step;", "p = p - u;"]
        names = ["g", *values]
        k = self._kernel(("adam", tuple(names), *lines), names, ["p", "m", "v"], lines)
        if k is None:
            return False
        return self._launch(k, g, *values.values(), p, self.state["exp_avg"],
                            self.state["exp_avg_sq"])


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 0.01)."""

    defaults = {**Adam.defaults, "weight_decay": 1e-2, "decoupled_weight_decay": True}


class RMSprop(Optimizer):
    """torch.optim.RMSprop: smoothing alpha, centered, momentum, weight decay, maximize."""

    defaults = {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0,
                "centered": False, "maximize": False}
    switches = ("centered", "maximize")
    momentum_key = "momentum"

    def _init_state(self) -> None:
        self._zeros("square_avg")
        if self._any("momentum"):
            self._zeros("momentum_buffer")
        if self.settings["centered"]:
            self._zeros("grad_avg")

    def _update(self, p, g, lrs):
        xp = self.xp
        g = self._grad(p, g, self._const("weight_decay", lambda s: s["weight_decay"]))
        sq = self.state["square_avg"]
        self._ema_sq(sq, g, self._const("alpha", lambda s: s["alpha"]),
                     self._const("1-alpha", lambda s: 1 - s["alpha"]))
        if self.settings["centered"]:
            ga = self.state["grad_avg"]
            self._lerp(ga, g, self._const("1-alpha", lambda s: 1 - s["alpha"]))
            avg = xp.multiply(ga, ga, out=self.w1)
            xp.subtract(sq, avg, out=avg)
            xp.sqrt(avg, out=avg)
        else:
            avg = xp.sqrt(sq, out=self.w1)
        avg += self._const("eps", lambda s: s["eps"])
        lr = self._each("lr", lambda i, s: lrs[i])
        if self._any("momentum"):
            # A group without momentum multiplies its buffer by 0: buf = g / avg.
            buf = self.state["momentum_buffer"]
            buf *= self._const("momentum", lambda s: s["momentum"])
            buf += xp.divide(g, avg, out=avg)
            w = xp.multiply(buf, lr, out=self.w1)
        else:
            w = xp.divide(g, avg, out=avg)
            w *= lr
        p -= w


class Adagrad(Optimizer):
    """torch.optim.Adagrad: lr_decay, initial_accumulator_value, weight decay, maximize."""

    defaults = {"lr": 1e-2, "lr_decay": 0.0, "weight_decay": 0.0,
                "initial_accumulator_value": 0.0, "eps": 1e-10, "maximize": False}
    switches = ("initial_accumulator_value", "maximize")  # torch: the constructor's, for all

    def _init_state(self) -> None:
        self._zeros("sum", float(self.settings["initial_accumulator_value"]))

    def _update(self, p, g, lrs):
        xp, t = self.xp, self.steps
        g = self._grad(p, g, self._const("weight_decay", lambda s: s["weight_decay"]))
        acc = self.state["sum"]
        acc += xp.multiply(g, g, out=self.w1)
        std = xp.sqrt(acc, out=self.w1)
        std += self._const("eps", lambda s: s["eps"])
        w = xp.divide(g, std, out=self.w1)
        w *= self._each("clr", lambda i, s: lrs[i] / (1 + (t - 1) * s["lr_decay"]))
        p -= w


class Adadelta(Optimizer):
    """torch.optim.Adadelta: rho, eps, weight decay, maximize (lr scales the delta)."""

    defaults = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.0, "maximize": False}

    def _init_state(self) -> None:
        self._zeros("square_avg")
        self._zeros("acc_delta")

    def _update(self, p, g, lrs):
        xp = self.xp
        g = self._grad(p, g, self._const("weight_decay", lambda s: s["weight_decay"]))
        rho = self._const("rho", lambda s: s["rho"])
        one_minus = self._const("1-rho", lambda s: 1 - s["rho"])
        eps = self._const("eps", lambda s: s["eps"])
        sq, acc = self.state["square_avg"], self.state["acc_delta"]
        self._ema_sq(sq, g, rho, one_minus)
        std = xp.add(sq, eps, out=self.w1)
        xp.sqrt(std, out=std)
        delta = xp.add(acc, eps, out=self.w2)
        xp.sqrt(delta, out=delta)
        delta /= std
        delta *= g
        self._ema_sq(acc, delta, rho, one_minus)
        delta *= self._each("lr", lambda i, s: lrs[i])
        p -= delta


class NAdam(Optimizer):
    """torch.optim.NAdam: momentum_decay schedule of mu, decoupled_weight_decay, maximize."""

    defaults = {"lr": 2e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                "momentum_decay": 4e-3, "decoupled_weight_decay": False, "maximize": False}
    switches = ("decoupled_weight_decay", "maximize")
    momentum_key = "betas"

    def _init_state(self) -> None:
        self._zeros("exp_avg")
        self._zeros("exp_avg_sq")
        if not hasattr(self, "mu_product"):
            self.mu_product = [1.0] * len(self.groups)  # per group, as torch keeps per tensor

    def _extra_state(self):
        return {"mu_product": np.array(self.mu_product, np.float64)}

    def _load_extra(self, state):
        self.mu_product = [float(x) for x in np.asarray(state["mu_product"])]

    def _update(self, p, g, lrs):
        xp, t = self.xp, self.steps
        g = self._grad(p, g, self._decay(p, lrs))
        mu = [s["betas"][0] * (1.0 - 0.5 * 0.96 ** (t * s["momentum_decay"]))
              for s in self.groups]
        mu_next = [s["betas"][0] * (1.0 - 0.5 * 0.96 ** ((t + 1) * s["momentum_decay"]))
                   for s in self.groups]
        prod = [a * b for a, b in zip(self.mu_product, mu, strict=True)]
        self.mu_product = prod
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        self._lerp(m, g, self._const("1-b1", lambda s: 1 - s["betas"][0]))
        self._ema_sq(v, g, self._const("b2", lambda s: s["betas"][1]),
                     self._const("1-b2", lambda s: 1 - s["betas"][1]))
        denom = xp.divide(v, self._each("bc2", lambda i, s: 1 - s["betas"][1] ** t),
                          out=self.w1)
        xp.sqrt(denom, out=denom)
        denom += self._const("eps", lambda s: s["eps"])
        # torch: p.addcdiv_(g, denom, c1); p.addcdiv_(m, denom, c2), with c1, c2 < 0.
        c1 = self._each("c1", lambda i, s: lrs[i] * (1.0 - mu[i]) / (1.0 - prod[i]))
        c2 = self._each("c2", lambda i, s: lrs[i] * mu_next[i] / (1.0 - prod[i] * mu_next[i]))
        w = xp.divide(g, denom, out=self.w2)
        w *= c1
        p -= w
        w = xp.divide(m, denom, out=self.w1)
        w *= c2
        p -= w


class RAdam(Optimizer):
    """torch.optim.RAdam: variance rectification after the first steps, decoupled weight
    decay, maximize."""

    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0,
                "decoupled_weight_decay": False, "maximize": False}
    switches = ("decoupled_weight_decay", "maximize")
    momentum_key = "betas"

    def _init_state(self) -> None:
        self._zeros("exp_avg")
        self._zeros("exp_avg_sq")

    def _update(self, p, g, lrs):
        xp, t = self.xp, self.steps
        g = self._grad(p, g, self._decay(p, lrs))
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        self._lerp(m, g, self._const("1-b1", lambda s: 1 - s["betas"][0]))
        self._ema_sq(v, g, self._const("b2", lambda s: s["betas"][1]),
                     self._const("1-b2", lambda s: 1 - s["betas"][1]))
        rect = [_radam_rect(s["betas"][1], t) for s in self.groups]
        # torch: p -= (m / bc1) * lr * (sqrt(bc2) / (sqrt(v) + eps)) * rect, where rect > 0;
        # p -= (m / bc1) * lr where the variance is not yet tractable.
        u = xp.divide(m, self._each("bc1", lambda i, s: 1 - s["betas"][0] ** t), out=self.w1)
        u *= self._each("lr", lambda i, s: lrs[i])
        on = [rect[i] is not None for i in self._used]
        if any(on):
            a = xp.sqrt(v, out=self.w2)
            a += self._const("eps", lambda s: s["eps"])
            xp.divide(self._each("bc2_sqrt", lambda i, s: (1 - s["betas"][1] ** t) ** 0.5), a,
                      out=a)
            u *= a
            u *= self._each("rect", lambda i, s: rect[i] if rect[i] is not None else 1.0)
            if not all(on):  # groups still without rectification take the plain step
                mask = self._each("rect_on", lambda i, s: float(rect[i] is not None))
                plain = xp.divide(m, self._each("bc1", lambda i, s: 1 - s["betas"][0] ** t),
                                  out=a)
                plain *= self._each("lr", lambda i, s: lrs[i])
                u = xp.where(mask > 0, u, plain)
        p -= u


def _radam_rect(beta2: float, t: int) -> float | None:
    """RAdam's rectification term at step t, or None while rho_t <= 5 (torch's threshold)."""
    bc2 = 1 - beta2 ** t
    rho_inf = 2 / (1 - beta2) - 1
    rho_t = rho_inf - 2 * t * (beta2 ** t) / bc2
    if rho_t <= 5.0:
        return None
    return ((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)) ** 0.5


class LAMB(Optimizer):
    """LAMB (You et al. 2019, Algorithm 2): the Adam direction plus decoupled weight decay,
    r = m_hat / (sqrt(v_hat) + eps) + wd * p, scaled per parameter tensor by the trust ratio
    ||p|| / ||r|| (1 where either norm is 0): p -= lr * ||p|| / ||r|| * r."""

    defaults = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-6, "weight_decay": 1e-2,
                "maximize": False}
    momentum_key = "betas"

    def _init_state(self) -> None:
        self._zeros("exp_avg")
        self._zeros("exp_avg_sq")
        if hasattr(self, "_tid"):
            return
        # Per-tensor segments of the flat buffer; empty tensors hold no elements to scale.
        segs = [(o, n) for _, o, n in self.layout if n]
        self._starts = np.array([o for o, _ in segs], np.int64)
        tiled = bool(segs) and segs[0][0] == 0 and all(
            a[0] + a[1] == b[0] for a, b in zip(segs, segs[1:], strict=False)) and \
            segs[-1][0] + segs[-1][1] == self.size
        if not tiled:
            raise ValueError("LAMB needs a layout whose tensors tile the flat buffer")
        tid = np.repeat(np.arange(len(segs), dtype=np.int32), [n for _, n in segs])
        self._tid = self.xp.asarray(tid)
        self._starts_x = self.xp.asarray(self._starts)
        self._ratio = self.xp.empty(self.size, self.dtype)

    def _norms(self, x):
        """Per-tensor 2-norms of x (one whole-buffer square, one segmented sum)."""
        xp = self.xp
        sq = xp.multiply(x, x, out=self.w2)
        try:
            sums = xp.add.reduceat(sq, self._starts_x)
        except (AttributeError, NotImplementedError, TypeError):
            sums = xp.bincount(self._tid, weights=sq, minlength=len(self._starts))
        return xp.sqrt(sums)

    def _update(self, p, g, lrs):
        xp, t = self.xp, self.steps
        g = self._grad(p, g)
        m, v = self.state["exp_avg"], self.state["exp_avg_sq"]
        self._lerp(m, g, self._const("1-b1", lambda s: 1 - s["betas"][0]))
        self._ema_sq(v, g, self._const("b2", lambda s: s["betas"][1]),
                     self._const("1-b2", lambda s: 1 - s["betas"][1]))
        r = xp.divide(v, self._each("bc2", lambda i, s: 1 - s["betas"][1] ** t), out=self.w1)
        xp.sqrt(r, out=r)
        r += self._const("eps", lambda s: s["eps"])
        w = xp.divide(m, self._each("bc1", lambda i, s: 1 - s["betas"][0] ** t), out=self.w2)
        xp.divide(w, r, out=r)  # r = m_hat / (sqrt(v_hat) + eps)
        wd = self._const("weight_decay", lambda s: s["weight_decay"])
        if not _zero(wd):
            w = xp.multiply(p, wd, out=self.w2)
            r += w
        pn, rn = self._norms(p), self._norms(r)
        ok = (pn > 0) & (rn > 0)
        ratio = xp.where(ok, pn / xp.where(ok, rn, 1.0), 1.0).astype(self.dtype, copy=False)
        scale = xp.take(ratio, self._tid, out=self._ratio)
        scale *= self._each("lr", lambda i, s: lrs[i])
        r *= scale
        p -= r


OPTIMIZERS: dict[str, type[Optimizer]] = {
    "sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad,
    "adadelta": Adadelta, "nadam": NAdam, "radam": RAdam, "lamb": LAMB}


def resolve_groups(patterns: Sequence[Sequence[str]], names: Sequence[str],
                   key: str = "optimizer.groups",
                   aliases: Mapping[str, str] | None = None) -> list[list[str]]:
    """Tensor names per group: globs over `names` (or the PyTorch parameter a folded tensor
    holds, `aliases`), the first matching group wins."""
    from trainer.autodiff.params import alias_matches, alias_names, glob_match

    aliases = aliases or {}
    exact = set(names) | {a for v in aliases.values() for a in alias_names(v)}

    def hit(n: str, pattern: str) -> bool:
        return glob_match(n, pattern, exact) or alias_matches(aliases.get(n, ""), pattern,
                                                              exact)
    taken: set[str] = set()
    out = []
    for i, globs in enumerate(patterns):
        # (a group's globs together: a recipe's list, ["*bias*", "*norm*"], may name what one
        # model has and another has not)
        if not any(hit(n, pattern) for pattern in globs for n in names):
            shown = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
            which = f"'{globs[0]}' matches no" if len(globs) == 1 else \
                "none of " + ", ".join(f"'{g}'" for g in globs) + " matches a"
            raise ConfigError(f"config key '{key}[{i}].params': {which} trained parameter "
                              f"(trained: {shown})")
        mine = [n for n in names if n not in taken and any(hit(n, pattern) for pattern in globs)]
        if not mine:
            raise ConfigError(f"config key '{key}[{i}].params': every parameter it matches is "
                              "already in an earlier group (the first matching group wins); "
                              "remove this group or narrow the earlier one")
        taken.update(mine)
        out.append(mine)
    return out


def make_optimizer(cfg, xp, size: int, dtype, layout: Layout | None = None,
                   aliases: Mapping[str, str] | None = None) -> Optimizer:
    """The optimizer of an OptimizerConfig over a flat buffer of `size` elements; `layout`
    lists (name, offset, size) per parameter tensor (needed by groups and LAMB); `aliases`
    the PyTorch parameter each folded tensor holds, which group globs may name."""
    cls = OPTIMIZERS.get(cfg.type)
    if cls is None:
        raise TrainerError(f"unknown optimizer type '{cfg.type}' (known: {', '.join(OPTIMIZERS)})")
    settings = {k: getattr(cfg, k) for k in cls.defaults
                if hasattr(cfg, k) and not (cls is AdamW and k == "decoupled_weight_decay")}
    if "betas" in settings:
        settings["betas"] = tuple(settings["betas"])
    specs = list(getattr(cfg, "groups", ()) or ())
    groups = []
    if specs:
        names = [n for n, _, _ in layout] if layout is not None else []
        members = resolve_groups([s.params for s in specs], names, aliases=aliases)
        groups = [(m, {k: tuple(v) if k == "betas" else v for k, v in s.settings.items()})
                  for m, s in zip(members, specs, strict=True)]
    return cls(xp, size, dtype, layout=layout, groups=groups, **settings)


def grad_norm(xp, g, sumsq=None):
    """The 2-norm of g as a 0-d array (no device-to-host read). sumsq: the sum of squares of
    the whole gradient when g is one shard of it (ZeRO-1)."""
    return xp.sqrt((g * g).sum() if sumsq is None else sumsq)


def clip_grad_norm_(xp, g, max_norm: float, sumsq=None, total=None):
    """Scale g in place so its 2-norm is at most max_norm (torch.nn.utils.clip_grad_norm_);
    returns the norm before clipping as a 0-d array (no device-to-host read). sumsq: as in
    grad_norm; total: that norm, where the caller has it already."""
    if total is None:
        total = grad_norm(xp, g, sumsq)
    g *= xp.minimum(g.dtype.type(1.0), g.dtype.type(max_norm) / (total + g.dtype.type(1e-6)))
    return total
