"""Lookup-table GEMV/GEMM for 1-4-bit group-quantized weights on the CPU (T-MAC, arXiv
2407.00088; SAIL's batched reuse of the index stream).

The kernel is C++ (`cpu/lut_gemm.cpp`, AVX-512BW / AVX2 / scalar, dispatched at run time),
reached through ctypes (`cpu_lib.py` builds or finds the library). `lut_gemm_ref` is the same
computation in PyTorch (tables quantized to int8 the same way, float64 accumulation), and
`pack_lut` / `unpack_lut` define the layout (`unpack_lut_rows`: some rows, an embedding's lookup).

Weights: w[n, k] = scale[n, g] * q[n, k] + min[n, g] with q in [0, 2^bits), g = k // group.
"""
from __future__ import annotations


import torch

from bitfold.kernels.cpu_lib import ISAS, available, load_cpu_library  # noqa: F401 (available: re-exported)

TILE = 64  # output rows per kernel tile


# ---- layout ------------------------------------------------------------------------------------

def group_bytes(bits: int, group: int) -> int:
    """Packed bytes of one (tile of 64 rows, group): 64 * group * bits / 8."""
    return 8 * group * bits


def pack_lut(q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, bits: int, group: int):
    """Repack codes into the kernel's layout (described in cpu/lut_gemm.cpp).

    q: uint8 [N, K] codes in [0, 2^bits); scales, mins: [N, K // group] (any float dtype);
    K a multiple of `group`, group a multiple of 8. Returns (packed uint8 [tiles, groups,
    8 * group * bits], scales fp16 [tiles, groups, 64], mins fp16 same), rows padded to a
    multiple of 64 with zeros.
    """
    N, K = q.shape
    _check_shape(N, K, bits, group)
    tiles, groups, cpg = -(-N // TILE), K // group, group // 4
    pad = tiles * TILE - N
    qp = torch.nn.functional.pad(q.to(torch.uint8), (0, 0, 0, pad)).contiguous()
    # 4 codes as one little-endian int32: bit p of code j is bit 8j + p; the multiply gathers bits
    # 0, 8, 16, 24 into bits 24..27 (the other partial products land on distinct bits below 24 or
    # wrap beyond 32, so nothing carries in; the arithmetic shift's sign bits are masked off):
    # a few int32 passes per plane instead of a uint8 reduction over the last dimension (~20x).
    words = qp.view(torch.int32)  # [rows, K / 4]
    byte = []  # per plane: uint8 [tiles, 32, groups, cpg]; row i in the low nibble, row 32+i high
    for p in range(bits):
        nib = ((((words >> p) & 0x01010101) * 0x01020408) >> 24) & 15
        nib = nib.to(torch.uint8).view(tiles, 2, 32, groups, cpg)
        byte.append(nib[:, 0] | (nib[:, 1] << 4))
    streams = []
    for m in range(bits // 2):  # plane pairs: byte 2i+e = plane 2m+e, one block per chunk
        pair = torch.stack([byte[2 * m], byte[2 * m + 1]], dim=-1)  # [tiles, 32, groups, cpg, 2]
        streams.append(pair.permute(0, 2, 3, 1, 4).reshape(tiles, groups, cpg * 64))
    if bits & 1:  # the odd plane: byte 2i+e = chunk c+e, one block per chunk pair
        single = byte[bits - 1].view(tiles, 32, groups, cpg // 2, 2)
        streams.append(single.permute(0, 2, 3, 1, 4).reshape(tiles, groups, cpg * 32))
    packed = torch.cat(streams, dim=-1).contiguous()

    def meta(t: torch.Tensor) -> torch.Tensor:
        t = torch.nn.functional.pad(t.to(torch.float16), (0, 0, 0, pad)).view(tiles, TILE, groups)
        return t.permute(0, 2, 1).contiguous()  # [tiles, groups, 64]

    return packed, meta(scales), meta(mins)


def unpack_lut(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, n: int, bits: int, group: int):
    """Inverse of `pack_lut`: (q uint8 [n, K], scales fp16 [n, K // group], mins fp16 [n, K // group])."""
    return unpack_lut_rows(packed, scales, mins, torch.arange(n, device=packed.device), bits, group)


def unpack_lut_rows(packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, ids: torch.Tensor, bits: int,
                    group: int):
    """Rows `ids` (int64 [T], any order, repeats allowed) of `pack_lut`'s layout: (q uint8 [T, K],
    scales fp16 [T, K // group], mins fp16 [T, K // group]); `unpack_lut` is all rows.

    Row r sits in tile r // 64 at lane r % 32, in the low nibbles for r % 64 < 32 and the high ones
    otherwise. Every stream is made of 64-byte blocks [lane, 2]: plane pair m holds block (m, c)
    for chunk c (byte e: plane 2m + e), the odd plane block c // 2 (byte e: chunk 2 (c // 2) + e).
    Picking one lane of every block reads 2 bytes per row per block (T rows: T / 32 of a tile's
    bytes), so an embedding lookup touches only its own rows' codes.
    """
    tiles, groups, _ = packed.shape
    cpg, pairs = group // 4, bits // 2
    ids = ids.to(torch.int64)
    t, r = ids // TILE, ids % TILE
    # [tiles, lanes, groups, blocks, 2]: tile and lane adjacent, so the gather is one indexing op
    blocks = packed.view(tiles, groups, -1, 32, 2).permute(0, 3, 1, 2, 4)[t, r % 32]  # [T, groups, blocks, 2]
    T = ids.shape[0]
    planes = []  # per plane: uint8 [T, groups, cpg], both rows' nibbles (bit j: bit p of code 4c + j)
    if pairs:
        paired = blocks[:, :, : pairs * cpg].reshape(T, groups, pairs, cpg, 2)
        planes += [paired[:, :, m, :, e] for m in range(pairs) for e in range(2)]
    if bits & 1:
        planes.append(blocks[:, :, pairs * cpg :].reshape(T, groups, cpg))
    shift = (4 * (r // 32)).to(torch.uint8).view(T, 1, 1)  # the high nibble for rows 32..63 of a tile
    j = torch.arange(4, dtype=torch.uint8, device=packed.device)
    q = torch.zeros(T, groups, cpg, 4, dtype=torch.uint8, device=packed.device)
    for p, byte in enumerate(planes):
        q |= (((byte >> shift) & 15)[..., None] >> j & 1) << p
    return q.view(T, groups * group), scales[t, :, r], mins[t, :, r]


def _check_shape(N: int, K: int, bits: int, group: int) -> None:
    if not 1 <= bits <= 4:
        raise ValueError(f"bits must be 1..4, got {bits}")
    if group < 8 or group % 8:
        raise ValueError(f"group must be a positive multiple of 8, got {group}")
    if K % group:
        raise ValueError(f"in_features {K} is not a multiple of the group size {group}")
    if N < 1:
        raise ValueError(f"out_features must be >= 1, got {N}")


# ---- reference ---------------------------------------------------------------------------------

_MASKS = torch.tensor([[(i >> j) & 1 for j in range(4)] for i in range(16)], dtype=torch.float32)  # [16, 4]


def build_tables_ref(x: torch.Tensor, group: int):
    """x: float32 [B, K] -> (tables int8-valued float32 [B, K/4, 16], lscale [B, K/group],
    sumx [B, K/group]). Subset sums add x[4c+j] in ascending j exactly as the kernel does."""
    B, K = x.shape
    x4 = x.view(B, K // 4, 1, 4)
    t = torch.zeros(B, K // 4, 16)
    for j in range(4):
        t = t + _MASKS[:, j] * x4[..., j]
    groups = K // group
    amax = t.view(B, groups, -1).abs().amax(-1)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    tq = (t.view(B, groups, -1) * inv[..., None]).round().view(B, K // 4, 16)
    return tq, amax / 127.0, x.view(B, groups, group).sum(-1)


def lut_gemm_ref(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                 n: int, bits: int, group: int) -> torch.Tensor:
    """Same signature and math as `lut_gemm`: x [B, K] -> y float32 [B, n]."""
    x = x.float()
    B, K = x.shape
    q, s, m = unpack_lut(packed, scales, mins, n, bits, group)
    tq, ls, sx = build_tables_ref(x, group)
    groups, cpg = K // group, group // 4
    acc = torch.zeros(B, n, groups, dtype=torch.float64)
    for p in range(bits):
        plane = ((q >> p) & 1).view(n, K // 4, 4).to(torch.int64)
        idx = (plane << torch.arange(4)).sum(-1)  # [n, K/4]
        vals = tq[:, torch.arange(K // 4)[None, :], idx]  # [B, n, K/4]
        acc += (2 ** p) * vals.double().view(B, n, groups, cpg).sum(-1)
    y = (s.double()[None] * ls.double()[:, None] * acc).sum(-1) + (m.double()[None] * sx.double()[:, None]).sum(-1)
    return y.float()


def dequantize_ref(packed, scales, mins, n: int, bits: int, group: int) -> torch.Tensor:
    """The float32 weight [n, K] the packed tensors represent."""
    q, s, m = unpack_lut(packed, scales, mins, n, bits, group)
    K = q.shape[1]
    w = q.float().view(n, K // group, group) * s.float()[..., None] + m.float()[..., None]
    return w.view(n, K)


# ---- the compiled kernel -----------------------------------------------------------------------

def best_isa() -> str:
    """The instruction set the kernel uses on this CPU: 'avx512', 'avx2' or 'scalar'."""
    code = load_cpu_library().bitfold_lut_isa()
    return {v: k for k, v in ISAS.items()}[code]


def lut_gemm(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
             n: int, bits: int, group: int, *, num_threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """x: float32 [B, K] (contiguous, CPU) -> y float32 [B, n] = x @ W^T for the packed W.

    packed/scales/mins come from `pack_lut`. isa forces 'avx512' / 'avx2' / 'scalar' (tests);
    default the best this CPU has. num_threads defaults to torch.get_num_threads().
    """
    lib = load_cpu_library()
    x = x.float().contiguous()
    B, K = x.shape
    if packed.dim() != 3:
        raise ValueError(f"packed weight must be [tiles, groups, bytes] (pack_lut), got {tuple(packed.shape)}")
    tiles, groups, width = packed.shape
    if groups * group != K or width != group_bytes(bits, group) or tiles * TILE < n or scales.shape != (tiles, groups, TILE):
        raise ValueError(f"packed weight of shape {tuple(packed.shape)} does not match x [{B}, {K}], "
                         f"n={n}, bits={bits}, group={group}")
    if packed.dtype != torch.uint8 or scales.dtype != torch.float16 or mins.dtype != torch.float16:
        raise ValueError("packed must be uint8 and scales/mins float16 (use pack_lut)")
    if not (packed.is_contiguous() and scales.is_contiguous() and mins.is_contiguous()):
        raise ValueError("packed, scales and mins must be contiguous")
    y = torch.empty(B, n, dtype=torch.float32)
    if B == 0:
        return y
    rc = lib.bitfold_lut_gemm(x.data_ptr(), B, K, packed.data_ptr(), scales.data_ptr(), mins.data_ptr(), n, bits, group,
                              y.data_ptr(), num_threads or torch.get_num_threads(), -1 if isa is None else ISAS[isa])
    if rc != 0:
        raise ValueError(f"bitfold_lut_gemm rejected B={B} K={K} n={n} bits={bits} group={group}")
    return y


# ---- 8-bit codes without tables -----------------------------------------------------------------

def _check_q8(B: int, K: int, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> None:
    n = q.shape[0] if q.dim() == 2 else -1
    if q.dim() != 2 or q.shape[1] != K or q.dtype != torch.uint8:
        raise ValueError(f"codes must be uint8 [n, K={K}], got {q.dtype} {tuple(q.shape)}")
    if group < 8 or group % 8 or K % group:
        raise ValueError(f"group must be a multiple of 8 dividing K={K}, got {group}")
    for name, t in (("scales", scales), ("mins", mins)):
        if t.shape != (n, K // group) or t.dtype != torch.float16:
            raise ValueError(f"{name} must be float16 [n={n}, K/group={K // group}], got {t.dtype} {tuple(t.shape)}")


def q8_gemm_ref(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int) -> torch.Tensor:
    """Pure-PyTorch `q8_gemm` (float32 weights dequantized from the codes, float32 matmul)."""
    B, K = x.shape
    _check_q8(B, K, q, scales, mins, group)
    n = q.shape[0]
    w = q.float().view(n, K // group, group) * scales.float()[..., None] + mins.float()[..., None]
    return x.float() @ w.view(n, K).t()


def q8_gemm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, group: int, *,
            num_threads: int | None = None, isa: str | None = None) -> torch.Tensor:
    """x: float32 [B, K] -> y float32 [B, n] = x @ W^T for W[n, k] = scales[n, k // group] *
    q[n, k] + mins[n, k // group] (q uint8 [n, K], scales / mins float16): the C++ kernel
    `bitfold_q8_gemm`, every code times its float activation (no int8 tables: 8-bit weights'
    rounding is smaller than the LUT kernel's table error). isa 'avx2' / 'scalar' forces a path."""
    lib = load_cpu_library()
    x = x.float().contiguous()
    B, K = x.shape
    _check_q8(B, K, q, scales, mins, group)
    if not (q.is_contiguous() and scales.is_contiguous() and mins.is_contiguous()):
        raise ValueError("codes, scales and mins must be contiguous")
    n = q.shape[0]
    y = torch.empty(B, n, dtype=torch.float32)
    if B == 0 or n == 0:
        return y
    rc = lib.bitfold_q8_gemm(x.data_ptr(), B, K, q.data_ptr(), scales.data_ptr(), mins.data_ptr(), n, group,
                             y.data_ptr(), num_threads or torch.get_num_threads(), -1 if isa is None else ISAS[isa])
    if rc != 0:
        raise ValueError(f"bitfold_q8_gemm rejected B={B} K={K} n={n} group={group}")
    return y


# ---- GGUF Q6_K blocks without tables -------------------------------------------------------------

Q6K_BLOCK, Q6K_BYTES = 256, 210  # weights and bytes per block: ql[128] qh[64] scales[16] int8, d fp16


def _check_q6k(K: int, blocks: torch.Tensor) -> int:
    """The rows n of Q6_K blocks uint8 [n, K / 256 * 210] for K inputs (ValueError otherwise)."""
    if K % Q6K_BLOCK:
        raise ValueError(f"Q6_K needs in_features a multiple of {Q6K_BLOCK}, got {K}")
    want = K // Q6K_BLOCK * Q6K_BYTES
    if blocks.dim() != 2 or blocks.shape[1] != want or blocks.dtype != torch.uint8:
        raise ValueError(f"Q6_K blocks must be uint8 [n, {want}] for K={K}, got {blocks.dtype} {tuple(blocks.shape)}")
    return blocks.shape[0]


def q6k_dequantize_ref(blocks: torch.Tensor, K: int) -> torch.Tensor:
    """Q6_K blocks uint8 [n, K / 256 * 210] -> float32 [n, K]: w = (d * scale) * (q - 32) per 16
    weights, in the gguf package's float32 order (the layout is described in cpu/lut_gemm.cpp)."""
    n = _check_q6k(K, blocks)
    b = blocks.reshape(-1, Q6K_BYTES)
    nb = b.shape[0]
    sh4 = torch.tensor([0, 4], dtype=torch.uint8)
    sh2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    ql = ((b[:, :128].reshape(nb, 2, 1, 64) >> sh4[:, None]) & 15).reshape(nb, 256)  # [half, nibble, 64]
    qh = ((b[:, 128:192].reshape(nb, 2, 1, 32) >> sh2[:, None]) & 3).reshape(nb, 256)  # [half, shift, 32]
    sc = b[:, 192:208].contiguous().view(torch.int8).float()
    d = b[:, 208:210].contiguous().view(torch.float16).float()
    q = (ql | (qh << 4)).float() - 32
    return ((d * sc)[..., None] * q.view(nb, 16, 16)).reshape(n, K)


def q6k_gemm_ref(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch `q6k_gemm`: x float32 [B, K] -> [B, n] through the dequantized weight."""
    return x.float() @ q6k_dequantize_ref(blocks, x.shape[1]).t()


def q6k_gemm(x: torch.Tensor, blocks: torch.Tensor, *, num_threads: int | None = None,
             isa: str | None = None) -> torch.Tensor:
    """x: float32 [B, K] -> y float32 [B, n] = x @ W^T for W stored as GGUF Q6_K blocks (uint8
    [n, K / 256 * 210], the file's bytes): the C++ kernel `bitfold_q6k_gemm`, every weight
    decoded and multiplied by its float activation (no tables). isa 'avx2' / 'scalar' forces a path."""
    lib = load_cpu_library()
    x = x.float().contiguous()
    B, K = x.shape
    n = _check_q6k(K, blocks)
    if not blocks.is_contiguous():
        raise ValueError("Q6_K blocks must be contiguous")
    y = torch.empty(B, n, dtype=torch.float32)
    if B == 0 or n == 0:
        return y
    rc = lib.bitfold_q6k_gemm(x.data_ptr(), B, K, blocks.data_ptr(), n, y.data_ptr(),
                              num_threads or torch.get_num_threads(), -1 if isa is None else ISAS[isa])
    if rc != 0:
        raise ValueError(f"bitfold_q6k_gemm rejected B={B} K={K} n={n}")
    return y
