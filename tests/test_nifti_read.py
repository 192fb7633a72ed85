"""The NIfTI voxel reader (kinetix.data.bids.nifti) against nibabel's `get_fdata`.

Small files written byte by byte (nibabel's header, our data): `.nii` and `.nii.gz`; float32,
float64, int16 and uint8 on disk, with and without scl_slope / scl_inter; both byte orders; 3-D
and 4-D; NIfTI-1 with an extension (vox_offset > 352) and NIfTI-2. The reader must give
nibabel's values bit for bit, and every damaged file must be one sentence naming it.
"""

import gzip
import io
import pathlib
import re
import struct

import nibabel as nib
import numpy as np
import pytest

import kinetix.kinetics as kk
from kinetix.data import bids
from kinetix.data.bids import nifti
from kinetix.data.bids.study import nifti_data

SHAPES = {"3-D": (5, 4, 3), "4-D": (5, 4, 3, 6)}
SCALINGS = {"none": (np.nan, np.nan), "slope-inter": (0.1, 7.3)}  # 0.1: inexact in binary


def _values(disk: np.dtype, shape, rng) -> np.ndarray:
    """Values spanning the on-disk type: its extremes, zeros, and for floats NaN, ±inf and
    numbers beyond float32's precision (float64)."""
    n = int(np.prod(shape))
    if disk.kind in "iu":
        info = np.iinfo(disk)
        v = rng.integers(info.min, info.max, n, endpoint=True, dtype=np.int64)
        v[:3] = info.min, info.max, 0
    else:
        v = rng.standard_normal(n) * 1e3 + 1.0 / 3.0
        v[:5] = np.nan, np.inf, -np.inf, 0.0, -0.0
        if disk.itemsize == 8:
            v[5] = 1e300  # overflows float32
    return v.reshape(shape).astype(disk)


def _nifti_bytes(values: np.ndarray, byteorder: str, scaling, *, extension=False, version=1):
    """A single-file NIfTI image of `values` (on-disk type `values.dtype`) as bytes."""
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    hdr = header_class(endianness=byteorder)
    hdr.set_data_shape(values.shape)
    hdr.set_data_dtype(values.dtype)
    hdr.set_sform(np.diag([2.0, 2.0, 3.0, 1.0]), code=1)
    hdr["scl_slope"], hdr["scl_inter"] = scaling
    if extension:
        hdr.extensions.append(nib.nifti1.Nifti1Extension(6, b"kinetix reader test " * 7))
    offset = hdr.sizeof_hdr + 4 + sum(e.get_sizeondisk() for e in hdr.extensions)
    hdr.set_data_offset(offset)
    buf = io.BytesIO()
    hdr.write_to(buf)
    assert buf.tell() == offset
    buf.write(values.astype(hdr.get_data_dtype()).tobytes(order="F"))
    return buf.getvalue()


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.suffix == ".gz" else data)
    return path


@pytest.fixture(params=[96, nifti.CHUNK_BYTES], ids=["chunk 96 B", "default chunk"])
def chunk(request, monkeypatch):
    """Small chunks put chunk boundaries (and a short last chunk) inside these small files."""
    monkeypatch.setattr(nifti, "CHUNK_BYTES", request.param)
    return request.param


def _same_bits(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    uint = np.dtype(f"u{a.dtype.itemsize}")
    np.testing.assert_array_equal(a.view(uint), b.view(uint))


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("disk", ["float32", "float64", "int16", "uint8"])
@pytest.mark.parametrize("scaling", list(SCALINGS), ids=list(SCALINGS))
@pytest.mark.parametrize("byteorder", ["<", ">"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("dims", list(SHAPES))
def test_voxels_equal_nibabel_bit_for_bit(tmp_path, chunk, ext, disk, scaling, byteorder, dims):
    values = _values(np.dtype(disk), SHAPES[dims], np.random.default_rng(len(disk) + len(dims)))
    path = _write(tmp_path / f"x{ext}", _nifti_bytes(values, byteorder, SCALINGS[scaling]))
    img = nib.load(path)
    assert img.dataobj.dtype.byteorder in ("|", byteorder)
    for dtype in (np.float32, np.float64):
        # float64 beyond float32's range: inf, with nibabel's overflow warning, in both readers.
        with np.errstate(over="ignore"):
            got = nifti.read_voxels(nib.load(path), dtype)
            want = img.get_fdata(dtype=dtype)
            via_study = nifti_data(nib.load(path), path, "image", dtype)
        assert got is not None, "the fast path must handle this file"
        _same_bits(got, want)
        _same_bits(via_study, want)
        assert got.flags.f_contiguous and got.flags.writeable


@pytest.mark.parametrize("ext", [".nii", ".nii.gz"])
@pytest.mark.parametrize("layout", ["extension", "NIfTI-2"])
def test_extensions_and_nifti2(tmp_path, ext, layout):
    values = _values(np.dtype("int16"), SHAPES["4-D"], np.random.default_rng(3))
    raw = _nifti_bytes(
        values,
        ">",
        SCALINGS["slope-inter"],
        extension=layout == "extension",
        version=2 - (layout == "extension"),
    )
    path = _write(tmp_path / f"x{ext}", raw)
    img = nib.load(path)
    assert img.dataobj.offset > (352 if layout == "extension" else 540)
    got = nifti.read_voxels(img, np.float32)
    assert got is not None
    _same_bits(got, nib.load(path).get_fdata(dtype=np.float32))


def test_images_it_does_not_handle_go_to_nibabel(tmp_path):
    values = _values(np.dtype("int16"), SHAPES["3-D"], np.random.default_rng(4))
    in_memory = nib.Nifti1Image(values, np.eye(4))
    assert nifti.read_voxels(in_memory) is None
    pair = tmp_path / "x.img"  # a two-file NIfTI pair
    nib.save(nib.Nifti1Pair(values, np.eye(4)), pair)
    assert nifti.read_voxels(nib.load(pair)) is None
    _same_bits(bids.load_nifti(pair, "image")[0], nib.load(pair).get_fdata(dtype=np.float32))
    rgb = tmp_path / "rgb.nii"
    nib.save(
        nib.Nifti1Image(np.zeros((2, 2, 2), [("R", "u1"), ("G", "u1"), ("B", "u1")]), None), rgb
    )
    assert nifti.read_voxels(nib.load(rgb)) is None


# ------------------------------------------------------------------------------------------------
# Damaged files: one sentence naming the file
# ------------------------------------------------------------------------------------------------
def _float_image() -> bytes:
    """512 KB: damage half-way through lies beyond what nibabel reads for the header."""
    values = np.random.default_rng(5).standard_normal((64, 64, 8, 4)).astype(np.float32)
    return _nifti_bytes(values, "<", SCALINGS["none"])


def _gz(raw: bytes) -> bytes:
    return gzip.compress(raw, compresslevel=1)


def _flip(data: bytes) -> bytes:
    start, stop = len(data) // 2, len(data) // 2 + 400
    return data[:start] + bytes(x ^ 0xFF for x in data[start:stop]) + data[stop:]


def _wrong_crc(gz: bytes) -> bytes:
    crc = struct.unpack("<I", gz[-8:-4])[0] ^ 1
    return gz[:-8] + struct.pack("<I", crc) + gz[-4:]


DAMAGED = {  # name: (extension, NIfTI bytes -> file bytes, a fragment of the sentence)
    ".nii.gz cut in half": (
        ".nii.gz",
        lambda r: _gz(r)[: len(_gz(r)) // 2],
        "Compressed file ended",
    ),
    ".nii.gz of a short image": (".nii.gz", lambda r: _gz(r[:-50]), "could the file be damaged?"),
    ".nii.gz with a wrong CRC": (".nii.gz", lambda r: _wrong_crc(_gz(r)), "CRC check failed"),
    ".nii.gz with flipped bits": (".nii.gz", lambda r: _flip(_gz(r)), "while decompressing data"),
    ".nii cut short": (".nii", lambda r: r[:-50], "could the file be damaged?"),
    "empty .nii.gz": (".nii.gz", lambda r: b"", "cannot be read as NIfTI"),
    "empty .nii": (".nii", lambda r: b"", "cannot be read as NIfTI"),
}


@pytest.mark.parametrize("ext, damage, detail", list(DAMAGED.values()), ids=list(DAMAGED))
def test_damaged_file_is_one_sentence_naming_it(tmp_path, chunk, ext, damage, detail):
    path = tmp_path / f"sub-01_pet{ext}"
    path.write_bytes(damage(_float_image()))
    with pytest.raises(bids.BidsError) as info:
        bids.load_nifti(path, "PET image")
    message = str(info.value)
    assert message.startswith(f"The PET image {path} is truncated or corrupt"), message
    assert detail in message and "\n" not in message and message.endswith(").")


# ------------------------------------------------------------------------------------------------
# read_subject: checks in the file's units, then SUV scaling in place
# ------------------------------------------------------------------------------------------------
def _study(root: pathlib.Path, frames: np.ndarray) -> pathlib.Path:
    sched = kk.PAPER_SCHEDULE
    t = np.linspace(0.0, 70.0, 41)
    plasma = 2e4 * np.exp(-t / 20.0) + 5e3
    return bids.write_subject(
        root, "sub-01", frames, sched, t, plasma, 0.9 * plasma, 300.0, 75.0, np.eye(4)
    )


def test_read_subject_scales_nibabels_values_in_one_step(tmp_path):
    rng = np.random.default_rng(6)
    frames = rng.uniform(0.0, 3e4, (4, 3, 2, kk.PAPER_SCHEDULE.n_frames)).astype(np.float32)
    pet = _study(tmp_path, frames)
    study = bids.read_subject(pet, check_plausibility=False)
    want = nib.load(pet).get_fdata(dtype=np.float32) * np.float32(study.suv_factor)
    _same_bits(study.frames, want)


@pytest.mark.parametrize(
    "spoil, sentence",
    [
        (
            lambda f: f.__setitem__((0, 0, 0, slice(0, 2)), np.nan),
            "2 non-finite voxel values (2 NaN, 0 infinite)",
        ),
        (
            lambda f: f.__setitem__((1, 0, 0, 3), -np.inf),
            "1 non-finite voxel values (0 NaN, 1 infinite)",
        ),
        (
            lambda f: f.__setitem__((slice(None),) * 4, -1.0),
            "has no positive voxel value (maximum -1)",
        ),
    ],
    ids=["NaN", "inf", "no positive voxel"],
)
def test_read_subject_image_faults(tmp_path, spoil, sentence):
    frames = np.full((4, 3, 2, kk.PAPER_SCHEDULE.n_frames), 1e4, np.float32)
    pet = _study(tmp_path, frames)
    spoil(frames)
    nib.save(nib.Nifti1Image(frames, np.eye(4)), pet)
    with pytest.raises(bids.BidsError, match=f"{re.escape(pet.name)} .*{re.escape(sentence)}"):
        bids.read_subject(pet, check_plausibility=False)
