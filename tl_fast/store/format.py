"""On-disk format of a tl_fast label store (version 3; versions 1 and 2 are still read).

A store is ONE file holding every image's compressed top-k score map. It is read through a memory
map, so opening is O(header + index + manifest) and reading a record touches only that record.
All integers are little-endian; every section starts on an 8-byte boundary and the file length is a
multiple of 8, so the whole file can be viewed as ``uint64`` words.

File layout::

    offset            size          section
    0                 128           header
    data_offset=128   data_bytes    records, back to back, each 8-aligned, length a multiple of 8
    index_offset      16 * N        index: offsets u64[N], then lengths u32[N], then checksums u32[N]
    manifest_offset   manifest_bytes  keys (record -> image path relative to the image root, without
                                      extension, '/'-separated), UTF-8, joined by '\\n'
    meta_offset       meta_bytes    JSON object: free-form metadata (tool, annotator, ...)
    (zero padding to a multiple of 8)
    fingerprint_offset  24 * N      version 3, optional: per record the content fingerprint of its
                                    image, sizes u64[N], hashes u64[N] (size 2**64-1: unknown; see
                                    :func:`tl_fast.imagecheck.fingerprint_bytes`), then seals u64[N]
                                    (:func:`seal_fingerprints`; 0 where unknown). Version 2 has
                                    the sizes and hashes only (16 * N bytes)
    = file_size

Header (128 bytes)::

    0    8s  magic b"TLFSTORE"
    8    u32 version (3)
    12   u32 flags (bit 0: values were written in lossy mode)
    16   u32 num_classes K          20  u32 topk k
    24   u32 height H               28  u32 width W
    32   u64 num_records N
    40   u64 data_offset            48  u64 data_bytes
    56   u64 index_offset           64  u64 manifest_offset
    72   u64 manifest_bytes         80  u64 meta_offset
    88   u64 meta_bytes             96  u64 file_size
    104  u32 crc32 (zlib) of: header with this field zeroed, index, manifest, meta, fingerprints
    108  u32 reserved (0)
    112  u64 fingerprint_offset (versions 2, 3; 0: the store records no fingerprints)
    120-127 reserved (0)

Version 1 is version 2 without the fingerprint section (bytes 112-127 are zero): it is read as a
store without fingerprints. Writers write version 3.

**Seals (version 3).** A record's fingerprint says which image its map was made from, so it must
move with the record, not stay with the key: ``seal[r] = seal_fingerprints(size[r], hash[r],
checksum[r])`` binds it to the record's checksum (index column; every read checks the record's bytes
against it). Records (or their index rows) reordered against their keys and fingerprints then fail
the seal; records moved together with their fingerprints (a rewrite that carries them along) fail
the comparison with the images. Both are checked when a loader joins images and records, from the
index and this section alone (no record is read). Version 2 stores have no seals: their fingerprints
are compared per record id, which a reordering of index rows does not change.

A reader checks magic, version, ``file_size`` against the real size (truncation), the section
bounds, the crc32, and that every index entry lies inside the data section. A writer streams
records into a temporary file in the destination directory and writes the header last, then
renames: an interrupted write leaves a temp file with a zero header, which fails the magic check.

Record (codec version 1), for a map of ``n = k * H * W`` entries in ``[k, H, W]`` C order::

    0   u8  record format (1)
    1   u8  id_bits b: bits per packed palette index, the minimal width for P (0 when P == 1)
    2   u8  palette entry width in bytes (2 or 4)
    3   u8  flags (bit 0: lossy values)
    4   u32 record checksum (see below)
    8   u32 palette size P (1 <= P <= n)
    12  u32 n
    16  k x 8 bytes, per slot j: u16 base_j, u16 top_j, u16 step_j, u8 bits_j, u8 reserved
    ..  palette: P class ids (u16 or u32), strictly increasing, each < K; zero-padded to 8 bytes
    ..  ids: n palette indices of b bits, bit-packed LSB-first into u64 words
    ..  values: for slot j = 0..k-1, H*W codes of bits_j bits, one LSB-first bit stream in u64 words

The ids and values sections are each zero-padded to whole u64 words, so a record is exactly
``16 + 8k + align8(P * width) + 8 * ceil(n * b / 64) + 8 * ceil(H * W * sum_j bits_j / 64)`` bytes;
decoders reject any other length.

Values are float16. Each is mapped to its *order key*, a uint16 that sorts like the float
(``key = bits | 0x8000`` for a clear sign bit, ``key = 0xFFFF - bits`` otherwise; finite values have
keys in ``[0x0400, 0xFBFF]``). Per slot (top-1 scores, top-2 scores, ...) the keys of the record
span ``[base_j, top_j]`` (their min and max); a value is stored as ``q = (key - base_j) // step_j`` in ``bits_j`` bits and decoded
as ``key = min(base_j + q * step_j + (step_j - 1) // 2, top_j)``.

* Lossless mode: ``step_j = 1``, so every value is reproduced bit for bit. Scores of one slot vary
  over a few binades in a smooth map, so ``bits_j`` is typically 12-14 instead of 16.
* Lossy mode: ``step_j = max(1, ceil((top_j - base_j + 1) / 256))`` so ``q`` fits 8 bits. **Error
  bound:** the decoded key differs from the original key by at most ``ceil((step_j - 1) / 2)``, i.e.
  the decoded float16 lies within that many float16 ulps of the original: for normal values of the
  same sign, ``|v' - v| <= ceil((step_j - 1) / 2) * 2**-10 * max(|v|, |v'|)``; near zero (subnormals)
  ``|v' - v| <= ceil((step_j - 1) / 2) * 2**-24``. With 8-bit codes a slot spanning 13 binades of
  scores has ``step_j = 53``, i.e. at most 26 ulps (2.5% relative). Decoded values are always
  finite and inside ``[min_j, max_j]`` of the slot.

Class ids go through a per-record palette (the sorted distinct ids of the record) and are stored as
``b = ceil(log2 P)``-bit palette indices.

Record checksum: the record is read as u64 words ``w[0..m-1]`` (``m = length / 8``); ``w[0]`` with its
upper 32 bits (the checksum field) cleared is folded into the seeds of four lanes,
``h_l = ((l + 1) * G) ^ m ^ (w[0] & 0xFFFFFFFF)`` with ``G = 0x9E3779B97F4A7C15``; word ``i >= 1`` goes to
lane ``(i - 1) % 4`` through ``h = (h ^ w) * 0xFF51AFD7ED558CCD; h ^= h >> 32``; the lanes are combined
as ``h = 0; for each lane: h = (h ^ h_l) * G; h ^= h >> 29`` and the checksum is
``(h ^ (h >> 32)) & 0xFFFFFFFF``. Every step is a bijection, so any single changed word changes the
64-bit value. The same checksum is stored in the index, so a record read from the store is checked
against both. Decoders also bound-check every field (palette ids < K, indices < P, bit widths,
section lengths) so that even a record with a matching checksum cannot read or write out of bounds.
"""
from __future__ import annotations

import struct

MAGIC = b"TLFSTORE"
VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
UNKNOWN_FINGERPRINT_SIZE = 2**64 - 1
HEADER_SIZE = 128
FLAG_LOSSY = 1

RECORD_FORMAT = 1
RECORD_HEADER_BYTES = 16
SLOT_PARAM_BYTES = 8
LOSSY_CODE_BITS = 8

# Finite float16 values map to order keys in this closed range.
MIN_FINITE_KEY = 0x0400
MAX_FINITE_KEY = 0xFBFF

HEADER_STRUCT = struct.Struct("<8sIIIIIIQQQQQQQQQIIQ")
HEADER_FIELDS = (
    "magic", "version", "flags", "num_classes", "topk", "height", "width", "num_records",
    "data_offset", "data_bytes", "index_offset", "manifest_offset", "manifest_bytes",
    "meta_offset", "meta_bytes", "file_size", "crc", "reserved", "fingerprint_offset",
)
CRC_OFFSET = 104
assert HEADER_STRUCT.size == 120 and HEADER_STRUCT.size <= HEADER_SIZE


def fingerprint_columns(version: int) -> int:
    """u64 columns of the fingerprint section: sizes and hashes, plus seals from version 3."""
    return 3 if version >= 3 else 2


def seal_fingerprints(sizes, hashes, checksums):
    """Version 3 seals: per record a 64-bit mix of its image fingerprint (``sizes``, ``hashes``,
    uint64 ``[N]``) and its record checksum (``checksums``, ``[N]``), as uint64 ``[N]``. Every step
    is a bijection of the running value, so changing any one input changes the seal."""
    import numpy as np

    m, c, g = np.uint64(0xFF51AFD7ED558CCD), np.uint64(0xC4CEB9FE1A85EC53), np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        h = (np.asarray(sizes, np.uint64) ^ g) * m
        h ^= h >> np.uint64(29)
        h = (h ^ np.asarray(hashes, np.uint64)) * c
        h ^= h >> np.uint64(32)
        h = (h ^ np.asarray(checksums).astype(np.uint64)) * m
        h ^= h >> np.uint64(29)
    return h


def align8(n: int) -> int:
    """Round ``n`` up to a multiple of 8."""
    return (n + 7) & ~7


def index_dtype_for(num_classes: int):
    """Class-id dtype of decoded maps: int16 when every id fits, else int32."""
    import numpy as np

    return np.int16 if num_classes <= 32767 else np.int32


def pack_header(**fields) -> bytes:
    """The 128-byte header for ``fields`` (every name in :data:`HEADER_FIELDS` but ``magic``)."""
    values = [MAGIC] + [int(fields.get(name, 0)) for name in HEADER_FIELDS[1:]]
    raw = HEADER_STRUCT.pack(*values)
    return raw + bytes(HEADER_SIZE - len(raw))


def unpack_header(raw: bytes) -> dict:
    """Parse the first :data:`HEADER_SIZE` bytes of a store into a dict of fields."""
    return dict(zip(HEADER_FIELDS, HEADER_STRUCT.unpack_from(raw, 0)))
