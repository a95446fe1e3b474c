"""Checks of user input that raise ``ValueError`` naming the value and the rule.

Every check here is local (no collective), so each rank raises before any collective is issued and no
rank is left waiting in an all-to-all. Checks that read ``cu_seqlens`` values run once per batch, when
the batch plan is built, never once per layer.
"""

from __future__ import annotations

import zlib

import torch


class ConfigError(ValueError, AssertionError):
    """A configuration mamba_cp refuses (a count that does not divide, a layout that does not fit).

    A ``ValueError`` like every other bad-input error here, and an ``AssertionError`` too, because NeMo
    AutoModel's module signals the same conditions with ``assert``: code and tests ported from it that catch
    ``AssertionError`` keep working.
    """


def check_divisible(value: int, divisor: int, what: str, rule: str) -> None:
    """Raise :class:`ConfigError` unless ``value % divisor == 0``; ``what`` names the value, ``rule`` says why."""
    if divisor <= 0 or value % divisor != 0:
        raise ConfigError(f"{what} ({value}) must be divisible by {rule} ({divisor})")


def as_cu_seqlens(cu_seqlens: object) -> torch.Tensor | None:
    """``cu_seqlens`` as a 1-D int tensor: a tensor is returned as it is; a list, tuple or NumPy array of ints
    becomes an int64 CPU tensor; None stays None. Anything else raises ``ValueError`` naming its type."""
    if cu_seqlens is None or isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens
    if isinstance(cu_seqlens, list | tuple) or type(cu_seqlens).__module__ == "numpy":
        try:
            values = torch.as_tensor(cu_seqlens)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ConfigError(f"cu_seqlens could not be read as a 1-D integer sequence: {err}") from err
        if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
            raise ConfigError(f"cu_seqlens must hold integers, got {values.dtype} values")
        return values.to(torch.int64)
    raise ConfigError(
        f"cu_seqlens must be a torch.Tensor, a list/tuple of ints or a NumPy integer array, got "
        f"{type(cu_seqlens).__name__}"
    )


def check_cu_seqlens(cu_seqlens: torch.Tensor, total_tokens: int, multiple_of: int = 1) -> list[int]:
    """Validate packed-sequence boundaries and return them as a Python list.

    Args:
        cu_seqlens: ``[S + 1]`` int32/int64 cumulative sequence lengths of the *global* packed batch.
        total_tokens: the global token count ``T`` the boundaries must end at.
        multiple_of: every sequence length must divide by this (``2 * cp`` for the head-tail layout).

    The one host read of ``cu_seqlens`` happens here, once per batch.
    """
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ConfigError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ConfigError(f"cu_seqlens must have dtype torch.int32 or torch.int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ConfigError(
            f"cu_seqlens must be 1-D with at least 2 entries ([num_seqs + 1]), got shape {tuple(cu_seqlens.shape)}"
        )
    bounds = cu_seqlens.detach().cpu().tolist()
    if bounds[0] != 0:
        raise ConfigError(f"cu_seqlens must start at 0, got cu_seqlens[0]={bounds[0]}")
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=False)]
    for i, n in enumerate(lengths):
        if n <= 0:
            raise ConfigError(
                f"cu_seqlens must be strictly increasing, got cu_seqlens[{i}]={bounds[i]} and "
                f"cu_seqlens[{i + 1}]={bounds[i + 1]} (sequence {i} has length {n})"
            )
    if bounds[-1] != total_tokens:
        raise ConfigError(
            f"cu_seqlens must end at the global token count {total_tokens} "
            f"(local tokens x cp), got cu_seqlens[-1]={bounds[-1]}"
        )
    if multiple_of > 1:
        for i, n in enumerate(lengths):
            if n % multiple_of != 0:
                raise ConfigError(
                    f"sequence {i} has length {n}, which is not a multiple of 2*cp_size ({multiple_of}); "
                    "the head-tail layout cuts every sequence into 2*cp equal chunks, so pad each "
                    f"sequence to a multiple of {multiple_of}"
                )
    return bounds


def batch_dims(local: torch.Tensor, cu_seqlens: torch.Tensor | None) -> tuple[int, int]:
    """``(B, L_local)`` of a sequence-sharded batch: ``[B, L_local, W]``, or packed ``[T_local, W]`` /
    ``[1, T_local, W]`` when ``cu_seqlens`` is given (then ``B = 1``)."""
    if cu_seqlens is None:
        if local.dim() != 3:
            raise ConfigError(f"expected [B, L_local, W] without cu_seqlens, got shape {tuple(local.shape)}")
        batch, length = local.shape[0], local.shape[1]
    else:
        if local.dim() not in (2, 3) or (local.dim() == 3 and local.shape[0] != 1):
            raise ConfigError(f"a packed batch must be [T, W] or [1, T, W], got shape {tuple(local.shape)}")
        batch, length = 1, local.shape[-2]
    if batch == 0 or length == 0:
        raise ConfigError(
            f"an empty batch cannot be run: got shape {tuple(local.shape)} (batch {batch}, {length} local tokens); "
            "every rank needs at least one token of every row"
        )
    return batch, length


FINGERPRINT_SIZE = 5
"""Numbers in a :func:`layout_fingerprint`."""


PACKED_LAYOUTS = ("sequences", "stream")
"""How a packed batch is cut over the CP ranks (``docs/design.md`` §1): ``"sequences"`` cuts every sequence into
``2*cp`` chunks (Transformer Engine's THD layout; every length a multiple of ``2*cp``), ``"stream"`` cuts the whole
pack into ``2*cp`` chunks as if it were one row (only ``T`` a multiple of ``2*cp``)."""


def check_packed_layout(packed_layout: object) -> str:
    """``packed_layout`` itself when it is one of :data:`PACKED_LAYOUTS`, else :class:`ConfigError`."""
    if packed_layout not in PACKED_LAYOUTS:
        raise ConfigError(f"packed_layout must be one of {list(PACKED_LAYOUTS)}, got {packed_layout!r}")
    return packed_layout  # type: ignore[return-value]


def check_packed_batch(cu_seqlens: torch.Tensor, total_tokens: int, cp_size: int, packed_layout: str) -> list[int]:
    """Validate a packed batch for ``cp_size`` ranks in ``packed_layout`` and return its bounds on the host.

    ``"sequences"``: every sequence length a multiple of ``2*cp``; ``"stream"``: the token count ``T`` a multiple of
    ``2*cp`` (sequences of any length). One rank: any lengths."""
    check_packed_layout(packed_layout)
    per_sequence = packed_layout == "sequences" and cp_size > 1
    bounds = check_cu_seqlens(cu_seqlens, total_tokens, multiple_of=2 * cp_size if per_sequence else 1)
    if cp_size > 1 and not per_sequence and total_tokens % (2 * cp_size):
        raise ConfigError(
            f"the packed batch has {total_tokens} tokens, which is not a multiple of 2*cp_size ({2 * cp_size}); "
            f"the stream layout cuts the whole pack into 2*cp equal chunks, so pad the pack to a multiple of "
            f"{2 * cp_size}"
        )
    return bounds


def layout_fingerprint(local_len: int, num_seqs: int, bounds: list[int] | None) -> list[int]:
    """A batch layout as every CP rank must see it, in :data:`FINGERPRINT_SIZE` ints each exact in float32: the
    local length per row (two 20-bit halves), the sequence count (``B`` for BSHD), and a 40-bit hash of the
    global ``cu_seqlens`` bounds (two halves; 0 without ``cu_seqlens``)."""
    digest = 0 if bounds is None else zlib.crc32(str(bounds).encode()) | (len(bounds) << 32)
    return [local_len >> 20, local_len & 0xFFFFF, num_seqs, (digest >> 20) & 0xFFFFF, digest & 0xFFFFF]


def describe_fingerprint(row: list) -> str:
    """A gathered :func:`layout_fingerprint` row in words."""
    local_len, seqs = (int(row[0]) << 20) + int(row[1]), int(row[2])
    digest = (int(row[3]) << 20) + int(row[4])
    packed = f"packed, cu_seqlens hash {digest:#x}" if digest else "not packed"
    return f"{local_len} local tokens per row, {seqs} sequences, {packed}"
