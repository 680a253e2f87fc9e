"""Pillow's bicubic ``resize`` of a uint8 RGB crop, as numba kernels callable from FFCV's compiled decoder.

The recipe resizes the RandomResizedCrop with PIL bicubic (timm's ``RandomResizedCropAndInterpolation`` ->
``Image.resize(size, BICUBIC)`` on the cropped image). FFCV's own decoders resize with OpenCV's
``INTER_AREA``: a different filter, and at ImageNet crop sizes (300-500 px to 224) about 6x slower than a
separable bicubic. :func:`resize_crop_bicubic` is Pillow's ``ImagingResample`` for 8-bit images
(``Resample.c``): the same support-scaled (antialiased) cubic with a = -0.5, the same coefficient rounding to
22-bit fixed point, the horizontal pass into an intermediate image of only the rows the vertical pass reads,
clipping after each pass, and no pass when a dimension is unchanged. The bytes equal Pillow's
(``tests/test_data_ffcv.py`` checks crops of many shapes), so the FFCV path resamples like the folder path.
"""

from __future__ import annotations

import math

import numba
import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow: 8 bits for the pixel, 2 for overshoot headroom in an int32
_SUPPORT = 2.0  # bicubic


@numba.njit(cache=True, nogil=True)
def _bicubic(x):  # pragma: no cover (compiled)
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@numba.njit(cache=True, nogil=True)
def _coeffs(in_size, out_size):  # pragma: no cover (compiled)
    """Pillow's ``precompute_coeffs`` + ``normalize_coeffs_8bpc`` for the box (0, in_size): per output
    index, the first source index, the tap count, and the fixed-point weights."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    bounds = np.empty((out_size, 2), np.int64)
    kk = np.zeros((out_size, ksize), np.int64)
    weights = np.empty(ksize)
    ss = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size) - xmin
        ww = 0.0
        for x in range(xmax):
            w = _bicubic((x + xmin - center + 0.5) * ss)
            weights[x] = w
            ww += w
        for x in range(xmax):
            w = weights[x] / ww if ww != 0.0 else weights[x]
            kk[xx, x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)  # C casts truncate
        bounds[xx, 0] = xmin
        bounds[xx, 1] = xmax
    return bounds, kk


@numba.njit(cache=True, nogil=True)
def _clip8(v):  # pragma: no cover (compiled)
    if v >= (1 << PRECISION_BITS << 8):
        return 255
    if v <= 0:
        return 0
    return v >> PRECISION_BITS


@numba.njit(cache=True, nogil=True)
def resize_crop_bicubic(src, top, bottom, left, right, out):  # pragma: no cover (compiled)
    """``Image.fromarray(src[top:bottom, left:right]).resize((W, H), BICUBIC)`` into ``out`` (H, W, 3),
    byte for byte. ``src`` is (h, w, 3) uint8 (any row stride, contiguous pixels)."""
    in_h, in_w = bottom - top, right - left
    out_h, out_w = out.shape[0], out.shape[1]
    half = 1 << (PRECISION_BITS - 1)
    crop = src[top:bottom, left:right]
    if out_w != in_w:
        hb, hk = _coeffs(in_w, out_w)
        if out_h != in_h:
            vb, vk = _coeffs(in_h, out_h)
            first, last = vb[0, 0], vb[out_h - 1, 0] + vb[out_h - 1, 1]  # rows the vertical pass reads
        else:
            first, last = 0, in_h
        tmp = np.empty((last - first, out_w, 3), np.uint8)
        for y in range(last - first):
            row = crop[first + y]
            for xx in range(out_w):
                xmin = hb[xx, 0]
                s0 = s1 = s2 = half
                for x in range(hb[xx, 1]):
                    k = hk[xx, x]
                    s0 += np.int64(row[xmin + x, 0]) * k
                    s1 += np.int64(row[xmin + x, 1]) * k
                    s2 += np.int64(row[xmin + x, 2]) * k
                tmp[y, xx, 0] = _clip8(s0)
                tmp[y, xx, 1] = _clip8(s1)
                tmp[y, xx, 2] = _clip8(s2)
    else:
        first = 0
        tmp = crop
    if out_h == in_h:
        out[:] = tmp
        return out
    vb, vk = _coeffs(in_h, out_h)
    acc = np.empty((out_w, 3), np.int64)
    for yy in range(out_h):
        ymin = vb[yy, 0] - first
        acc[:] = half
        for y in range(vb[yy, 1]):
            k = vk[yy, y]
            row = tmp[ymin + y]
            for xx in range(out_w):
                for c in range(3):
                    acc[xx, c] += np.int64(row[xx, c]) * k
        orow = out[yy]
        for xx in range(out_w):
            for c in range(3):
                orow[xx, c] = _clip8(acc[xx, c])
    return out
