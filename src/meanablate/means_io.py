"""Means files: safetensors written byte for byte the same for the same means, and read
back only after every part of them has been checked.

The writer serialises the safetensors layout itself (8-byte little-endian header length,
a JSON header with sorted keys, the tensors' bytes in name order) because the
``safetensors`` library keeps metadata in a hash map whose order changes from process to
process: two identical runs would write different bytes. The reader lets ``safetensors``
parse the file (it never unpickles anything) and turns every failure — a truncated file,
corrupted header bytes, a pickle or ``torch.save`` archive renamed ``.safetensors``, bad
metadata — into one :class:`~meanablate.errors.MeansFileError` that names the file.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from meanablate.errors import MeansFileError

__all__ = ["FORMAT", "read_means_file", "write_safetensors"]

FORMAT = "meanablate.Means"

_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def safetensors_bytes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> bytes:
    """The safetensors encoding of ``tensors`` and string ``metadata``, deterministic."""
    header: dict[str, Any] = {"__metadata__": dict(sorted(metadata.items()))}
    chunks, offset = [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        if t.dtype not in _DTYPES:
            raise TypeError(f"tensor {name!r}: dtype {t.dtype} cannot be saved")
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[name] = {
            "dtype": _DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors pads
    return struct.pack("<Q", len(text)) + text + b"".join(chunks)


def write_safetensors(
    path: str | Path, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> None:
    """Write :func:`safetensors_bytes` to ``path``."""
    Path(path).write_bytes(safetensors_bytes(tensors, metadata))


def _sniff(path: Path) -> str:
    """What a file that safetensors cannot read looks like, from its first bytes."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if head.startswith(b"PK\x03\x04"):
        return "is a zip archive (a torch.save file?), not safetensors; it was not unpickled"
    if head[:1] == b"\x80" and len(head) > 1 and head[1] <= 5:
        return "is a Python pickle, not safetensors; it was not unpickled"
    if len(head) < 8:
        return f"is too short to be safetensors ({len(head)} bytes)"
    return "is not a valid safetensors file (truncated or corrupted)"


def _json(meta: Mapping[str, str], key: str, path: Path, kind: type) -> Any:
    if key not in meta:
        raise MeansFileError(path, f"metadata has no {key!r} entry (not written by Means.save?)")
    try:
        value = json.loads(meta[key])
    except (json.JSONDecodeError, TypeError):
        raise MeansFileError(
            path, f"metadata {key!r} is not valid JSON: {meta[key]!r:.80}"
        ) from None
    if not isinstance(value, kind):
        raise MeansFileError(
            path, f"metadata {key!r} should be a JSON {kind.__name__}, got {meta[key]!r:.80}"
        )
    return value


def read_means_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], bool, dict]:
    """``(means, counts, per_position, metadata)`` from a file written by ``Means.save``.

    Every problem is a :class:`~meanablate.errors.MeansFileError` naming ``path``.
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise MeansFileError(path, "no such file")
    raw: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") == FORMAT:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    raw[name] = f.get_tensor(name)
    except Exception as exc:  # SafetensorError is a bare Exception; OSError, ...
        raise MeansFileError(path, f"{_sniff(path)} ({' '.join(str(exc).split())})") from None
    if meta.get("format") != FORMAT:
        raise MeansFileError(
            path, f"not a meanablate means file (format is {meta.get('format')!r})"
        )
    per_position = _json(meta, "per_position", path, bool)
    metadata = _json(meta, "metadata", path, dict) if "metadata" in meta else {}
    sites = _json(meta, "sites", path, list)
    means = {k[len("mean::") :]: v for k, v in raw.items() if k.startswith("mean::")}
    counts = {k[len("count::") :]: v for k, v in raw.items() if k.startswith("count::")}
    stray = sorted(k for k in raw if not k.startswith(("mean::", "count::")))
    if stray:
        raise MeansFileError(path, f"unexpected tensors {stray[:3]} (only mean:: and count::)")
    if sorted(sites) != sorted(means) or sorted(counts) != sorted(means):
        raise MeansFileError(
            path,
            f"sites {sorted(sites)[:4]}, means {sorted(means)[:4]} and counts "
            f"{sorted(counts)[:4]} do not agree",
        )
    for key, mean in means.items():
        _check_pair(path, key, mean, counts, per_position)
    return means, counts, per_position, metadata


def _check_pair(
    path: Path, key: str, mean: Tensor, counts: dict[str, Tensor], per_position: bool
) -> None:
    count = counts[key]
    if not mean.dtype.is_floating_point or not count.dtype.is_floating_point:
        raise MeansFileError(path, f"site {key}: means and counts must be float tensors")
    from meanablate.stats import is_pattern_key  # (stats imports this module)

    if is_pattern_key(key):  # [head, q, k] means, counted per (q, k) pair
        if mean.ndim != 3 or count.numel() != mean.shape[1] * mean.shape[2]:
            raise MeansFileError(
                path,
                f"site {key}: attention-pattern mean {tuple(mean.shape)} and count "
                f"{tuple(count.shape)} do not agree ([head, q, k] and [q, k])",
            )
        counts[key] = count.reshape(mean.shape[1:])
    elif per_position:
        if mean.ndim < 1 or count.shape != mean.shape[:1]:
            raise MeansFileError(
                path,
                f"site {key}: per-position mean {tuple(mean.shape)} and count "
                f"{tuple(count.shape)} do not agree ([pos, ...] and [pos])",
            )
    elif count.numel() != 1:
        raise MeansFileError(path, f"site {key}: count has shape {tuple(count.shape)}, wanted 1")
    else:
        counts[key] = count.reshape(())
    if bool(torch.any(count < 0)) or not bool(torch.all(torch.isfinite(count))):
        raise MeansFileError(path, f"site {key}: token counts must be finite and >= 0")
