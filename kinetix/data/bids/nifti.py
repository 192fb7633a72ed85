"""NIfTI voxels read straight into one preallocated array.

nibabel's `get_fdata` on a `.nii.gz` inflates the whole file into a bytes object, copies it into an
array and converts that into another: three copies of the volume in memory at once, behind the
standard library's zlib. `read_voxels` allocates the result once and fills it in chunks: a
`.nii.gz` is inflated by zlib-ng (1.3-1.5× the speed of zlib on PET data, see benchmarks/README.md)
straight into the result, its CRC and length checked at the end of the stream; a `.nii` is read
with `readinto`. Byte order, `scl_slope` / `scl_inter` and the type conversion are applied chunk
by chunk while the chunk is in cache. The values are those of `img.get_fdata(dtype=dtype)`, bit
for bit: each chunk goes through nibabel's own `apply_read_scaling`, with the slope and intercept
prepared as nibabel's `ArrayProxy` prepares them.

Only single-file NIfTI images on disk (`.nii`, `.nii.gz`, NIfTI-1 or -2, any `vox_offset`, with or
without extensions) with a real integer or floating on-disk type in Fortran order are read here;
for anything else `read_voxels` returns None and the caller decodes the image with nibabel.
"""

import pathlib

import nibabel as nib
import numpy as np
from nibabel.arrayproxy import ArrayProxy
from nibabel.volumeutils import apply_read_scaling
from zlib_ng import gzip_ng, zlib_ng

CHUNK_BYTES = 1 << 20
"""Bytes inflated, converted and written per step: small enough to stay in the CPU cache."""

READ_ERRORS = (zlib_ng.error,)
"""What zlib-ng raises on corrupt compressed data, beyond the standard library's exceptions
(`EOFError` for a truncated `.nii.gz`, `gzip.BadGzipFile`, an `OSError`, on a bad header or CRC)."""

_IMAGE_TYPES = (nib.Nifti1Image, nib.Nifti2Image)


def _layout(img, dtype: np.dtype):
    """(path, on-disk dtype, shape, data offset in bytes, slope, intercept) of a single-file NIfTI
    image whose voxels are still on disk, or None when `read_voxels` does not handle it."""
    proxy = getattr(img, "dataobj", None)
    if type(img) not in _IMAGE_TYPES or type(proxy) is not ArrayProxy:
        return None
    if not isinstance(proxy.file_like, str | pathlib.Path):
        return None
    path = pathlib.Path(proxy.file_like)
    disk = np.dtype(proxy.dtype)
    if not (
        path.name.endswith((".nii", ".nii.gz"))
        and disk.kind in "iuf"
        and disk.fields is None
        and disk.itemsize in (1, 2, 4, 8)
        and dtype.kind == "f"
        and dtype.itemsize in (4, 8)
        and proxy.order == "F"
    ):
        return None
    return (
        path,
        disk,
        tuple(int(n) for n in proxy.shape),
        int(proxy.offset),
        proxy.slope,
        proxy.inter,
    )


def _scaled_chunk(raw: np.ndarray, slope, inter, dtype: np.dtype) -> np.ndarray:
    """`raw` [N] on-disk values -> [N] `dtype`, as nibabel's `get_fdata(dtype=dtype)` computes them.

    `ArrayProxy._get_scaled` narrows the slope and intercept to `dtype` where that is lossless,
    scales in the promoted type, and `get_fdata` rounds the result to `dtype`.
    """
    slope, inter = np.asanyarray(slope), np.asanyarray(inter)
    if np.can_cast(slope, dtype):
        slope = slope.astype(dtype)
    if np.can_cast(inter, dtype):
        inter = inter.astype(dtype)
    scaled = apply_read_scaling(raw, slope, inter)
    return scaled.astype(np.promote_types(scaled.dtype, dtype), copy=False)


def _read_exactly(f, buf: memoryview, done: int, total: int) -> None:
    """Fills `buf` [bytes] from `f`; `done` and `total` count the voxel bytes for the message.

    Raises:
      OSError: the file ends first (a truncated `.nii`, or a `.nii.gz` whose stream is short).
    """
    n = 0
    while n < len(buf):
        got = f.readinto(buf[n:])
        if not got:
            raise OSError(
                f"expected {total} bytes of voxel data, got {done + n}; could the file be damaged?"
            )
        n += got


def _fill(f, out: np.ndarray, disk: np.dtype, slope, inter) -> None:
    """Reads `out.size` voxels of type `disk` from `f` (at the first voxel) into `out` [N].

    When `disk` is `out`'s type in either byte order and the scaling is the identity (nibabel's
    own test: slope 1, intercept 0), the file is read straight into `out`, swapped in place where
    needed; otherwise each chunk is read into a scratch buffer and converted into its slice.
    """
    size = disk.itemsize
    total = out.size * size
    step = max(1, CHUNK_BYTES // size)  # voxels per chunk
    if disk.newbyteorder("=") == out.dtype and (slope, inter) == (1, 0):
        raw_out = memoryview(out).cast("B")
        for start in range(0, out.size, step):
            chunk = out[start : start + step]
            _read_exactly(
                f, raw_out[start * size : (start + chunk.size) * size], start * size, total
            )
            if not disk.isnative:
                chunk.byteswap(inplace=True)
        return
    scratch = np.empty(step, dtype=disk)
    raw = memoryview(scratch.view(np.uint8))
    for start in range(0, out.size, step):
        n = min(step, out.size - start)
        _read_exactly(f, raw[: n * size], start * size, total)
        out[start : start + n] = _scaled_chunk(scratch[:n], slope, inter, out.dtype)


def read_voxels(img, dtype=np.float32) -> np.ndarray | None:
    """The voxels of a NIfTI image opened by `nib.load`, as `img.get_fdata(dtype=dtype)` gives them.

    Args:
      img: a `nib.Nifti1Image` or `nib.Nifti2Image` whose data are still on disk.
      dtype: float32 or float64.

    Returns:
      [X, Y, Z, ...] `dtype` array in Fortran order (scl_slope / scl_inter applied), a new array
      the caller owns; or None when the image is not one this reader handles (see the module).

    Raises:
      OSError, EOFError, zlib_ng.error: the file is truncated or corrupt (`READ_ERRORS`).
    """
    dtype = np.dtype(dtype)
    layout = _layout(img, dtype)
    if layout is None:
        return None
    path, disk, shape, offset, slope, inter = layout
    out = np.empty(int(np.prod(shape, dtype=np.int64)), dtype=dtype)
    if path.name.endswith(".gz"):
        with open(path, "rb", buffering=0) as compressed:
            # The reader behind `gzip_ng.open`: its `readinto` inflates straight into `out`, where
            # `GzipFile.readinto` inflates into a bytes object and copies (10-15 % more CPU).
            f = zlib_ng._GzipReader(compressed, gzip_ng.READ_BUFFER_SIZE)
            f.seek(offset)  # inflates past the header and any extensions
            _fill(f, out, disk, slope, inter)
    else:
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            _fill(f, out, disk, slope, inter)
    return out.reshape(shape, order="F")
