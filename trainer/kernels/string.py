"""String kernels (host-only: NumPy object arrays of str), TfIdfVectorizer (on `xp` for integer
input, host for strings) and ImageDecoder (host-only: Pillow, imported when the op runs; the
image is returned on `xp`)."""

from __future__ import annotations

import io
import re

import numpy as np

from trainer.backend import to_device, to_host
from trainer.kernels import kernel


def _strings(x) -> np.ndarray:
    """x as an object array of str (bytes are decoded as UTF-8)."""
    a = np.asarray(x, dtype=object)
    if any(isinstance(v, bytes) for v in a.flat):
        a = np.vectorize(lambda v: v.decode() if isinstance(v, bytes) else v,
                         otypes=[object])(a)
    return a


def _object_array(values: list, shape) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out.reshape(shape)


@kernel("StringConcat", since=20)
def StringConcat(xp, x, y):
    a, b = _strings(x), _strings(y)
    out = np.empty(np.broadcast_shapes(a.shape, b.shape), dtype=object)
    out[...] = a + b
    return (out,)


@kernel("StringSplit", since=20)
def StringSplit(xp, x, *, delimiter="", maxsplit=None):
    """Python's str.split: an empty or unset delimiter splits on runs of whitespace."""
    a = _strings(x)
    sep = delimiter or None
    parts = [s.split(sep, -1 if maxsplit is None else maxsplit) for s in a.flat]
    width = max((len(p) for p in parts), default=0)
    padded = [v for p in parts for v in p + [""] * (width - len(p))]
    counts = np.array([len(p) for p in parts], dtype=np.int64).reshape(a.shape)
    return (_object_array(padded, a.shape + (width,)), counts)


@kernel("StringNormalizer", since=10)
def StringNormalizer(xp, x, *, case_change_action="NONE", is_case_sensitive=0, locale="",
                     stopwords=None):
    """Drops stop words from a [C] or [1, C] tensor, then changes case (Python's Unicode
    lower/upper; `locale` is not consulted)."""
    a = _strings(x)
    if a.ndim == 2 and a.shape[0] != 1 or a.ndim not in (1, 2):
        raise ValueError(f"StringNormalizer takes a [C] or [1, C] tensor, got shape {a.shape}")
    words = list(a.flat)
    if stopwords:
        if is_case_sensitive:
            stops = set(stopwords)
            words = [w for w in words if w not in stops]
        else:
            stops = {w.lower() for w in stopwords}
            words = [w for w in words if w.lower() not in stops]
    if case_change_action == "LOWER":
        words = [w.lower() for w in words]
    elif case_change_action == "UPPER":
        words = [w.upper() for w in words]
    elif case_change_action != "NONE":
        raise ValueError(f"StringNormalizer: unknown case_change_action {case_change_action!r}")
    words = words or [""]
    shape = (len(words),) if a.ndim == 1 else (1, len(words))
    return (_object_array(words, shape),)


_RE2_ESCAPES = re.compile(r"\\(.)|\(\?<(?=[A-Za-z_])", re.DOTALL)


def _re2_to_python(pattern: str) -> str:
    r"""RE2 spellings that Python's `re` writes differently: `\z` (end of text) and
    `(?<name>...)` (named group)."""
    def sub(m: re.Match) -> str:
        if m.group(0).startswith("(?<"):
            return "(?P<"
        return r"\Z" if m.group(1) == "z" else m.group(0)
    return _RE2_ESCAPES.sub(sub, pattern)


@kernel("RegexFullMatch", since=20)
def RegexFullMatch(xp, x, *, pattern):
    r"""Full match with Python's `re` in ASCII mode, which matches RE2's \w, \d, \s and \b.

    Differences from RE2: Python also accepts backreferences and lookarounds (RE2 rejects
    them), lacks \pN classes and \C, and (?i) folds ASCII only."""
    rx = re.compile(_re2_to_python(pattern), re.ASCII)
    a = _strings(x)
    out = np.array([rx.fullmatch(s) is not None for s in a.flat], dtype=bool)
    return (out.reshape(a.shape),)


@kernel("TfIdfVectorizer", since=9)
def TfIdfVectorizer(xp, x, *, max_gram_length, max_skip_count, min_gram_length, mode,
                    ngram_counts, ngram_indexes, pool_int64s=None, pool_strings=None,
                    weights=None):
    """Counts of the pool's n-grams (items `skip + 1` apart, skip <= max_skip_count; 1-grams
    counted once) per row of x, weighted per `mode`, scattered to `ngram_indexes`."""
    strings = pool_strings is not None
    m = np if strings else xp
    rows = _strings(x) if strings else x
    rows = rows[None] if rows.ndim == 1 else rows
    if rows.ndim != 2:
        raise ValueError(f"TfIdfVectorizer takes a [C] or [N, C] tensor, got shape {x.shape}")
    pool = (np.array(pool_strings, dtype=object) if strings
            else np.asarray(pool_int64s, dtype=np.int64))
    bounds = list(ngram_counts) + [len(pool)]
    # The pool holds the 1-grams, then the 2-grams...: level n starts at element bounds[n - 1]
    # and at gram first[n - 1]; grams are numbered across levels like ngram_indexes.
    first = [0]
    for n in range(1, len(ngram_counts) + 1):
        first.append(first[-1] + (bounds[n] - bounds[n - 1]) // n)
    n_rows, width = rows.shape
    counts = m.zeros((n_rows, first[-1]), dtype=np.float32)
    for n in range(max(min_gram_length, 1), min(max_gram_length, len(ngram_counts)) + 1):
        if first[n] <= first[n - 1]:
            continue
        grams = pool[bounds[n - 1]:bounds[n]].reshape(-1, n)
        grams = grams if strings else m.asarray(grams)
        for skip in range(max_skip_count + 1 if n > 1 else 1):
            span = (n - 1) * (skip + 1) + 1
            if span > width:
                break
            cols = np.arange(width - span + 1)[:, None] + np.arange(n)[None, :] * (skip + 1)
            windows = rows[:, m.asarray(cols)]                      # [rows, positions, n]
            hits = (windows[:, :, None, :] == grams[None, None, :, :]).all(axis=-1)
            counts[:, first[n - 1]:first[n]] += hits.sum(axis=1).astype(np.float32)
    w = m.ones(first[-1], dtype=np.float32) if weights is None else m.asarray(
        np.asarray(weights, dtype=np.float32))
    if mode == "IDF":
        counts = (counts > 0).astype(np.float32) * w
    elif mode == "TFIDF":
        counts = counts * w
    elif mode != "TF":
        raise ValueError(f"TfIdfVectorizer: unknown mode {mode!r}")
    size = max(ngram_indexes) + 1 if len(ngram_indexes) else 0
    scatter = np.zeros((first[-1], size), dtype=np.float32)
    scatter[np.arange(len(ngram_indexes)), np.asarray(ngram_indexes)] = 1.0
    out = counts @ m.asarray(scatter)
    out = out[0] if x.ndim == 1 else out
    return (to_device(xp, out),)


@kernel("ImageDecoder", since=20)
def ImageDecoder(xp, encoded_stream, *, pixel_format="RGB"):
    """[H, W, C] uint8 image (C = 3, or 1 for Grayscale) decoded by Pillow on the host; an
    undecodable stream gives an empty [0, 0, C] image."""
    import PIL.Image

    channels = {"RGB": 3, "BGR": 3, "Grayscale": 1}.get(pixel_format)
    if channels is None:
        raise ValueError(f"ImageDecoder: unknown pixel_format {pixel_format!r}")
    data = to_host(encoded_stream).astype(np.uint8, copy=False).tobytes()
    try:
        with PIL.Image.open(io.BytesIO(data)) as img:
            img = img.convert("L" if channels == 1 else "RGB")
            out = np.asarray(img, dtype=np.uint8).reshape(img.height, img.width, channels)
    except (OSError, ValueError, SyntaxError):
        out = np.zeros((0, 0, channels), dtype=np.uint8)
    if pixel_format == "BGR":
        out = np.ascontiguousarray(out[:, :, ::-1])
    return (to_device(xp, out),)
