"""``bitplan apply``: write a model as a really bit-packed safetensors file, and load it back.

The artifact is the proof of the byte accounting (DESIGN §3): its tensor bytes equal the plan's
``total_bytes``. Per planned weight (viewed as ``[rows, cols]``, see
:mod:`bitplan.sensitivity.layers`):

- ``int{b}…``: ``<param>.qdata`` — one uint8 stream per tensor holding the codes (row-major)
  followed by the zero points (asym only), ``b`` bits each (:mod:`bitplan.search.packing`);
  symmetric codes are stored offset by ``2^(b-1)``. ``<param>.scales`` — float16
  ``[rows, groups/row]``. So bytes = ``ceil((numel·b + [asym] n_groups·b)/8) + 2·n_groups``,
  which is the formula's single ceiling because ``n_groups·16`` is a whole number of bytes.
- ``fp8-e4m3``: ``<param>.qdata`` float8_e4m3fn ``[rows, cols]`` and float16 scales ``[rows, 1]``.
- llama.cpp block formats (``q8_0`` … ``q2_k``): ``<param>.qdata`` only, uint8
  ``[rows, cols/block · type_size]`` — ggml's own blocks, scales inside, byte for byte what a
  GGUF file stores for the tensor (:mod:`bitplan.sensitivity.ggml_blocks`), so a GGUF writer
  copies it verbatim.
- ``fp16``/``bf16``/``fp32``: ``<param>`` cast to that dtype, in the parameter's own shape.

Unplanned parameters are stored as-is under their name; a tied parameter is stored once. The
safetensors metadata holds one JSON per planned parameter (format, kind, shape, rows, cols,
dtype) and ``__bitplan__`` (schema, model ref). Persistent buffers (e.g. BatchNorm statistics)
are no parameters and not part of the plan's bytes; they go to ``buffers.safetensors`` so the
reloaded model still works. The writer streams: it computes the header from the formats, then
quantizes one chunk of rows at a time, so memory stays at about one layer's packed codes.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from bitplan.search.packing import BitPacker, packed_size, unpack_bits
from bitplan.search.plans import Plan
from bitplan.search.targets import check_model_hash
from bitplan.sensitivity.errors import InputError
from bitplan.sensitivity.formats import (
    FLOAT_DTYPES,
    QuantCodes,
    QuantFormat,
    dequantize,
    parse_format,
    quantize_codes,
    tensor_bytes,
)
from bitplan.sensitivity.layers import QuantLayer, get_weight, weight_matrix
from bitplan.sensitivity.rounder import Rounder

if TYPE_CHECKING:
    from bitplan.sensitivity.models import LoadedModel

__all__ = [
    "ARTIFACT_SCHEMA",
    "ArtifactReport",
    "apply_plan",
    "load_artifact",
    "tensor_bytes_of",
    "tensor_sizes_of",
    "write_artifact",
]

log = logging.getLogger(__name__)

ARTIFACT_SCHEMA = "bitplan.artifact/v1"
MODEL_FILE = "model.safetensors"
BUFFERS_FILE = "buffers.safetensors"
PLAN_FILE = "plan.json"
_INFO_KEY = "__bitplan__"
_SAME_ARCH = "load it into a fresh instance of the architecture it was written from"
# Rows are quantized in chunks of at most this many weights, so the float32 temporaries of one
# chunk (a handful of 16 MiB buffers) stay small however large the layer is.
_CHUNK_ELEMENTS = 1 << 22
# safetensors aligns the start of the data section to 8 bytes by padding the header with spaces.
_HEADER_ALIGN = 8
_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the file: its header entry and the function that streams its bytes."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    write: Callable[[BinaryIO], int]


@dataclass(frozen=True)
class ArtifactReport:
    """What a ``bitplan apply`` target wrote (every writer of
    :data:`~bitplan.search.targets.TARGETS` returns one, or a subclass with more fields).

    ``path`` is what the target's runtime opens: ``model.safetensors`` for ``bitplan`` (its
    folder is what :func:`load_artifact` takes), ``model.gguf`` for ``gguf``, and the output
    folder itself for the Hugging Face folders of ``torchao`` and ``compressed-tensors``.
    ``tensor_bytes`` maps each stored tensor's name (as the file names it) to its data bytes;
    ``total_bytes`` is their sum, headers excluded (for ``bitplan`` exactly the plan's
    ``total_bytes``; the runtimes' layouts add bytes their reports explain). ``plan_path`` is
    the copy of the plan written beside the model, None where the format has no room for one
    (a lone ``model.gguf``).
    """

    path: Path
    tensor_bytes: dict[str, int]
    total_bytes: int
    plan_path: Path | None

    def __fspath__(self) -> str:
        return str(self.path)


def _raw(t: torch.Tensor) -> memoryview:
    """The little-endian bytes of ``t`` (moved to the CPU), without a copy."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
    return flat.view(torch.uint8).numpy().data


def _row_step(cols: int) -> int:
    """Rows a chunk: at most ``_CHUNK_ELEMENTS`` weights, at least one row."""
    return max(1, _CHUNK_ELEMENTS // max(cols, 1))


def _n_codes(fmt: QuantFormat, rows: int, cols: int, groups_per_row: int) -> int:
    """Values in an integer ``qdata`` stream: every code, then a zero point a group (asym)."""
    return rows * cols + (0 if fmt.symmetric else rows * groups_per_row)


def _row_chunks(matrix: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """``(first row, rows)`` chunks of a ``[rows, cols]`` matrix."""
    rows, cols = matrix.shape
    step = _row_step(cols)
    for start in range(0, rows, step):
        yield start, matrix[start : start + step]


def _plain(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> _Tensor:
    """``tensor`` cast to ``dtype`` in its own shape, written a chunk of elements at a time."""
    if dtype not in _ST_DTYPES:
        raise InputError(f"parameter {name} has dtype {dtype}, which safetensors cannot store")

    def write(f: BinaryIO) -> int:
        flat = tensor.detach().reshape(-1)  # (numel,)
        return sum(
            f.write(_raw(flat[s : s + _CHUNK_ELEMENTS].to(dtype)))
            for s in range(0, flat.numel(), _CHUNK_ELEMENTS)
        )

    return _Tensor(name, dtype, tuple(tensor.shape), tensor.numel() * dtype.itemsize, write)


def _ggml_blocks(param: str, matrix: torch.Tensor, fmt: QuantFormat) -> _Tensor:
    """``<param>.qdata``: ggml's block bytes of a ``[rows, cols]`` matrix, written by row chunks
    (blocks never straddle rows, so the chunks' bytes are the whole matrix's)."""
    rows, cols = matrix.shape
    nbytes = tensor_bytes(fmt, rows, cols)

    def write(f: BinaryIO) -> int:
        return sum(f.write(_raw(quantize_codes(chunk, fmt).q)) for _, chunk in _row_chunks(matrix))

    return _Tensor(f"{param}.qdata", torch.uint8, (rows, nbytes // max(rows, 1)), nbytes, write)


def _quantized(
    param: str, matrix: torch.Tensor, fmt: QuantFormat, rounder: Rounder
) -> list[_Tensor]:
    """``<param>.qdata`` and ``<param>.scales`` of a ``[rows, cols]`` matrix in ``fmt``
    (``qdata`` alone for a ggml format: its scales live in its blocks), rounded by ``rounder``
    as the format says."""
    if fmt.kind == "ggml":
        return [_ggml_blocks(param, matrix, fmt)]
    rows, cols = matrix.shape
    groups_per_row = fmt.n_groups(rows, cols) // max(rows, 1)
    scales: list[torch.Tensor] = []

    def write_fp8(f: BinaryIO) -> int:
        written = 0
        for _, chunk in _row_chunks(matrix):
            codes = quantize_codes(chunk, fmt)
            written += f.write(_raw(codes.q))
            scales.append(codes.scale.cpu())
        return written

    def write_int(f: BinaryIO) -> int:
        packer, zeros, written = BitPacker(fmt.bits), [], 0
        offset = 1 << (fmt.bits - 1) if fmt.symmetric else 0  # signed [-qmax, qmax] -> unsigned
        for row0, chunk in _row_chunks(matrix):
            codes = rounder.codes(param, chunk, fmt, row0=row0)
            written += f.write(packer.add(codes.q.to(torch.int16) + offset))
            scales.append(codes.scale.cpu())
            if codes.zero is not None:
                zeros.append(codes.zero.cpu())
        if zeros:
            written += f.write(packer.add(torch.cat(zeros)))
        return written + f.write(packer.finish())

    def write_scales(f: BinaryIO) -> int:
        written = sum(f.write(_raw(s)) for s in scales)
        scales.clear()
        return written

    if fmt.kind == "fp8":
        qdata = _Tensor(f"{param}.qdata", torch.float8_e4m3fn, (rows, cols), rows * cols, write_fp8)
    else:
        nbytes = packed_size(_n_codes(fmt, rows, cols, groups_per_row), fmt.bits)
        qdata = _Tensor(f"{param}.qdata", torch.uint8, (nbytes,), nbytes, write_int)
    n_scales = rows * groups_per_row
    return [
        qdata,
        _Tensor(
            f"{param}.scales", torch.float16, (rows, groups_per_row), 2 * n_scales, write_scales
        ),
    ]


def _resolve_formats(
    layers: list[QuantLayer], formats: Mapping[str, QuantFormat]
) -> dict[str, tuple[QuantLayer, QuantFormat]]:
    """``param -> (layer, format)``, one entry per stored tensor (a tie group once)."""
    unknown = sorted(set(formats) - {lay.name for lay in layers})
    if unknown:
        raise InputError(f"formats name layers the model does not plan: {', '.join(unknown[:5])}")
    groups: dict[str, list[QuantLayer]] = {}
    for lay in layers:
        groups.setdefault(lay.param, []).append(lay)
    resolved = {}
    for param, members in groups.items():
        chosen = {formats[m.name] for m in members if m.name in formats}
        if not chosen:
            raise InputError(f"no format for layer {members[0].name}; give every planned layer one")
        if len(chosen) > 1:
            raise InputError(
                f"tied layers of {param} have different formats "
                f"{sorted(f.name for f in chosen)}; a shared tensor takes one format"
            )
        resolved[param] = (members[0], chosen.pop())
    return resolved


def _layout(
    model: nn.Module,
    layers: list[QuantLayer],
    formats: Mapping[str, QuantFormat],
    rounder: Rounder | None = None,
) -> tuple[list[_Tensor], dict[str, str]]:
    """Every tensor of ``model.safetensors`` in file order, and the per-parameter metadata."""
    rounder = rounder or Rounder()
    resolved = _resolve_formats(layers, formats)
    planned_ids = {id(get_weight(model, lay)): param for param, (lay, _) in resolved.items()}
    tensors: list[_Tensor] = []
    meta: dict[str, str] = {}
    for name, p in model.named_parameters():  # yields a shared tensor once
        param = planned_ids.get(id(p))
        if param is None:
            tensors.append(_plain(name, p, p.dtype))
            continue
        lay, fmt = resolved[param]
        matrix = weight_matrix(p.detach(), lay.kind)
        rows, cols = matrix.shape
        meta[name] = json.dumps(
            {
                "format": fmt.base_name,
                "rounding": fmt.rounding,
                "kind": lay.kind,
                "shape": list(p.shape),
                "rows": rows,
                "cols": cols,
                "dtype": str(p.dtype).removeprefix("torch."),
            }
        )
        if fmt.kind == "float":
            tensors.append(_plain(name, p, FLOAT_DTYPES[fmt.name]))
        else:
            tensors.extend(_quantized(lay.param, matrix, fmt, rounder))
    return tensors, meta


def _write_safetensors(path: Path, tensors: list[_Tensor], metadata: dict[str, str]) -> None:
    """Stream ``tensors`` into a safetensors file without holding them all in memory."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + t.nbytes],
        }
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % _HEADER_ALIGN)
    partial = path.with_name(path.name + ".partial")  # a crash leaves no plausible-looking file
    try:
        with partial.open("wb") as f:
            f.write(struct.pack("<Q", len(blob)))  # 8-byte little-endian header length
            f.write(blob)
            for t in tensors:
                written = t.write(f)
                if written != t.nbytes:
                    raise RuntimeError(f"{t.name}: wrote {written} bytes, header says {t.nbytes}")
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)


def write_artifact(
    *,
    model: nn.Module,
    layers: list[QuantLayer],
    formats: Mapping[str, QuantFormat],
    out_dir: Path,
    plan: Plan | None = None,
    model_ref: str | None = None,
    rounder: Rounder | None = None,
) -> ArtifactReport:
    """Write ``out_dir/model.safetensors`` (+ ``buffers.safetensors``, ``plan.json``).

    ``formats`` maps layer FQNs to formats; members of a tie group may each be listed (with one
    format) or only one of them. Every layer of ``layers`` needs a format. Formats with a
    rounding other than rtn are rounded by ``rounder``.
    """
    out_dir = Path(out_dir)
    tensors, meta = _layout(model, layers, formats, rounder)
    meta[_INFO_KEY] = json.dumps({"schema": ARTIFACT_SCHEMA, "model_ref": model_ref})
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MODEL_FILE
    with torch.no_grad():
        _write_safetensors(path, tensors, meta)
    buffers = _persistent_buffers(model)
    (out_dir / BUFFERS_FILE).unlink(missing_ok=True)  # never pair a stale file with new weights
    if buffers:
        _write_safetensors(
            out_dir / BUFFERS_FILE, [_plain(n, b, b.dtype) for n, b in buffers.items()], {}
        )
    plan_path = out_dir / PLAN_FILE
    plan_path.unlink(missing_ok=True)
    if plan is not None:
        plan.write(plan_path)
    sizes = {t.name: t.nbytes for t in tensors}
    total = sum(sizes.values())
    log.info("wrote %s: %d tensors, %d tensor bytes", path, len(sizes), total)
    return ArtifactReport(
        path=path,
        tensor_bytes=sizes,
        total_bytes=total,
        plan_path=plan_path if plan is not None else None,
    )


def apply_plan(
    *, model: LoadedModel, plan: Plan, out_dir: Path, rounder: Rounder | None = None
) -> ArtifactReport:
    """``bitplan apply``: write ``model`` quantized per a plan (DESIGN §4), checking it fits.

    The plan must be for this model (same weights hash) and its ``total_bytes`` must equal the
    artifact's; both are checked before anything is written. (Reading and validating a plan file
    is :func:`~bitplan.search.plans.read_plan`'s job.)
    """
    check_model_hash(model, plan)
    formats = {lay.name: lay.format for lay in plan.layers}
    expected = plan.totals.total_bytes
    tensors, _ = _layout(model.module, model.layers, formats)
    actual = sum(t.nbytes for t in tensors)
    if actual != expected:
        raise InputError(
            f"the plan says {expected} bytes but this model packs to {actual}; "
            "was it made with other --exclude patterns?"
        )
    return write_artifact(
        model=model.module,
        layers=model.layers,
        formats=formats,
        out_dir=out_dir,
        plan=plan,
        model_ref=model.ref,
        rounder=rounder,
    )


def _persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries that are not parameters, each shared tensor once."""
    params = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    seen: set[int] = set()
    out = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if name not in params and id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _header(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # 8-byte little-endian header length
            header = json.loads(f.read(size))
    except (OSError, struct.error, ValueError) as err:
        raise InputError(f"{path.name} is not a readable safetensors file ({err})") from None
    if not isinstance(header, dict):
        raise InputError(f"{path.name} is not a safetensors file (header is not a JSON object)")
    return header


def tensor_sizes_of(path: Path) -> dict[str, int]:
    """``{tensor name: data bytes}`` of a safetensors file, read from its header."""
    header = _header(Path(path))
    try:
        return {
            k: e["data_offsets"][1] - e["data_offsets"][0]
            for k, e in header.items()
            if k != "__metadata__"
        }
    except (KeyError, TypeError, IndexError):
        raise InputError(f"{Path(path).name} has a malformed safetensors header") from None


def tensor_bytes_of(path: Path) -> int:
    """Sum of the tensor data bytes of a safetensors file (file size minus its header)."""
    return sum(tensor_sizes_of(path).values())


def _open(path: Path) -> Any:
    """``safe_open`` with a one-line :class:`InputError` for a missing or corrupt file."""
    if not path.is_file():
        raise InputError(f"no {path.name} in {path.parent}; pass a folder that bitplan apply wrote")
    _header(path)
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise InputError(f"{path.name} is not a valid safetensors file ({err})") from None


def _check_names(path: Path, found: set[str], expected: set[str]) -> None:
    unknown, missing = sorted(found - expected), sorted(expected - found)
    if unknown:
        raise InputError(
            f"{path.name} has tensors the model does not have: "
            f"{', '.join(unknown[:5])}; {_SAME_ARCH}"
        )
    if missing:
        raise InputError(
            f"{path.name} lacks tensors the model needs: {', '.join(missing[:5])}; {_SAME_ARCH}"
        )


def _load_plain(f: Any, name: str, target: torch.Tensor) -> None:
    shape = tuple(f.get_slice(name).get_shape())
    if shape != tuple(target.shape):
        raise InputError(
            f"{name} has shape {list(shape)} in the artifact but "
            f"{list(target.shape)} in the model; {_SAME_ARCH}"
        )
    target.copy_(f.get_tensor(name))


def _ggml_codes(f: Any, name: str, fmt: QuantFormat, rows: int, cols: int) -> QuantCodes:
    """ggml's block bytes of one planned weight, as :func:`quantize_codes` made them."""
    qdata = f.get_tensor(f"{name}.qdata")
    want = (rows, tensor_bytes(fmt, rows, cols) // max(rows, 1))
    if qdata.dtype != torch.uint8 or tuple(qdata.shape) != want:
        raise InputError(
            f"{name} is stored as {qdata.dtype} {list(qdata.shape)}, "
            f"{fmt.name} of [{rows}, {cols}] needs uint8 {list(want)}"
        )
    return QuantCodes(q=qdata, scale=qdata.new_empty(rows, 0, dtype=torch.float16), zero=None)


def _codes(f: Any, name: str, fmt: QuantFormat, rows: int, cols: int) -> QuantCodes:
    """The codes of one planned weight as :func:`quantize_codes` made them."""
    if fmt.kind == "ggml":
        return _ggml_codes(f, name, fmt, rows, cols)
    scale = f.get_tensor(f"{name}.scales")
    groups = fmt.n_groups(rows, cols) // max(rows, 1)
    qdata = f.get_tensor(f"{name}.qdata")
    if fmt.kind == "fp8":
        want_q: tuple[int, ...] = (rows, cols)
    else:
        n_values = _n_codes(fmt, rows, cols, groups)
        want_q = (packed_size(n_values, fmt.bits),)
    if tuple(scale.shape) != (rows, groups) or tuple(qdata.shape) != want_q:
        raise InputError(
            f"{name} is stored with shapes {list(qdata.shape)}/{list(scale.shape)}, "
            f"{fmt.name} of [{rows}, {cols}] needs {list(want_q)}/[{rows}, {groups}]"
        )
    if fmt.kind == "fp8":
        return QuantCodes(q=qdata, scale=scale, zero=None)
    values = unpack_bits(qdata, fmt.bits, n_values)
    q = values[: rows * cols].view(rows, cols)  # (rows, cols)
    if fmt.symmetric:
        return QuantCodes(q=q - (1 << (fmt.bits - 1)), scale=scale, zero=None)
    return QuantCodes(q=q, scale=scale, zero=values[rows * cols :].view(rows, groups))  # (rows, G)


def _load_planned(
    f: Any, name: str, param: torch.Tensor, info: dict[str, Any], fmt: QuantFormat
) -> None:
    if list(info["shape"]) != list(param.shape):
        raise InputError(
            f"{name} has shape {info['shape']} in the artifact but "
            f"{list(param.shape)} in the model; {_SAME_ARCH}"
        )
    if fmt.kind == "float":
        _load_plain(f, name, param)
        return
    matrix = weight_matrix(param, info["kind"])
    rows, cols = matrix.shape
    codes = _codes(f, name, fmt, rows, cols)
    step = _row_step(cols)
    for s in range(0, rows, step):  # the same row chunks as fake_quantize: same float32 values
        zero = None if codes.zero is None else codes.zero[s : s + step]
        part = QuantCodes(q=codes.q[s : s + step], scale=codes.scale[s : s + step], zero=zero)
        matrix[s : s + step].copy_(dequantize(part, fmt, cols))


def load_artifact(out_dir: Path, module: nn.Module) -> nn.Module:
    """Load an artifact into ``module`` (a fresh instance of the same architecture), in place.

    Quantized weights are unpacked and dequantized exactly as the fake-quant reference does,
    then cast to each parameter's dtype; the module's outputs equal the fake-quant model's.
    """
    out_dir = Path(out_dir)
    path = out_dir / MODEL_FILE
    params = dict(module.named_parameters())  # a tied parameter once, as written
    with _open(path) as f, torch.no_grad():
        meta = f.metadata() or {}
        try:
            info = json.loads(meta.get(_INFO_KEY, "{}"))
            planned = {k: json.loads(v) for k, v in meta.items() if k != _INFO_KEY}
        except ValueError:
            raise InputError(f"{path.name} has unreadable bitplan metadata") from None
        if info.get("schema") != ARTIFACT_SCHEMA:
            raise InputError(
                f"{path.name} is not a bitplan artifact (schema "
                f"{info.get('schema')!r}, expected {ARTIFACT_SCHEMA})"
            )
        formats = {n: parse_format(i["format"]) for n, i in planned.items()}  # once, on reading
        quantized = {n for n, fmt in formats.items() if n in params and fmt.is_quantized}
        expected = {n for n in params if n not in quantized}
        expected |= {
            f"{n}.{part}"
            for n in quantized
            for part in (("qdata",) if formats[n].kind == "ggml" else ("qdata", "scales"))
        }
        _check_names(path, set(f.keys()), expected)
        for name, param in params.items():
            if name in planned:
                _load_planned(f, name, param, planned[name], formats[name])
            else:
                _load_plain(f, name, param)
    buffers = _persistent_buffers(module)
    if buffers or (out_dir / BUFFERS_FILE).exists():
        with _open(out_dir / BUFFERS_FILE) as f, torch.no_grad():
            _check_names(out_dir / BUFFERS_FILE, set(f.keys()), set(buffers))
            for name, buf in buffers.items():
                _load_plain(f, name, buf)
    log.info("loaded %s into %s", path, type(module).__name__)
    return module
