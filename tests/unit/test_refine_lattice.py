"""The permutohedral lattice of freeseg.refine.lattice against a plain re-implementation of pydensecrf's.

``reference_filter`` follows pydensecrf's ``permutohedral.cpp`` (non-SSE ``init`` and
``seqCompute``) point by point with a dict as the hash table, in numpy float32 for the lattice
geometry; the vectorised lattice must find the same vertices and filter values the same way.
"""

import math

import numpy as np
import pytest
import torch

from freeseg.refine.lattice import PermutohedralLattice, _LatticeKeys, _lookup


def reference_filter(feats: np.ndarray, values: np.ndarray):
    """pydensecrf's lattice filter (less its constant ``alpha``) -> (vertex count, ``[N,C]`` float64)."""
    n, d = feats.shape
    d1 = d + 1
    f32 = np.float32
    inv_std = f32(math.sqrt(2.0 / 3.0) * d1)
    scale = [f32(1.0 / math.sqrt((i + 2) * (i + 1)) * float(inv_std)) for i in range(d)]
    down_factor, up_factor = f32(1.0 / d1), f32(d1)
    table, offsets, weights = {}, np.zeros((n, d1), dtype=np.int64), np.zeros((n, d1), dtype=np.float32)
    for k in range(n):
        f = feats[k].astype(np.float32)
        elevated = np.zeros(d1, dtype=np.float32)
        sm = f32(0)
        for j in range(d, 0, -1):
            cf = f32(f[j - 1] * scale[j - 1])
            elevated[j] = f32(sm - f32(j) * cf)
            sm = f32(sm + cf)
        elevated[0] = sm
        rem0 = np.zeros(d1, dtype=np.float32)
        total = 0
        for i in range(d1):
            v = f32(down_factor * elevated[i])
            up, down = f32(np.ceil(v) * up_factor), f32(np.floor(v) * up_factor)
            rem0[i] = up if f32(up - elevated[i]) < f32(elevated[i] - down) else down
            total += int(round(float(rem0[i]) / d1))
        rank = np.zeros(d1, dtype=np.int64)
        for i in range(d):
            for j in range(i + 1, d1):
                if f32(elevated[i] - rem0[i]) < f32(elevated[j] - rem0[j]):
                    rank[i] += 1
                else:
                    rank[j] += 1
        for i in range(d1):
            rank[i] += total
            if rank[i] < 0:
                rank[i] += d1
                rem0[i] += d1
            elif rank[i] > d:
                rank[i] -= d1
                rem0[i] -= d1
        bary = np.zeros(d + 2, dtype=np.float32)
        for i in range(d1):
            v = f32(f32(elevated[i] - rem0[i]) * down_factor)
            bary[d - rank[i]] += v
            bary[d - rank[i] + 1] -= v
        bary[0] = f32(float(bary[0]) + (1.0 + float(bary[d + 1])))
        for r in range(d1):
            key = tuple(int(rem0[i]) + (r if rank[i] <= d - r else r - d1) for i in range(d))
            offsets[k, r] = table.setdefault(key, len(table))
            weights[k, r] = bary[r]
    m = len(table)
    keys = list(table)
    lattice = np.zeros((m + 1, values.shape[1]))                          # row m: missing neighbours
    for k in range(n):
        for r in range(d1):
            lattice[offsets[k, r]] += float(weights[k, r]) * values[k]
    for j in range(d1):
        n1 = [table.get(tuple(c + (d if i == j else -1) for i, c in enumerate(key)), m) for key in keys]
        n2 = [table.get(tuple(c - (d if i == j else -1) for i, c in enumerate(key)), m) for key in keys]
        blurred = lattice.copy()
        blurred[:m] += 0.5 * (lattice[n1] + lattice[n2])
        lattice = blurred
    out = np.zeros((n, values.shape[1]))
    for k in range(n):
        for r in range(d1):
            out[k] += float(weights[k, r]) * lattice[offsets[k, r]]
    return m, out


def image_like_features(n: int, seed: int) -> torch.Tensor:
    """``[n,5]`` float32 like the CRF's: pixel positions and 8-bit colours divided by 20 (ties happen)."""
    gen = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 60, (n, 2), generator=gen).float() / 20.0
    rgb = torch.randint(0, 256, (n, 3), generator=gen).float() / 20.0
    return torch.cat([pos, rgb], dim=1)


def random_features(n: int, scale: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 5, generator=gen) * scale


FEATURE_SETS = [("image-like", lambda: image_like_features(300, 0)),
                ("dense", lambda: random_features(300, 2.0, 1)),
                ("sparse", lambda: random_features(200, 40.0, 2)),
                ("low-d", lambda: random_features(200, 3.0, 3)[:, :2]),
                ("single", lambda: random_features(1, 3.0, 4))]


@pytest.mark.parametrize("name,make", FEATURE_SETS, ids=[n for n, _ in FEATURE_SETS])
def test_lattice_matches_pydensecrf_reference(name, make):
    feats = make()
    values = torch.rand(feats.shape[0], 3, generator=torch.Generator().manual_seed(5))
    m, expected = reference_filter(feats.numpy(), values.double().numpy())
    lattice = PermutohedralLattice(feats)
    assert lattice.m == m
    got = lattice.apply(values).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_compressed_keys_match_the_reference(monkeypatch):
    # codes that would overflow fall back to rank-compressed keys: force that path
    monkeypatch.setattr(_LatticeKeys, "_LIMIT", 2 ** 16)
    encoded = []
    encode = _LatticeKeys.encode
    monkeypatch.setattr(_LatticeKeys, "encode",
                        lambda self, cols: encoded.append(self) or encode(self, cols))
    feats = image_like_features(250, 6)
    values = torch.rand(250, 2, generator=torch.Generator().manual_seed(7))
    m, expected = reference_filter(feats.numpy(), values.double().numpy())
    lattice = PermutohedralLattice(feats)
    assert encoded and any(t is not None for t in encoded[0].tables)
    assert lattice.m == m
    np.testing.assert_allclose(lattice.apply(values).double().numpy(), expected,
                               rtol=1e-5, atol=1e-5 * np.abs(expected).max())


@pytest.mark.parametrize("channels", [1, 2, 3, 4, 5, 7, 8, 9])
def test_apply_any_channel_count_matches_one_channel_at_a_time(channels):
    feats = image_like_features(400, 8)
    values = torch.rand(400, channels, generator=torch.Generator().manual_seed(channels))
    lattice = PermutohedralLattice(feats)
    got = lattice.apply(values)
    assert got.shape == (400, channels) and got.dtype == torch.float32
    for c in range(channels):
        alone = lattice.apply(values[:, c:c + 1].clone())[:, 0]
        assert torch.allclose(got[:, c], alone, rtol=1e-5, atol=1e-6)


def test_apply_into_out_and_repeatable():
    feats = image_like_features(300, 9)
    gen = torch.Generator().manual_seed(10)
    a, b = torch.rand(300, 3, generator=gen), torch.rand(300, 3, generator=gen)
    lattice = PermutohedralLattice(feats)
    first = lattice.apply(a).clone()
    lattice.apply(b)                               # reuses the scratch buffers
    out = torch.full((300, 3), float("nan"))
    assert lattice.apply(a, out=out) is out
    assert torch.equal(out, first)
    strided = torch.zeros(300, 6)[:, ::2]          # a non-contiguous target
    lattice.apply(a, out=strided)
    assert torch.equal(strided, first)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_lookup_matches_searchsorted(dtype):
    gen = torch.Generator().manual_seed(11)
    table = torch.unique(torch.randint(0, 5000, (700,), generator=gen)).to(dtype)
    sorted_queries = torch.unique(torch.randint(-3, 5100, (900,), generator=gen)).to(dtype)
    shuffled = torch.cat([sorted_queries, torch.full((50,), -1, dtype=dtype)])
    shuffled = shuffled[torch.randperm(shuffled.numel(), generator=gen)]
    for queries in (sorted_queries, shuffled, table.clone(), table[:0]):
        pos = torch.searchsorted(table, queries).clamp_max(table.numel() - 1)
        expected = torch.where(table[pos] == queries, pos, -1)
        got = _lookup(table, queries)
        assert got.dtype == torch.int32
        assert torch.equal(got.long(), expected)
