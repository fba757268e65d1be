"""Attention kernels: scaled dot-product Attention (opsets 23-25), LinearAttention, RotaryEmbedding.

Grouped query heads share one K/V read: queries are viewed as [batch, kv_heads, group * q_len,
head] so each step is one batched matmul. float16/bfloat16 inputs compute in float32.
"""

from __future__ import annotations

import math

import numpy as np
from onnx.helper import tensor_dtype_to_np_dtype

from trainer.kernels import kernel, matmul
from trainer.kernels.norm import compute_dtype
from trainer.kernels.reduce import max_of


def _split_heads(x, n: int):
    """[B, S, H*D] -> [B, H, S, D] (a view)."""
    b, s, hd = x.shape
    return x.reshape(b, s, n, hd // n).transpose(0, 2, 1, 3)


def _round_to(x, dtype, ct):
    """x rounded to a narrower float dtype and back to ct (an explicit Cast in the spec)."""
    if np.dtype(dtype).itemsize < np.dtype(ct).itemsize:
        return x.astype(dtype).astype(ct)
    return x


def _mask_bias(xp, attn_mask, q_len, kv_len, past_len, nonpad, is_causal, left, right, ct):
    """Additive bias (0 / -inf / float mask values) broadcastable to [B, H, Sq, Sk], or None.

    Causal and window bounds are bottom-right aligned: query i sits at absolute position
    i + offset, offset = past length (internal cache) or nonpad_kv_seqlen - Sq per batch
    (external cache)."""
    allowed = None
    fbias = None

    def both(a, b):
        return b if a is None else a & b

    if attn_mask is not None:
        pad = kv_len - attn_mask.shape[-1]
        is_bool = attn_mask.dtype == np.bool_
        if pad > 0:  # a short mask is padded with "not allowed"
            attn_mask = xp.pad(attn_mask, [(0, 0)] * (attn_mask.ndim - 1) + [(0, pad)],
                               constant_values=False if is_bool else -np.inf)
        if is_bool:
            allowed = attn_mask
        else:
            fbias = attn_mask.astype(ct)
    if is_causal or left >= 0 or right >= 0:
        i = xp.arange(q_len).reshape(q_len, 1)
        j = xp.arange(kv_len)
        if nonpad is not None and past_len == 0:
            pos = i + (nonpad.reshape(-1, 1, 1, 1) - q_len)  # [B, 1, Sq, 1]
        else:
            pos = i + past_len
        if is_causal:
            allowed = both(allowed, j <= pos)
        if left >= 0:
            allowed = both(allowed, pos - j <= left)
        if right >= 0:
            allowed = both(allowed, j - pos <= right)
    if nonpad is not None:
        allowed = both(allowed, xp.arange(kv_len) < nonpad.reshape(-1, 1, 1, 1))
    if allowed is None:
        return fbias
    zero = ct.type(0) if fbias is None else fbias
    return xp.where(allowed, zero, ct.type(-np.inf))


def _softmax_rows(xp, x, masked_rows, inplace: bool):
    """Softmax over the last axis (overwriting x if inplace); rows with no allowed key (masked
    by the bias alone, whatever the scores hold) give zeros, not NaN."""
    zero, one = x.dtype.type(0), x.dtype.type(1)
    m = max_of(xp, x, (-1,))
    m = xp.where(m == x.dtype.type(-np.inf), zero, m)
    if inplace:
        x -= m
        e = xp.exp(x, out=x)
    else:
        e = xp.exp(x - m)
    s = e.sum(axis=-1, keepdims=True)
    e /= xp.where(s == 0, one, s)
    if masked_rows is not None:
        e = xp.where(masked_rows, zero, e)
    return e


def _attention(xp, q, k, v, attn_mask, past_key, past_value, nonpad, *, is_causal,
               kv_num_heads, q_num_heads, qk_matmul_output_mode, scale, softcap,
               softmax_precision, left, right, n_outputs):
    if (past_key is None) != (past_value is None):
        raise ValueError("past_key and past_value must be given together")
    if nonpad is not None and past_key is not None:
        raise ValueError("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    three_d = q.ndim == 3
    if three_d:
        if not q_num_heads or not kv_num_heads:
            raise ValueError("3-D Q/K/V need the q_num_heads and kv_num_heads attributes")
        q = _split_heads(q, q_num_heads)
        k = _split_heads(k, kv_num_heads)
        v = _split_heads(v, kv_num_heads)
    if past_key is not None:
        past_len = past_key.shape[2]
        k = xp.concatenate([past_key, k], axis=2)
        v = xp.concatenate([past_value, v], axis=2)
    else:
        past_len = 0
    present_k, present_v = k, v
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[3]
    if hq % hkv:
        raise ValueError(f"q heads ({hq}) must be a multiple of kv heads ({hkv})")
    g = hq // hkv
    out_dtype = q.dtype
    ct = compute_dtype(q.dtype, k.dtype, v.dtype)
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    # [B, Hq, Sq, D] -> [B, Hkv, G*Sq, D]: query head h reads kv head h // G
    qg = (q.astype(ct, copy=False) * ct.type(scale)).reshape(b, hkv, g * sq, d)
    scores = matmul(xp, qg, k.astype(ct, copy=False).swapaxes(-1, -2)).reshape(b, hq, sq, sk)
    qk_out = scores
    if softcap and softcap > 0:
        scores = ct.type(softcap) * xp.tanh(scores / ct.type(softcap))
        if qk_matmul_output_mode in (1, 2):  # (2: with the mask too, where there is one)
            qk_out = scores
    bias = _mask_bias(xp, attn_mask, sq, sk, past_len, nonpad, is_causal, left, right, ct)
    keep = n_outputs > 3  # qk_matmul_output may be a view of scores: no in-place updates
    masked_rows = None
    if bias is not None:
        if keep:
            scores = scores + bias
        else:
            scores += bias
        masked_rows = bias.max(axis=-1, keepdims=True) == ct.type(-np.inf)
        if qk_matmul_output_mode == 2:
            qk_out = scores
    if softmax_precision is not None:
        sp = np.dtype(tensor_dtype_to_np_dtype(softmax_precision))
        scores = _round_to(scores, sp, ct).astype(compute_dtype(ct, sp), copy=False)
    probs = _softmax_rows(xp, scores, masked_rows, inplace=not keep)
    if qk_matmul_output_mode == 3:
        qk_out = probs
    probs = probs.astype(ct, copy=False).reshape(b, hkv, g * sq, sk)
    y = matmul(xp, probs, v.astype(ct, copy=False)).reshape(b, hq, sq, dv)
    if three_d:
        y = y.transpose(0, 2, 1, 3).reshape(b, sq, hq * dv)
    outs = (y.astype(out_dtype, copy=False), present_k, present_v)
    if n_outputs > 3:
        outs += (qk_out.astype(out_dtype),)
    return outs


@kernel("Attention", since=23)
def Attention_23(xp, q, k, v, attn_mask=None, past_key=None, past_value=None, *, is_causal=0,
                 kv_num_heads=None, q_num_heads=None, qk_matmul_output_mode=0, scale=None,
                 softcap=0.0, softmax_precision=None, n_outputs=1):
    return _attention(xp, q, k, v, attn_mask, past_key, past_value, None, is_causal=is_causal,
                      kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
                      qk_matmul_output_mode=qk_matmul_output_mode, scale=scale,
                      softcap=softcap, softmax_precision=softmax_precision, left=-1, right=-1,
                      n_outputs=n_outputs)


@kernel("Attention", since=24)
def Attention_24(xp, q, k, v, attn_mask=None, past_key=None, past_value=None,
                 nonpad_kv_seqlen=None, *, is_causal=0, kv_num_heads=None, q_num_heads=None,
                 qk_matmul_output_mode=0, scale=None, softcap=0.0, softmax_precision=None,
                 n_outputs=1):
    """Adds nonpad_kv_seqlen (external KV cache: per-batch valid length, causal offset)."""
    return _attention(xp, q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen,
                      is_causal=is_causal, kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
                      qk_matmul_output_mode=qk_matmul_output_mode, scale=scale,
                      softcap=softcap, softmax_precision=softmax_precision, left=-1, right=-1,
                      n_outputs=n_outputs)


@kernel("Attention", since=25)
def Attention_25(xp, q, k, v, attn_mask=None, past_key=None, past_value=None,
                 nonpad_kv_seqlen=None, *, is_causal=0, kv_num_heads=None, q_num_heads=None,
                 qk_matmul_output_mode=0, scale=None, softcap=0.0, softmax_precision=None,
                 left_window_size=-1, right_window_size=-1, n_outputs=1):
    """Adds sliding windows: query at position p sees keys p - left .. p + right."""
    if q.ndim == 4 and (q_num_heads is not None or kv_num_heads is not None):
        raise ValueError("q_num_heads/kv_num_heads must not be given for 4-D inputs")
    if left_window_size < -1 or right_window_size < -1:
        raise ValueError("window sizes must be -1 (unbounded) or nonnegative")
    return _attention(xp, q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen,
                      is_causal=is_causal, kv_num_heads=kv_num_heads, q_num_heads=q_num_heads,
                      qk_matmul_output_mode=qk_matmul_output_mode, scale=scale,
                      softcap=softcap, softmax_precision=softmax_precision,
                      left=left_window_size, right=right_window_size, n_outputs=n_outputs)


_RULES = ("linear", "gated", "delta", "gated_delta")


@kernel("LinearAttention", since=27)
def LinearAttention(xp, query, key, value, past_state=None, decay=None, beta=None, *,
                    q_num_heads, kv_num_heads, chunk_size=64, scale=0.0,
                    update_rule="gated_delta"):
    """The recurrence run step by step over time (batched over batch and heads), in float32.

    present_state has past_state's dtype, or query's when there is no past_state."""
    if update_rule not in _RULES:
        raise ValueError(f"update_rule must be one of {_RULES}, got {update_rule!r}")
    gated = update_rule in ("gated", "gated_delta")
    delta = update_rule in ("delta", "gated_delta")
    if gated != (decay is not None) or delta != (beta is not None):
        raise ValueError(f"update_rule {update_rule!r} needs decay={gated}, beta={delta}")
    if q_num_heads <= 0 or kv_num_heads <= 0 or q_num_heads % kv_num_heads:
        raise ValueError("q_num_heads must be a positive multiple of kv_num_heads")
    ct = compute_dtype(query.dtype)
    b, t, _ = query.shape
    hkv, g = kv_num_heads, q_num_heads // kv_num_heads
    dk = query.shape[-1] // q_num_heads
    dv = value.shape[-1] // kv_num_heads
    # [B, T, Hq*dk] -> [B, Hkv, G, T, dk]; query head h reads kv head h // G
    q = query.reshape(b, t, hkv, g, dk).transpose(0, 2, 3, 1, 4).astype(ct)
    k = _split_heads(key, hkv).astype(ct)  # [B, Hkv, T, dk]
    v = _split_heads(value, hkv).astype(ct)  # [B, Hkv, T, dv]
    if gated:  # [B, Hkv, T, dk or 1, 1]: broadcasts over the state's [dk, dv]
        w = decay.shape[-1] // hkv
        decay = xp.exp(_split_heads(decay.astype(ct), hkv))[..., None]
        if w not in (1, dk):
            raise ValueError(f"decay's last dim must be {hkv} or {hkv * dk}")
    if delta:  # [B, Hkv or 1, T, 1]
        beta = beta.astype(ct).transpose(0, 2, 1)[..., None]
    if past_state is not None:
        state = past_state.astype(ct)
    else:
        state = xp.zeros((b, hkv, dk, dv), dtype=ct)
    scale = scale if scale else 1.0 / math.sqrt(dk)
    outs = []
    for i in range(t):  # the recurrence's time steps
        kt, vt = k[:, :, i], v[:, :, i]
        if gated:
            state = state * decay[:, :, i]
        if delta:  # v_t <- beta_t (v_t - S^T k_t)
            vt = beta[:, :, i] * (vt - matmul(xp, kt[:, :, None, :], state)[:, :, 0])
        state = state + kt[..., :, None] * vt[..., None, :]
        outs.append(matmul(xp, q[:, :, :, i], state))  # [B, Hkv, G, dv]
    y = xp.stack(outs, axis=1) * ct.type(scale)  # [B, T, Hkv, G, dv]
    state_dtype = query.dtype if past_state is None else past_state.dtype
    return (y.reshape(b, t, q_num_heads * dv).astype(query.dtype),
            state.astype(state_dtype))


@kernel("RotaryEmbedding", since=23)
def RotaryEmbedding(xp, x, cos_cache, sin_cache, position_ids=None, *, interleaved=0,
                    num_heads=0, rotary_embedding_dim=0):
    ct = compute_dtype(x.dtype)
    if x.ndim == 4:
        xs = x.transpose(0, 2, 1, 3)  # [B, S, H, D]
    else:
        if not num_heads:
            raise ValueError("a 3-D input needs the num_heads attribute")
        b, s, hd = x.shape
        xs = x.reshape(b, s, num_heads, hd // num_heads)
    r = rotary_embedding_dim or xs.shape[-1]
    if position_ids is not None:  # [B, S, r/2] rows of the caches
        cos_cache = xp.take(cos_cache, position_ids, axis=0)
        sin_cache = xp.take(sin_cache, position_ids, axis=0)
    if cos_cache.shape[-1] != r // 2 or sin_cache.shape[-1] != r // 2:
        raise ValueError(f"cos/sin caches must have {r // 2} columns")
    cos = cos_cache.astype(ct)[:, :, None, :]
    sin = sin_cache.astype(ct)[:, :, None, :]
    xr = xs[..., :r].astype(ct)
    x1, x2 = (xr[..., 0::2], xr[..., 1::2]) if interleaved else (xr[..., :r // 2],
                                                                   xr[..., r // 2:])
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if interleaved:
        rot = xp.stack([real, imag], axis=-1).reshape(xr.shape)
    else:
        rot = xp.concatenate([real, imag], axis=-1)
    y = rot.astype(x.dtype)
    if r < xs.shape[-1]:
        y = xp.concatenate([y, xs[..., r:]], axis=-1)
    if x.ndim == 4:
        return (xp.ascontiguousarray(y.transpose(0, 2, 1, 3)),)
    return (y.reshape(x.shape),)
