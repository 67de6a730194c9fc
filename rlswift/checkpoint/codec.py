"""Exact, pickle-free encoding of hook state for checkpoints.

`encode(obj)` splits a hook's `state_dict()` into a JSON-able *tree* (written with orjson) and a flat
`dict[str, torch.Tensor]` (written with safetensors). `decode(tree, tensors)` rebuilds the original object.

What round-trips exactly (bit for bit):
  dict (any keys the codec can encode, insertion order kept; OrderedDict stays OrderedDict), list, tuple
  (stays a tuple: `random.getstate()` needs it), str (incl. lone surrogates), int of any size, float (incl.
  nan payloads, inf, -0.0), bool, None, bytes, torch.Tensor (any safetensors dtype, incl. bf16, 0-dim,
  non-contiguous views, tensors sharing storage: stored as independent contiguous copies), numpy arrays and
  numpy scalars (same dtype on return), torch.dtype, torch.Size, torch.device.

Tree format: plain JSON for plain values. Everything else is a *marker*: an object with exactly one key that
starts with "$" (e.g. {"$tuple": [...]}). A user dict that could be mistaken for a marker (one key starting
with "$") or that has non-str keys is written as {"$dict": [[key, value], ...]}, so user data can never be
misread as a marker.
"""

from __future__ import annotations

import base64
import math
import struct
from collections import OrderedDict
from typing import Any, Callable

import numpy as np
import torch

__all__ = ["CodecError", "encode", "decode", "SUPPORTED_TYPES_HINT"]

# Signed 64-bit range: orjson refuses ints beyond 64 bits, and we keep JSON ints portable for other readers.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

# torch dtypes safetensors can store (complex128 and friends are refused with a clear message).
_SAFETENSORS_DTYPES = {
    torch.float64, torch.float32, torch.float16, torch.bfloat16,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    torch.uint16, torch.uint32, torch.uint64, torch.complex64,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _SAFETENSORS_DTYPES.add(getattr(torch, _name))

# numpy dtypes stored as tensors through torch (native byte order only); others go base64 in the tree.
_NP_VIA_TORCH = {np.dtype(t) for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.int16,
                                        np.int8, np.uint8, np.bool_, np.uint16, np.uint32, np.uint64)}

SUPPORTED_TYPES_HINT = (
    "state_dict() may only contain dict, list, tuple, str, int, float, bool, None, bytes, torch.Tensor, "
    "numpy arrays/scalars, torch.dtype/Size/device; convert other objects to those "
    "(e.g. a dataclass with dataclasses.asdict, a Path with str, a set with sorted(list))"
)


class CodecError(TypeError):
    """A value cannot be stored in (or read from) a checkpoint; the message names hook, key path and type."""


def _path_str(path: tuple) -> str:
    """Render a key path like `state_dict()['opt'][0]` for error messages and tensor names."""
    return "state_dict()" + "".join(f"[{p!r}]" for p in path)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _is_plain_float(x: float) -> bool:
    # orjson writes nan/inf as null, and a "-0.0" round trip is fine but explicit bits are cheaper to reason
    # about: anything that is not a finite, non-negative-zero float is stored as its 8 raw bytes.
    return math.isfinite(x) and not (x == 0.0 and math.copysign(1.0, x) < 0)


def _is_utf8_safe(s: str) -> bool:
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:  # lone surrogates: orjson refuses them
        return False


class _Encoder:
    def __init__(self, hook: str | None, stage: Callable[[str, torch.Tensor], torch.Tensor] | None) -> None:
        self.hook = hook
        self.stage = stage
        self.tensors: dict[str, torch.Tensor] = {}
        self._seen_storage: set[int] = set()
        self._active: set[int] = set()  # containers on the current path (cycle detection)

    def fail(self, path: tuple, obj: Any, why: str | None = None) -> CodecError:
        who = f"hook {self.hook!r}" if self.hook else "value"
        what = why or f"type {type(obj).__module__}.{type(obj).__qualname__} is not supported"
        return CodecError(f"{who}: cannot checkpoint {_path_str(path)}: {what}. {SUPPORTED_TYPES_HINT}.")

    def tensor_name(self, path: tuple) -> str:
        # Readable names help `rlswift ckpt inspect`; the counter suffix keeps them unique even when keys
        # contain the separator.
        base = "/".join(str(p) for p in path) or "<root>"
        name, i = base, 1
        while name in self.tensors:
            name, i = f"{base}#{i}", i + 1
        return name

    def add_tensor(self, path: tuple, t: torch.Tensor) -> str:
        t = t.detach()
        name = self.tensor_name(path)
        if self.stage is not None:
            t = self.stage(name, t)  # a copy later training cannot change (async save)
        else:
            # Store an independent dense CPU copy unless the tensor already is one: safetensors refuses shared
            # storage (tied embeddings) and views into bigger storages.
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            owns_all = (t.device.type == "cpu" and t.is_contiguous() and t.storage_offset() == 0
                        and storage.nbytes() == t.numel() * t.element_size() and ptr not in self._seen_storage)
            if not owns_all:  # one copy, also from another device
                t = (t.clone(memory_format=torch.contiguous_format) if t.device.type == "cpu"
                     else t.to("cpu", memory_format=torch.contiguous_format))
            if ptr:
                self._seen_storage.add(ptr)
        if type(t) is not torch.Tensor:  # e.g. nn.Parameter: store the plain data
            t = t.as_subclass(torch.Tensor)
        self.tensors[name] = t
        return name

    def enc(self, obj: Any, path: tuple) -> Any:
        t = type(obj)
        if obj is None or t is bool:
            return obj
        if t is int:
            return obj if _INT64_MIN <= obj <= _INT64_MAX else {"$int": str(obj)}
        if t is float:
            return obj if _is_plain_float(obj) else {"$float": struct.pack("<d", obj).hex()}
        if t is str:
            return obj if _is_utf8_safe(obj) else {"$str": _b64(obj.encode("utf-8", "surrogatepass"))}
        if t is bytes:
            return {"$bytes": _b64(obj)}
        if isinstance(obj, torch.Tensor):
            return self.enc_tensor(obj, path)
        if isinstance(obj, np.ndarray):
            return self.enc_ndarray(obj, path)
        if isinstance(obj, np.generic):
            if obj.dtype.hasobject:
                raise self.fail(path, obj, "numpy object scalars are not supported")
            return {"$npscalar": {"dtype": np.lib.format.dtype_to_descr(obj.dtype), "data": _b64(obj.tobytes())}}
        if t is torch.dtype:
            return {"$dtype": str(obj).removeprefix("torch.")}
        if t is torch.Size:
            return {"$size": list(obj)}
        if t is torch.device:
            return {"$device": str(obj)}
        if t in (dict, OrderedDict, list, tuple):
            if id(obj) in self._active:
                raise self.fail(path, obj, "it contains itself (a reference cycle)")
            self._active.add(id(obj))
            try:
                return self.enc_container(obj, path)
            finally:
                self._active.discard(id(obj))
        raise self.fail(path, obj)

    def enc_container(self, obj: Any, path: tuple) -> Any:
        t = type(obj)
        if t is list:
            return [self.enc(v, path + (i,)) for i, v in enumerate(obj)]
        if t is tuple:
            return {"$tuple": [self.enc(v, path + (i,)) for i, v in enumerate(obj)]}
        plain = (t is dict and all(type(k) is str and _is_utf8_safe(k) for k in obj)
                 and not (len(obj) == 1 and next(iter(obj)).startswith("$")))
        if plain:
            return {k: self.enc(v, path + (k,)) for k, v in obj.items()}
        pairs = [[self.enc(k, path + ("<key>",)), self.enc(v, path + (k,))] for k, v in obj.items()]
        return {"$odict" if t is OrderedDict else "$dict": pairs}

    def enc_tensor(self, obj: torch.Tensor, path: tuple) -> Any:
        if obj.layout != torch.strided or obj.is_quantized or obj.device.type == "meta":
            raise self.fail(path, obj, f"tensor with layout {obj.layout}, device {obj.device} "
                                       f"(quantized={obj.is_quantized}) cannot be stored; return a dense tensor")
        if obj.dtype not in _SAFETENSORS_DTYPES:
            raise self.fail(path, obj, f"tensor dtype {obj.dtype} is not storable in safetensors; "
                                       "convert it (e.g. complex128 -> torch.view_as_real)")
        name = self.add_tensor(path, obj)
        return {"$tensor": {"key": name, "device": str(obj.device)}}

    def enc_ndarray(self, obj: np.ndarray, path: tuple) -> Any:
        if obj.dtype.hasobject:
            raise self.fail(path, obj, "numpy arrays of dtype object are not supported; use a list")
        if obj.dtype in _NP_VIA_TORCH and obj.dtype.isnative:
            # A C-ordered copy (np.ascontiguousarray would turn 0-d into 1-d): never alias live user memory.
            arr = np.array(obj, order="C", copy=True)
            name = self.add_tensor(path, torch.from_numpy(arr))
            return {"$ndarray": {"key": name, "dtype": obj.dtype.str}}
        # Exotic dtypes (big-endian, structured, strings, datetimes): raw bytes in the tree.
        return {"$ndarray": {"dtype": np.lib.format.dtype_to_descr(obj.dtype), "shape": list(obj.shape),
                             "data": _b64(obj.tobytes(order="C"))}}


def encode(obj: Any, hook: str | None = None,
           stage: Callable[[str, torch.Tensor], torch.Tensor] | None = None) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split `obj` into a JSON-able tree (for orjson) and a dict of tensors (for safetensors).

    `hook` only names the owner in error messages. Raises `CodecError` naming the hook, the key path and the
    type for any value outside the supported set (see module docstring).

    The tensors are dense CPU tensors: without `stage`, a tensor that already is one (owning its whole storage)
    is stored as is, without a copy, so it must not change before it is written; others are copied. With
    `stage`, every tensor goes through `stage(tensor_name, tensor)`, which returns the dense CPU tensor to store
    (the async save passes copies into reusable buffers). The tree never aliases `obj`'s mutable objects.
    """
    enc = _Encoder(hook, stage)
    tree = enc.enc(obj, ())
    return tree, enc.tensors


class _Decoder:
    def __init__(self, tensors: dict[str, torch.Tensor], hook: str | None) -> None:
        self.tensors = tensors
        self.hook = hook

    def fail(self, msg: str) -> CodecError:
        who = f"hook {self.hook!r}: " if self.hook else ""
        return CodecError(f"{who}corrupt or unsupported checkpoint tree: {msg}")

    def tensor(self, key: str) -> torch.Tensor:
        try:
            return self.tensors[key]
        except KeyError:
            raise self.fail(f"tensor {key!r} is missing from the safetensors file") from None

    def dec(self, node: Any) -> Any:
        if isinstance(node, list):
            return [self.dec(v) for v in node]
        if not isinstance(node, dict):
            return node  # None, bool, int, float, str
        if len(node) == 1:
            (key, val), = node.items()
            if key.startswith("$"):
                return self.dec_marker(key, val)
        return {k: self.dec(v) for k, v in node.items()}

    def dec_marker(self, key: str, val: Any) -> Any:
        if key == "$tuple":
            return tuple(self.dec(v) for v in val)
        if key in ("$dict", "$odict"):
            out = {} if key == "$dict" else OrderedDict()
            for k, v in val:
                out[self.dec(k)] = self.dec(v)
            return out
        if key == "$int":
            return int(val)
        if key == "$float":
            return struct.unpack("<d", bytes.fromhex(val))[0]
        if key == "$str":
            return _unb64(val).decode("utf-8", "surrogatepass")
        if key == "$bytes":
            return _unb64(val)
        if key == "$tensor":
            return self.tensor(val["key"])
        if key == "$ndarray":
            if "key" in val:
                arr = self.tensor(val["key"]).numpy()
                return arr.view(np.dtype(val["dtype"])) if arr.dtype != np.dtype(val["dtype"]) else arr
            dtype = np.lib.format.descr_to_dtype(_descr(val["dtype"]))
            return np.frombuffer(_unb64(val["data"]), dtype=dtype).reshape(val["shape"]).copy()
        if key == "$npscalar":
            dtype = np.lib.format.descr_to_dtype(_descr(val["dtype"]))
            return np.frombuffer(_unb64(val["data"]), dtype=dtype)[0]
        if key == "$dtype":
            dt = getattr(torch, val, None)
            if not isinstance(dt, torch.dtype):
                raise self.fail(f"unknown torch dtype {val!r}")
            return dt
        if key == "$size":
            return torch.Size(val)
        if key == "$device":
            return torch.device(val)
        raise self.fail(f"unknown marker {key!r} (written by a newer rlswift? upgrade rlswift)")


def _descr(d: Any) -> Any:
    # JSON turns the tuples of structured dtype descriptions into lists; numpy wants tuples back.
    if isinstance(d, list):
        return [tuple(_descr(x) for x in f) if isinstance(f, list) else f for f in d]
    return d


def decode(tree: Any, tensors: dict[str, torch.Tensor] | None = None, hook: str | None = None) -> Any:
    """Rebuild the object that `encode` split into `tree` and `tensors` (exact inverse of `encode`)."""
    return _Decoder(tensors or {}, hook).dec(tree)
