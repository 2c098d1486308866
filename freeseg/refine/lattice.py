"""The permutohedral lattice: fast Gaussian filtering in a d-dimensional feature space.

The dense CRF's bilateral (5-D) Gaussian uses a permutohedral lattice (Adams,
Baek & Davis 2010), the same algorithm as pydensecrf's ``permutohedral.cpp``
(same float32 feature scaling and simplex rounding, so the same vertices and
weights; same ``[1/2, 1, 1/2]`` blur and neighbour rule), vectorised in torch
with sorted integer codes instead of a hash table and sparse matrices for
splatting and slicing. Its size is bounded by ``H*W*6`` vertices whatever
``srgb``/``sxy`` are, so no colour-bin clamp is needed (a bilateral grid
would need one); small ``srgb``/``sxy`` only cost time (more distinct
vertices, e.g. about 5x slower at ``bilateral_srgb=1`` than at 20). Like
pydensecrf's, the lattice only approximates the Gaussian (about 0.97
correlation with the exact 5-D kernel).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch

__all__ = ["PermutohedralLattice"]


class PermutohedralLattice:
    """Gaussian filtering in a d-dimensional feature space (Adams, Baek & Davis 2010).

    Built once from features ``[N,d]`` (already divided by the standard
    deviations). ``apply`` maps ``[N,C]`` float32 values to
    ``out_i ~ sum_j exp(-|f_i - f_j|^2 / 2) v_j`` up to a constant factor
    (irrelevant after the CRF's normalisation): splat each pixel onto the
    d+1 vertices of its enclosing simplex with barycentric weights, blur with
    ``[1/2, 1, 1/2]`` along each of the d+1 lattice directions, slice back
    with the same weights. This is the algorithm of pydensecrf's
    ``permutohedral.cpp`` (same float32 elevation and simplex rounding, same
    vertices, weights, blur and neighbour rule; tests/unit/test_refine_lattice.py
    checks it against a plain re-implementation), vectorised: sorted integer
    codes instead of a hash table, and splat and slice as two sparse (CSR)
    matrices built once, ``[M,N]`` and ``[N,M]`` with d+1 entries per pixel,
    so every filter call is two sparse products and the blur's gathers. CSR
    products need the CPU or CUDA (``masks._crf_device``). Memory: ``O(N (d+1))``,
    at most ``N (d+1)`` vertices, whatever the feature scales.

    Keys: vertex ``r`` of a pixel's simplex has every coordinate ``= r (mod
    d+1)`` (its "class"), so a vertex is (class r, ``z``) with coordinate
    ``i = r + (d+1) z_i``, and every class holds exactly one vertex of every
    pixel. The build therefore sorts d+1 arrays of N codes of ``z`` alone
    (int32 at the defaults) rather than one array of ``N (d+1)`` full keys;
    vertices are numbered class by class (so a pixel's d+1 slice columns come
    in increasing order), and a vertex's blur neighbours lie in the previous
    class at a constant code offset (``_class_neighbour``), found for a whole
    class at once by one merge of two sorted arrays (``_lookup``).
    """

    def __init__(self, features_nd: torch.Tensor):
        feats = features_nd.to(torch.float32)
        n, d = feats.shape
        d1 = d + 1
        dev = feats.device
        self.n, self.d = n, d
        elevated = _elevate(feats)                                       # [d+1,N]
        rem0, rank, bary = _simplex_vertices(elevated)
        del elevated
        z0 = torch.div(rem0[:d], d1, rounding_mode="floor")               # [d,N]; rem0 is a multiple of d+1
        above = d - rank[:d]                                             # vertex r has z = z0 - [above < r]
        del rem0, rank
        radix = _class_radix(z0)
        keys = None
        if radix is not None:      # every vertex and blur neighbour fits one mixed-radix code
            codes = _class_codes(z0, above, radix)                       # [d+1,N]
        else:                      # huge coordinate ranges (tiny srgb/sxy): rank-compressed keys
            keys = _LatticeKeys([torch.cat([_class_z(z0, above, r)[i] for r in range(d1)]) for i in range(d)])
            codes = keys.codes.view(d1, n)
        # vertices class by class, in code order; every class has one vertex of every pixel
        col = torch.empty((d1, n), dtype=torch.int32, device=dev)       # splat: pixels by vertex
        splat_values = torch.empty((d1, n), dtype=torch.float32, device=dev)
        inverse = torch.empty((n, d1), dtype=torch.int32, device=dev)   # slice: vertex of each pixel
        uniq, rep_z, crow, offsets = [], [], [], [0]
        for r in range(d1):
            sorted_codes, order = torch.sort(codes[r], stable=True)
            first = torch.ones(n, dtype=torch.bool, device=dev)
            torch.ne(sorted_codes[1:], sorted_codes[:-1], out=first[1:])
            vertex = torch.cumsum(first, dim=0, dtype=torch.int32).sub_(1)   # of each sorted pixel
            size = int(vertex[-1]) + 1
            inverse[:, r].scatter_(0, order, vertex + offsets[r])
            uniq.append(torch.empty(size, dtype=codes.dtype, device=dev).scatter_(  # a vertex's pixels
                0, vertex.long(), sorted_codes))                                   # write one code
            if keys is not None:  # every pixel of a vertex writes the same z
                z = _class_z(z0, above, r)[:, order]
                rep_z.append(torch.empty((d, size), dtype=z.dtype, device=dev).scatter_(
                    1, vertex.long().expand(d, n), z).t())
            else:
                rep_z.append(None)
            counts = torch.bincount(vertex, minlength=size)
            crow.append(torch.cumsum(counts, dim=0).sub_(counts).add_(r * n))  # row starts
            col[r].copy_(order)
            torch.index_select(bary[r], 0, order, out=splat_values[r])
            offsets.append(offsets[r] + size)
        del codes
        self.m = m = offsets[d1]
        # first neighbours along every direction, one class at a time (one lookup per class)
        first = torch.empty((d1, m + 1), dtype=torch.int32, device=dev)
        first[:, m] = m
        miss = torch.tensor(m, dtype=torch.int32, device=dev)           # a tensor, for where(out=)
        for r in range(d1):
            t = (r - 1) % d1
            codes_r = torch.cat([_class_neighbour(uniq[r], r, j, radix, keys, rep_z[r]) for j in range(d1)])
            found = _lookup(uniq[t], codes_r).view(d1, -1)
            torch.where(found >= 0, found + offsets[t], miss, out=first[:, offsets[r]:offsets[r + 1]])
        own = torch.arange(m, dtype=torch.int32, device=dev)
        self.neighbours = []
        for first_j in first:
            second_j = torch.full((m + 1,), m, dtype=torch.int32, device=dev)
            second_j.scatter_(0, first_j[:m].long(), torch.where(first_j[:m] < m, own, m))  # misses: row M
            self.neighbours.append((first_j, second_j))
        crow.append(torch.full((2,), n * d1, dtype=torch.long, device=dev))       # row M (dummy) is empty
        self.splat = _csr(torch.cat(crow), col.view(-1), splat_values.view(-1), (m + 1, n))
        pixel_crow = torch.arange(0, n * d1 + 1, d1, dtype=torch.int32, device=dev)
        # a pixel's vertices come class by class, so its slice columns are in increasing order
        self.slice = _csr(pixel_crow, inverse.view(-1), bary.t().reshape(-1), (n, m + 1))
        self._scratch: Dict[int, Tuple[torch.Tensor, ...]] = {}

    def apply(self, values_nc: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Filter ``[N,C]`` float32 values into ``out`` (``[N,C]`` float32, allocated if None).

        Four channels at a time (``_filter_narrow``).
        """
        n, c = values_nc.shape
        if out is None:
            out = torch.empty((n, c), dtype=torch.float32, device=values_nc.device)
        for lo in range(0, c, 4):
            self._filter_narrow(values_nc[:, lo:lo + 4], out[:, lo:lo + 4])
        return out

    def _filter_narrow(self, values: torch.Tensor, out: torch.Tensor) -> None:
        """Filter ``[N,k]`` values (k <= 4) into ``out`` ``[N,k]``.

        The blur gathers whole lattice rows, and torch gathers a 1-D tensor far
        faster (about 3x) than the rows of a 2-D one, so each lattice row is
        viewed as one number: float32 for k = 1, complex64 for k = 2,
        complex128 for k = 4 (k = 3 is padded to 4). The lattice keeps its
        scratch buffers between calls (fresh multi-MiB tensors cost page faults).
        """
        k = values.shape[1]
        width = 4 if k == 3 else k
        src, lattice, both, gathered, result = self._buffers(width, values.device)
        if width != k or not values.is_contiguous():
            src[:, :k].copy_(values)
            values = src
        torch.addmm(lattice, self.splat, values, beta=0.0, out=lattice)  # [M+1,width]; row M is 0
        wide = _as_row_numbers(lattice)
        both_f = _as_float_rows(both, lattice.shape)
        gathered_f = _as_float_rows(gathered, lattice.shape)
        for n1, n2 in self.neighbours:
            torch.index_select(wide, 0, n1, out=both)
            torch.index_select(wide, 0, n2, out=gathered)
            both_f.add_(gathered_f)
            lattice.add_(both_f, alpha=0.5)                                 # row M stays 0
        if width == k and out.is_contiguous():
            torch.addmm(out, self.slice, lattice, beta=0.0, out=out)
        else:
            torch.addmm(result, self.slice, lattice, beta=0.0, out=result)
            out.copy_(result[:, :k])

    def _buffers(self, width: int, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """Zeroed scratch for ``width`` channels: input ``[N,w]``, lattice ``[M+1,w]``, two gather
        targets ``[M+1]`` (``_as_row_numbers``) and output ``[N,w]``; made once per width."""
        if width not in self._scratch:
            lattice = torch.zeros((self.m + 1, width), dtype=torch.float32, device=device)
            self._scratch[width] = (
                torch.zeros((self.n, width), dtype=torch.float32, device=device), lattice,
                torch.zeros_like(_as_row_numbers(lattice)), torch.zeros_like(_as_row_numbers(lattice)),
                torch.zeros((self.n, width), dtype=torch.float32, device=device))
        return self._scratch[width]


_ROW_NUMBER = {1: torch.float32, 2: torch.complex64, 4: torch.complex128}


def _as_row_numbers(x: torch.Tensor) -> torch.Tensor:
    """Contiguous float32 ``[R,C]`` (C = 1, 2 or 4) viewed as ``[R]`` numbers of C float32 each."""
    return x.view(_ROW_NUMBER[x.shape[1]]).view(-1)


def _as_float_rows(x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The float32 ``[R,C]`` view (``shape``) of ``_as_row_numbers``'s result."""
    return x.view(torch.float32).view(shape)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A float32 sparse CSR matrix with int32 indices (less memory traffic than int64; sizes here
    stay far below 2^31 entries). torch marks CSR as beta; its warning is silenced here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        return torch.sparse_csr_tensor(crow.to(torch.int32), col.to(torch.int32), values, size=size,
                                       dtype=torch.float32)


def _elevate(features_nd: torch.Tensor) -> torch.Tensor:
    """Features ``[N,d]`` float32 -> ``[d+1,N]`` float32 points on the lattice's plane ``sum = 0``.

    pydensecrf's elevation, step for step in float32 (``permutohedral.cpp``):
    ``cf_j = f_j * scale_j`` with ``scale_j = sqrt(2/3) (d+1) / sqrt((j+1)(j+2))``
    (the lattice blur then approximates a Gaussian of roughly unit standard
    deviation in feature space), ``e_j = s_j - j cf_{j-1}`` with ``s_j`` the
    sum of ``cf`` above ``j-1``, and ``e_0 = s_0``, the sum of all.
    """
    n, d = features_nd.shape
    inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
    elevated = torch.empty((d + 1, n), dtype=torch.float32, device=features_nd.device)
    total = torch.zeros(n, dtype=torch.float32, device=features_nd.device)
    for j in range(d, 0, -1):
        cf = features_nd[:, j - 1] * (1.0 / math.sqrt((j + 1) * j) * inv_std)
        torch.sub(total, cf * j, out=elevated[j])                        # no fused multiply-add
        total += cf
    elevated[0] = total
    return elevated


def _simplex_vertices(elevated: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Enclosing simplex of each elevated point (pydensecrf's float32 arithmetic).

    Args:
        elevated: ``[d+1,N]`` float32 points on the plane ``sum = 0`` (coordinate-major).

    Returns:
        rem0 ``[d+1,N]`` int32 (nearest remainder-0 lattice point),
        rank ``[d+1,N]`` int32 (simplex permutation) and barycentric
        weights ``[d+1,N]`` float32 of the d+1 vertices.
    """
    d1, n = elevated.shape
    d = d1 - 1
    # nearest multiple of d+1 as pydensecrf rounds: up if up - x < x - down, else down, with
    # up = down + d+1 (exact; where x/(d+1) is an integer up = down, and x - down ~ 0 picks down)
    down = torch.floor(elevated * (1.0 / d1)).mul_(d1)
    rem0 = down.add((down + d1).sub_(elevated) < (elevated - down), alpha=d1)
    del down
    total = torch.round(rem0.sum(dim=0) * (1.0 / d1)).to(torch.int32)      # exact: small integers
    # pydensecrf's rank: for each pair i < j the coordinate with the smaller remainder moves one
    # place down (i on ties), counted row by row: i gains lower_ij, j gains 1 - lower_ij
    diff = elevated - rem0
    rank = total.expand(d1, n).contiguous()
    rank += torch.arange(d1, dtype=torch.int32, device=elevated.device).view(d1, 1)  # the 1s of j
    lower = torch.empty(n, dtype=torch.int32, device=elevated.device)
    for i in range(d1):
        for j in range(i + 1, d1):
            torch.lt(diff[i], diff[j], out=lower)
            rank[i] += lower
            rank[j] -= lower
    wrap = (rank < 0).to(torch.int32).sub_((rank > d).to(torch.int32))
    rank.add_(wrap, alpha=d1)
    rem0 = rem0.to(torch.int32).add_(wrap, alpha=d1)
    # vertex r's weight is delta at slot d - rank minus delta at slot d - rank + 1 (slot d+1 wraps to 0)
    slot = torch.empty_like(elevated)
    slot.scatter_(0, (d - rank).long(), (elevated - rem0) * (1.0 / d1))
    bary = torch.empty_like(slot)
    torch.sub(slot[1:], slot[:-1], out=bary[1:])
    bary[0] = slot[0].double().sub_(slot[d].double()).add_(1.0)         # pydensecrf adds in double
    return rem0, rank, bary


def _lookup(table: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Position in ``table`` of each query, -1 where absent.

    Args:
        table: ``[T]`` sorted distinct codes (none negative).
        queries: ``[Q]`` codes of the same dtype (sorted makes it fastest).

    Returns:
        ``[Q]`` int32.

    One stable sort of the two concatenated (quick for two sorted runs, and
    faster than ``searchsorted`` then) counts the table entries ``<=`` each
    query (equal ones sort first); the last of them is the only candidate.
    """
    t = table.numel()
    source = torch.sort(torch.cat([table, queries]), stable=True)[1]
    below = torch.cumsum(source < t, dim=0, dtype=torch.int32)            # table entries so far
    count = torch.empty_like(below).scatter_(0, source, below)[t:]        # per query: entries <= it
    candidate = (count - 1).clamp_min_(0)
    hit = torch.index_select(table, 0, candidate) == queries
    return torch.where(hit, candidate, -1)


def _class_radix(z0: torch.Tensor) -> Optional[Tuple[List[int], List[int]]]:
    """Mixed-radix (lows, strides + [bound]) for the ``z`` of vertices and blur neighbours, or None.

    Args:
        z0: ``[d,N]`` int32, ``rem0 / (d+1)`` of every pixel.

    A vertex has ``z`` in ``[z0 - 1, z0]`` and a first blur neighbour in
    ``[z0 - 1, z0 + 1]`` (``_class_neighbour``), so coordinate i ranges over
    ``[min z0_i - 1, max z0_i + 1]``; codes ``sum_i stride_i (z_i - low_i)``
    over these ranges are distinct for distinct ``z`` and lie in
    ``[0, bound)``. None when ``bound`` reaches ``_LatticeKeys._LIMIT``.
    """
    lows, strides, bound = [], [], 1
    for i in range(z0.shape[0]):
        low = int(z0[i].min()) - 1
        span = int(z0[i].max()) + 1 - low + 1
        lows.append(low)
        strides.append(bound)
        bound *= span
        if bound >= _LatticeKeys._LIMIT:
            return None
    return lows, strides + [bound]


def _class_codes(z0: torch.Tensor, above: torch.Tensor, radix: Tuple[List[int], List[int]]) -> torch.Tensor:
    """Mixed-radix codes ``[d+1,N]`` of ``z`` of every pixel's vertex of each class r (row r).

    Args:
        z0, above: ``[d,N]`` int32 (``_class_z``).
        radix: ``_class_radix``'s result.

    Vertex r has ``z = z0 - [above < r]``, so its code is ``base - S_r`` with
    ``base`` the code of ``z0`` and ``S_r`` the summed strides of the
    coordinates with ``above < r``: an exclusive cumulative sum of the strides
    placed at slot ``above`` (distinct slots: ranks are a permutation).
    int32 when every code fits, else int64.
    """
    lows, strides = radix[0], radix[1][:-1]
    d, n = z0.shape
    dtype = torch.int32 if radix[1][-1] < 2 ** 31 else torch.long
    dev = z0.device
    stride = torch.tensor(strides, dtype=dtype, device=dev).view(d, 1)
    low = torch.tensor(lows, dtype=dtype, device=dev).view(d, 1)
    base = (z0.to(dtype) - low).mul_(stride).sum(dim=0, dtype=dtype)            # [N]
    by_slot = torch.zeros((d + 1, n), dtype=dtype, device=dev)
    by_slot.scatter_(0, above.long(), stride.expand(d, n))
    s_r = torch.cumsum(by_slot, dim=0, dtype=dtype).sub_(by_slot)              # exclusive: S_r
    return torch.sub(base, s_r, out=s_r)


def _class_z(z0: torch.Tensor, above: torch.Tensor, r: int) -> torch.Tensor:
    """``z`` ``[d,N]`` int32 of every pixel's class-r vertex: its coordinate ``i`` is ``r + (d+1) z_i``.

    pydensecrf's vertex r has coordinate ``rem0_i + r - (d+1) [rank_i > d - r]``;
    here ``z0 = rem0 / (d+1)`` and ``above = d - rank`` (first d coordinates).
    """
    return z0 - (above < r).to(z0.dtype)


def _class_neighbour(uniq: torch.Tensor, r: int, j: int, radix: Optional[Tuple[List[int], List[int]]],
                     keys: Optional["_LatticeKeys"], rep_z: Optional[torch.Tensor]) -> torch.Tensor:
    """Codes, in class ``r - 1 (mod d+1)``, of the first blur neighbours along j of class-r vertices.

    pydensecrf's first neighbour of key k along j is ``k - 1 + (d+1) e_j``
    (for j = d only the implied last coordinate moves: ``k - 1``). For a
    class-r vertex with r >= 1 that is the class r-1 key ``z + e_j``; for
    r = 0 the class d key ``z - 1 + e_j`` (``e_d`` is 0 on the d kept
    coordinates). With radix codes that is a constant offset of ``uniq``;
    with compressed keys ``keys`` encodes the shifted ``rep_z`` (-1 where no
    vertex can match).

    Args:
        uniq: ``[M_r]`` sorted codes of the class-r vertices.
        r, j: the vertices' class and the blur direction (0..d).
        radix: ``_class_radix``'s result, or None with compressed keys.
        keys: the compressed keys (None with radix codes).
        rep_z: ``[M_r,d]`` int32 ``z`` of the vertices (compressed keys only).

    Returns:
        ``[M_r]`` codes of the dtype of ``uniq``.
    """
    if radix is not None:
        strides = radix[1][:-1]
        offset = (strides[j] if j < len(strides) else 0) - (sum(strides) if r == 0 else 0)
        return uniq + offset
    shift = [int(i == j) - int(r == 0) for i in range(rep_z.shape[1])]
    return keys.encode([rep_z[:, i] + s for i, s in enumerate(shift)])


class _LatticeKeys:
    """Order-preserving int64 codes for integer lattice keys, safe from overflow.

    Codes are built coordinate by coordinate as ``code * span_i + (c_i - low_i)``;
    whenever the next step could exceed ``2^62`` the codes so far are first
    replaced by their rank among the vertices' distinct prefixes (the sorted
    prefix table is kept). Built from the vertex keys (``columns``: d arrays
    ``[M0]`` int32, duplicates allowed); ``self.codes`` ``[M0]`` int64 are their
    codes. ``encode`` codes other keys (blur neighbours) the same way and
    returns -1 for keys whose coordinates or prefixes no vertex has.
    """

    _LIMIT = 2 ** 62

    def __init__(self, columns: List[torch.Tensor]):
        self.low = [int(c.min()) for c in columns]
        self.span = [int(c.max()) - lo + 1 for c, lo in zip(columns, self.low)]
        self.tables: List[Optional[torch.Tensor]] = []
        code = torch.zeros_like(columns[0], dtype=torch.long)
        bound = 1
        for c, lo, span in zip(columns, self.low, self.span):
            table = None
            if bound * span >= self._LIMIT:
                table, code = torch.unique(code, sorted=True, return_inverse=True)
                bound = int(table.numel())
                if bound * span >= self._LIMIT:
                    raise ValueError("CRF lattice coordinates span too large a range; "
                                     "increase bilateral_sxy / bilateral_srgb")
            self.tables.append(table)
            code = code * span + (c.long() - lo)
            bound *= span
        self.codes = code

    def encode(self, columns: List[torch.Tensor]) -> torch.Tensor:
        """Codes ``[M]`` int64 of keys given as d coordinate arrays ``[M]``; -1 where no vertex can match."""
        code = torch.zeros_like(columns[0], dtype=torch.long)
        valid = torch.ones_like(code, dtype=torch.bool)
        for c, lo, span, table in zip(columns, self.low, self.span, self.tables):
            if table is not None:
                pos = torch.searchsorted(table, code).clamp_max(table.numel() - 1)
                valid &= table[pos] == code
                code = pos
            c = c.long() - lo
            valid &= (c >= 0) & (c < span)
            code = code * span + c
        return torch.where(valid, code, torch.full_like(code, -1))
