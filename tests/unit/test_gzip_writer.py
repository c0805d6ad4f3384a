"""The .nii.gz writer (io/nifti.gzip_bytes): ISA-L's deflate when python-isal imports, else zlib's, block by block on
threads; the same bytes every time and for any thread count, read back by gzip and nibabel."""

from __future__ import annotations

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from maisi_cli.io import nifti


def ct_like(shape=(64, 48, 40), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    ct = np.full(shape, -1000, dtype=np.int16)
    ct[8:-8, 8:-8] = (40 + rng.normal(0, 20, ct[8:-8, 8:-8].shape)).astype(np.int16)
    return ct


@pytest.fixture(params=["isal", "zlib"])
def backend(request, monkeypatch):
    """Each backend: isal_zlib (skipped where python-isal is missing) and the standard library's fallback."""
    if request.param == "isal":
        pytest.importorskip("isal")
        assert nifti.gzip_backend().__name__ == "isal.isal_zlib"
    else:
        monkeypatch.setattr(nifti, "_isal_zlib", None)  # as on a platform without the wheel
        assert nifti.gzip_backend() is zlib
    monkeypatch.setattr(nifti, "GZIP_BLOCK", 64 * 1024)  # many blocks at a test's size
    return request.param


def test_gzip_bytes_are_one_readable_member_the_same_for_any_thread_count(backend):
    payload = nifti.nifti_bytes_uncompressed(ct_like(), np.eye(4))
    assert len(payload) > 3 * nifti.GZIP_BLOCK
    one, four = nifti.gzip_bytes(payload, threads=1), nifti.gzip_bytes(payload, threads=4)
    assert one == four == nifti.gzip_bytes(payload, threads=4)  # deterministic: never the threads' timing
    assert gzip.decompress(one) == payload
    assert len(one) < len(payload) / 2  # compressed, the blocks sharing their windows
    assert one[:10] == b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x04\xff"  # mtime 0, no name: nothing of time or place
    assert gzip.decompress(nifti.gzip_bytes(b"")) == b"" and gzip.decompress(nifti.gzip_bytes(b"x")) == b"x"


def test_written_nifti_reads_back_equal_with_nibabel(backend, tmp_path):
    ct, labels = ct_like(), (ct_like(seed=1) > 0).astype(np.uint8) * 200
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for name, array in (("image", ct), ("label", labels)):
        path = tmp_path / f"{name}.nii.gz"
        digest = nifti.write_nifti(path, array, affine)
        back = nib.load(path)
        assert back.get_data_dtype() == array.dtype
        np.testing.assert_array_equal(np.asarray(back.dataobj), array)
        np.testing.assert_allclose(back.affine, affine, rtol=1e-6)  # the header holds float32
        assert nifti.write_nifti(tmp_path / f"again-{name}.nii.gz", array, affine) == digest  # a re-run's bytes
        assert gzip.decompress(path.read_bytes()) == nifti.nifti_bytes_uncompressed(array, affine)


def test_isal_is_the_default_backend_where_it_imports():
    pytest.importorskip("isal")
    from isal import isal_zlib

    assert nifti.gzip_backend() is isal_zlib
