"""Packing a float32 matrix [K, N] for engine.cpu_kernels' matmul: 16-column panels in the
fewest bytes that hold exactly the same values (weight_formats.h reads them): GGUF's 4- and
8-bit blocks as q4 or q8 codes with a scale and offset, bfloat16 when lossless, else
float32."""

from __future__ import annotations

import ml_dtypes
import numpy as np

PANEL = 16  # output columns per panel; matmul.cc's kPanel
QUANT_BLOCK = 32  # rows per q4/q8 block; weight_formats.h's kQuantBlock


def pack(kernel: np.ndarray) -> np.ndarray:
    """[K, N] float32 → panels of 16 columns (zero-padded), in the fewest bytes that hold the
    same values: q4 or q8 blocks when every block of 32 rows is `scale * code + offset`
    (GGUF's Q4_0, Q4_1, Q8_0 after dequantization; q8 without offsets and with float16
    scales when those hold it, as Q8_0's do), else bfloat16 when lossless, else float32."""
    k, n = kernel.shape
    panels = -(-n // PANEL)
    padded = np.zeros((k, panels * PANEL), np.float32)
    padded[:, :n] = kernel
    blocks = exact_blocks(padded) if k % QUANT_BLOCK == 0 else None
    if blocks is not None:
        q4 = _as_q4(padded, *blocks)
        if q4 is not None:
            return _pack_q4(*q4, panels)
        scale, offset, codes = blocks
        if not offset.any() and np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
            return _pack_q8_symmetric(scale, codes, panels)
        return _pack_q8(*blocks, panels)
    out = np.ascontiguousarray(padded.reshape(k, panels, PANEL).transpose(1, 0, 2))
    as_bf16 = out.astype(ml_dtypes.bfloat16)
    return as_bf16 if np.array_equal(as_bf16.astype(np.float32), out) else out


def _per_panel_block(a: np.ndarray, panels: int) -> np.ndarray:
    """[K/32, r, panels * 16] → the bytes of each panel's blocks: [panels, K/32, r * 16 * size]."""
    blocks, rows = a.shape[:2]
    a = a.reshape(blocks, rows, panels, PANEL).transpose(2, 0, 1, 3)
    return np.ascontiguousarray(a).reshape(panels, blocks, -1).view(np.uint8)


def _pack_q8(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray, panels: int) -> np.ndarray:
    """Per panel and block: 16 float32 scales, 16 offsets, then int8 codes [32][16]:
    [panels, K/32, 640]."""
    side = _per_panel_block(np.stack([scale, offset], 1), panels)
    codes = _per_panel_block(codes.reshape(-1, QUANT_BLOCK, codes.shape[1]), panels)
    return np.concatenate([side, codes], axis=-1)


def _pack_q8_symmetric(scale: np.ndarray, codes: np.ndarray, panels: int) -> np.ndarray:
    """Per panel and block: 16 float16 scales, then int8 codes [32][16]: [panels, K/32, 544],
    GGUF's Q8_0 size."""
    side = _per_panel_block(scale[:, None].astype(np.float16), panels)
    codes = _per_panel_block(codes.reshape(-1, QUANT_BLOCK, codes.shape[1]), panels)
    return np.concatenate([side, codes], axis=-1)


def _pack_q4(scale: np.ndarray, offset: np.ndarray, codes: np.ndarray, panels: int) -> np.ndarray:
    """Per panel and block: 16 float16 scales, 16 offsets, then codes 0..15 as one 32-bit
    word per column and group of 8 rows, row r of the group in bits 4r .. 4r+3, the words of
    a group's 16 columns side by side: [panels, K/32, 320], GGUF's Q4_1 size. (Row r's code
    times 2^4r is its word masked, no shift: matmul.cc's one-row path.)"""
    side = _per_panel_block(np.stack([scale, offset], 1).astype(np.float16), panels)
    groups = codes.astype(np.uint32).reshape(-1, QUANT_BLOCK // 8, 8, codes.shape[1])
    words = np.zeros(groups.shape[:2] + groups.shape[3:], np.uint32)
    for r in range(8):
        words |= groups[:, :, r] << np.uint32(4 * r)
    return np.concatenate([side, _per_panel_block(words, panels)], axis=-1)


def _as_q4(
    w: np.ndarray, scale: np.ndarray, offset: np.ndarray, codes: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """The same blocks as codes 0..15 with float16 scales and offsets, when they fit and
    still give every weight exactly; else None."""
    k, n = codes.shape
    grouped = codes.reshape(k // QUANT_BLOCK, QUANT_BLOCK, n).astype(np.int64)
    span = grouped.max(axis=1) - grouped.min(axis=1)
    if span.max() > 15 or not np.array_equal(scale.astype(np.float16).astype(np.float32), scale):
        return None
    # scale * c + offset == (sign * scale) * (sign * c - low + t) + offset', where offset'
    # must be a float16: Q4_0's is -8 * its (signed) scale, not its block's smallest value.
    sign = np.zeros(span.shape, np.int64)
    start = np.zeros_like(sign)
    new_offset = np.zeros_like(offset)
    for s in (1, -1):
        low = (s * grouped).min(axis=1)
        for t in range(16):
            moved = offset + (low - t) * (s * scale.astype(np.float64))
            moved = moved.astype(np.float32)
            fits = moved.astype(np.float16).astype(np.float32) == moved
            ok = (sign == 0) & (span + t <= 15) & fits
            sign[ok], start[ok], new_offset[ok] = s, t - low[ok], moved[ok]
    if (sign == 0).any():
        return None
    shifted = sign[:, None] * grouped + start[:, None]
    scale = (sign * scale).astype(np.float32)
    rebuilt = scale[:, None].astype(np.float64) * shifted + new_offset[:, None]
    if not np.array_equal(rebuilt.astype(np.float32).reshape(k, n), w):
        return None
    return scale, new_offset, shifted.reshape(k, n)


def exact_blocks(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(scale, offset f32[K/32, N], codes i8[K, N]) with fma(scale, code, offset) == w for
    every weight, or None. Each block of 32 rows of a column tries the scales GGUF's
    quantizers use (its values' range over 15, or their largest magnitude over 127, 8 or 7;
    rounded to float16 as GGUF stores them, or not) and keeps the first that reproduces
    every value exactly."""
    k, n = w.shape
    blocks = w.reshape(k // QUANT_BLOCK, QUANT_BLOCK, n)
    v = blocks.astype(np.float64)
    lo, hi = v.min(axis=1), v.max(axis=1)
    amax = np.abs(v).max(axis=1)
    zero = np.zeros_like(lo)
    candidates = [(lo, (hi - lo) / 15)] + [(zero, amax / q) for q in (127, 8, 7)]
    scale, offset = np.zeros_like(lo), np.zeros_like(lo)
    codes = np.zeros(v.shape, np.int8)
    todo = np.ones(lo.shape, bool)
    for base, step in candidates:
        m = base.astype(np.float32).astype(np.float64)
        for d in (step.astype(np.float16), step.astype(np.float32)):
            d = np.where(d == 0, 1.0, d.astype(np.float32)).astype(np.float64)
            q = np.rint((v - m[:, None]) / d[:, None])
            fits = (q >= -128) & (q <= 127)
            exact = (d[:, None] * q + m[:, None]).astype(np.float32) == blocks
            ok = todo & np.all(fits & exact, axis=1)
            scale[ok], offset[ok] = d[ok], m[ok]
            codes.transpose(0, 2, 1)[ok] = q.transpose(0, 2, 1)[ok].astype(np.int8)
            todo &= ~ok
            if not todo.any():
                return scale.astype(np.float32), offset.astype(np.float32), codes.reshape(k, n)
    return None
