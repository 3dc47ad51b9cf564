"""Index matrices and table geometry against the spec's spot checks (spec §2), and the table resize (Q10)."""

import numpy as np
import pytest
import torch

from vlmo_fast.model import relpos


def test_table_rows():
    assert relpos.num_image_distances(14) == 732
    assert [relpos.num_table_rows(w) for w in (14, 24, 30)] == [1126, 2606, 3878]


def test_image_index_224():
    idx = relpos.image_relative_position_index(14)
    assert idx.shape == (197, 197) and idx.dtype == torch.int64
    assert (idx[1, 1], idx[1, 2], idx[2, 1], idx[15, 1]) == (364, 363, 365, 391)
    assert idx[0, 0] == 731 and (idx[0, 1:] == 729).all() and (idx[1:, 0] == 730).all()
    # query minus key: patch (h, w) vs (h', w')
    w = 14
    for i, j in [(3, 50), (196, 1), (100, 100), (17, 180)]:
        hi, wi = divmod(i - 1, w)
        hj, wj = divmod(j - 1, w)
        assert idx[i, j] == (hi - hj + w - 1) * (2 * w - 1) + (wi - wj + w - 1)
    assert idx[1:, 1:].min() == 0 and idx[1:, 1:].max() == 728


def test_text_index_40():
    idx = relpos.text_relative_position_index(40, 14)
    body = idx[1:, 1:]
    assert body.min() == 890 and body.max() == 966 and body.unique().numel() == 77
    assert (idx[0, 1:] == 1123).all() and (idx[1:, 0] == 1124).all() and idx[0, 0] == 1125
    # key minus query: row i, col j -> (j - i) + 196 + 732
    assert idx[5, 9] == (9 - 5) + 196 + 732 and idx[9, 5] == (5 - 9) + 196 + 732
    assert relpos.text_relative_position_index(196, 14)[1:, 1:].max() == 732 + 2 * 196 - 2


def test_fusion_index_blocks():
    idx = relpos.fusion_relative_position_index(40, 14)
    assert idx.shape == (237, 237)
    assert torch.equal(idx[:40, :40], relpos.text_relative_position_index(40, 14))
    assert torch.equal(idx[40:, 40:], relpos.image_relative_position_index(14))
    assert (idx[:40, 40:] == 732).all() and (idx[40:, :40] == 733).all()
    for w in (24, 30):
        full = relpos.fusion_relative_position_index(40, w)
        assert int(full.max()) < relpos.num_table_rows(w)


def test_text_longer_than_initckpt_rejected():
    with pytest.raises(ValueError, match="max_text_len"):
        relpos.text_relative_position_index(197, 14)


def spec_source_grid(s, d):
    """The spec's source coordinates (spec §2, table resize), written out here rather than taken from the code under
    test: q by bisection in [1.01, 1.5] so that 1 + q + ... + q^(s//2 - 1) ~ d//2, then [-cum.., 0, ..cum] with
    cum_k = q^0 + ... + q^(k-1) for k = 1 .. s//2. Returns (q, coordinates)."""
    n = s // 2
    lo, hi = 1.01, 1.5
    while hi - lo > 1e-6:
        q = (lo + hi) / 2
        if sum(q**t for t in range(n)) > d // 2:
            hi = q
        else:
            lo = q
    cum = [sum(q**t for t in range(k)) for k in range(1, n + 1)]
    return q, np.array([-c for c in reversed(cum)] + [0.0] + cum)


@pytest.mark.parametrize("src_w,dst_w", [(14, 24), (14, 30), (24, 30), (24, 14)])
def test_table_resize_matches_scipy_bicubic(src_w, dst_w):
    interpolate = pytest.importorskip("scipy.interpolate")
    cols = 5
    table = torch.randn(relpos.num_table_rows(src_w), cols)
    new = relpos.resize_table(table, relpos.num_table_rows(dst_w), dst_w)
    assert new.shape == (relpos.num_table_rows(dst_w), cols) and new.dtype == table.dtype
    s, d = 2 * src_w - 1, 2 * dst_w - 1
    _, x = spec_source_grid(s, d)  # the spec's grid, not the code's: a wrong grid must show here
    t = d // 2
    dx = np.arange(-t, t + 0.1, 1.0)
    for c in range(cols):
        z = table[: s * s, c].view(s, s).double().numpy()  # z[row = y, col = x]
        # interp2d(x, y, z, kind="cubic")(dx, dy) == RectBivariateSpline(x, y, z.T)(dx, dy).T  (spec §2)
        expected = interpolate.RectBivariateSpline(x, x, z.T, kx=3, ky=3, s=0)(dx, dx).T.reshape(-1)
        np.testing.assert_allclose(new[: d * d, c].double().numpy(), expected, rtol=0, atol=2e-6)
    # the image-CLS, cross-modal and text rows are carried over unchanged
    assert torch.equal(new[d * d :], table[s * s :])


def test_geometric_grid_spans_the_destination():
    x = relpos._geometric_source_coords(27, 47)
    assert x.shape == (27,) and x[13] == 0 and np.all(np.diff(x) > 0)
    assert x[-1] == pytest.approx(23, abs=1e-3)
    # BEiT's geometric grid (spec §2), not a uniform stretch: unit steps next to the centre, growing by q outwards
    assert x[12] == -1.0 and x[14] == 1.0
    q, expected = spec_source_grid(27, 47)
    assert q == pytest.approx(1.0903, abs=1e-4)  # 14 -> 24: 1 + q + ... + q^12 = 23
    assert x[15] - x[14] == pytest.approx(q, abs=1e-5) and x[16] - x[15] == pytest.approx(q**2, abs=1e-5)
    np.testing.assert_allclose(x, expected, rtol=0, atol=1e-5)
    for s, d in ((27, 59), (47, 59), (47, 27)):  # 14 -> 30, 24 -> 30, 24 -> 14 (q pinned at 1.01 when shrinking)
        np.testing.assert_allclose(relpos._geometric_source_coords(s, d), spec_source_grid(s, d)[1], rtol=0, atol=1e-5)


def test_spline_reproduces_cubics_and_same_size_is_identity():
    x = np.array([-5.0, -3.5, -1.0, 0.0, 1.2, 3.0, 6.0])
    t = np.linspace(-5, 6, 23)
    a = relpos.cubic_spline_matrix(x, t)
    for poly in (lambda u: 1 + 0 * u, lambda u: u, lambda u: u**3 - 2 * u**2 + 0.5):
        np.testing.assert_allclose(a @ poly(x), poly(t), atol=1e-9)
    table = torch.randn(1126, 3)
    assert torch.equal(relpos.resize_table(table, 1126, 14), table)
    with pytest.raises(ValueError, match="does not fit"):
        relpos.resize_table(torch.randn(1000, 3), 1126, 14)
