"""Codec round trips are bit-exact for every dtype, size and codec; shuffle pays on bf16 KV."""

from __future__ import annotations

import hashlib

import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.errors import KVTierError, StoreCorruptError
from kvtier.tiers import codec as codec_module
from kvtier.tiers.codec import (
    CHUNK_BYTES,
    Checksum,
    Codec,
    byte_view,
    choose_codec,
    decode_into,
    encode,
    measure_codec,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _random(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


def _round_trip(tensor: torch.Tensor, codec: Codec, out: torch.Tensor | None = None) -> None:
    payload = encode(tensor, codec)
    out = torch.full_like(tensor, 7) if out is None else out
    decode_into(payload, codec, out)
    assert torch.equal(_bytes(out), _bytes(tensor))


@pytest.mark.parametrize("codec", list(Codec))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3,), (1023,), (4097,), (3, 5, 7), (0,), (2, 0), ()])
def test_round_trip_is_bitwise(codec: Codec, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    _round_trip(_random(shape, dtype), codec)


@pytest.mark.parametrize("codec", [Codec.LZ4, Codec.SHUFFLE_LZ4])
def test_round_trip_over_several_chunks(codec: Codec, monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor larger than a chunk, with an odd tail, crosses plane and chunk borders."""
    monkeypatch.setattr(codec_module, "CHUNK_BYTES", 1000)
    tensor = _random((2501,), torch.float32)  # 10004 bytes: 11 chunks, planes of 2501 bytes
    _round_trip(tensor, codec)
    _round_trip(_random((9, 333), torch.bfloat16), codec)


def test_round_trip_at_real_chunk_size() -> None:
    tensor = _random((CHUNK_BYTES // 2 + 5,), torch.bfloat16)  # one chunk and 10 bytes
    for codec in Codec:
        _round_trip(tensor, codec)


def test_special_values_survive() -> None:
    values = [float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, 65504.0, -1.5]
    for dtype in DTYPES:
        tensor = torch.tensor(values).to(dtype)
        for codec in Codec:
            _round_trip(tensor, codec)


def test_decodes_into_a_view_of_a_larger_buffer() -> None:
    """Scenario: the host pool hands out slab views; decode must not touch bytes outside."""
    tensor = _random((4, 9), torch.bfloat16)
    slab = torch.zeros(100, dtype=torch.bfloat16)
    out = slab[10:46].view(4, 9)
    _round_trip(tensor, Codec.SHUFFLE_LZ4, out)
    assert torch.count_nonzero(slab[:10]) == 0 and torch.count_nonzero(slab[46:]) == 0


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=3000),
    dtype=st.sampled_from((*DTYPES, torch.uint8, torch.int64)),
    codec=st.sampled_from(list(Codec)),
)
def test_any_bytes_round_trip(data: bytes, dtype: torch.dtype, codec: Codec) -> None:
    itemsize = torch.empty(0, dtype=dtype).element_size()
    data = data[: len(data) - len(data) % itemsize]
    tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype) if data else None
    tensor = torch.empty(0, dtype=dtype) if tensor is None else tensor
    _round_trip(tensor, codec)


def test_shuffle_compresses_low_entropy_bf16() -> None:
    # Values of similar magnitude: bf16 sign/exponent bytes repeat, mantissa bytes do not.
    tensor = (1 + 0.01 * _random((64, 256), torch.float32)).to(torch.bfloat16)
    raw = tensor.nbytes
    shuffled = len(encode(tensor, Codec.SHUFFLE_LZ4))
    plain = len(encode(tensor, Codec.LZ4))
    assert shuffled < 0.75 * raw
    assert shuffled < plain


def test_raw_encode_is_a_view() -> None:
    tensor = _random((16,), torch.float16)
    payload = encode(tensor, Codec.RAW)
    assert isinstance(payload, memoryview) and len(payload) == tensor.nbytes
    tensor[0] = 42  # same memory
    assert bytes(payload[:2]) == _bytes(tensor)[:2].numpy().tobytes()


def test_byte_view_shares_memory_and_keeps_the_tensor_alive() -> None:
    """Scenario: a view outlives every other reference to its tensor: it still reads the
    tensor's bytes (the view holds the tensor, not only its address)."""
    tensor = _random((3, 5), torch.bfloat16)
    expected = _bytes(tensor).numpy().tobytes()
    view = byte_view(tensor)
    assert view.format == "B" and view.ndim == 1 and view.nbytes == tensor.nbytes
    del tensor
    assert bytes(view) == expected
    pinned_offset = _random((8,), torch.float32)[2:]  # a view into a storage, not at its start
    assert bytes(byte_view(pinned_offset)) == _bytes(pinned_offset).numpy().tobytes()
    assert byte_view(torch.empty(0, dtype=torch.float16)).nbytes == 0
    with pytest.raises(KVTierError, match="contiguous"):
        byte_view(_random((4, 4), torch.float32).t())


@pytest.mark.parametrize(
    ("algorithm", "reference"),
    [
        (Checksum.XXH3_128, xxhash.xxh3_128_hexdigest),
        (Checksum.SHA256, lambda data: hashlib.sha256(data).hexdigest()),
        (Checksum.BLAKE2B_128, lambda data: hashlib.blake2b(data, digest_size=16).hexdigest()),
    ],
)
def test_checksum_is_of_raw_bytes(algorithm: Checksum, reference) -> None:  # noqa: ANN001
    tensor = _random((33,), torch.bfloat16)
    digest = algorithm.of(tensor)
    assert digest == reference(_bytes(tensor).numpy().tobytes())  # what its name says
    changed = tensor.clone()
    changed.view(torch.uint8)[5] ^= 1
    assert algorithm.of(changed) != digest
    assert algorithm.of(tensor.view(torch.int16)) == digest  # bytes, not values
    assert algorithm.cryptographic == (algorithm is not Checksum.XXH3_128)


def test_malformed_payload_is_store_corrupt() -> None:
    tensor = _random((4000,), torch.bfloat16)
    payload = bytearray(encode(tensor, Codec.SHUFFLE_LZ4))
    out = torch.empty_like(tensor)
    with pytest.raises(StoreCorruptError):
        decode_into(payload[:-3], Codec.SHUFFLE_LZ4, out)
    with pytest.raises(StoreCorruptError):
        decode_into(payload, Codec.SHUFFLE_LZ4, torch.empty(4001, dtype=torch.bfloat16))
    with pytest.raises(StoreCorruptError):
        decode_into(b"\x00" * 3, Codec.RAW, out)


def test_non_contiguous_input_is_refused_with_the_fix() -> None:
    with pytest.raises(KVTierError, match="contiguous"):
        encode(_random((4, 4), torch.float32).t(), Codec.LZ4)


def test_measure_and_choose() -> None:
    sample = (1 + 0.01 * _random((256, 64), torch.float32)).to(torch.bfloat16)
    measured = measure_codec(sample)
    assert set(measured) == {codec.value for codec in Codec}
    assert measured["raw"]["ratio"] == 1.0
    assert measured["shuffle+lz4"]["ratio"] > 1.3
    for numbers in measured.values():
        assert numbers["encode_gbps"] > 0 and numbers["decode_gbps"] > 0
    # A very slow disk makes the ratio dominate; an infinitely fast one makes raw win.
    assert choose_codec(sample, disk_write_gbps=1e-6, disk_read_gbps=1e-6) is Codec.SHUFFLE_LZ4
    assert choose_codec(sample, disk_write_gbps=1e9, disk_read_gbps=1e9) is Codec.RAW
    with pytest.raises(KVTierError, match="positive"):
        choose_codec(sample, disk_write_gbps=0, disk_read_gbps=1)
