"""Exact round trips of the checkpoint codec through orjson + safetensors (bitwise for floats)."""

import random
import struct
from collections import OrderedDict

import numpy as np
import orjson
import pytest
import safetensors.torch
import torch

from rlswift.checkpoint.codec import CodecError, decode, encode


def roundtrip(obj, hook="h"):
    """Encode, serialize exactly like the manager does, parse back, decode."""
    tree, tensors = encode(obj, hook=hook)
    tree = orjson.loads(orjson.dumps(tree))
    tensors = safetensors.torch.load(safetensors.torch.save(tensors)) if tensors else {}
    return decode(tree, tensors, hook=hook)


def bits(x: float) -> bytes:
    return struct.pack("<d", x)


def test_plain_scalars_and_containers():
    obj = {"a": 1, "b": [1, 2.5, "x", None, True, False], "c": {"d": "é", "": 0}}
    out = roundtrip(obj)
    assert out == obj
    assert type(out["b"][4]) is bool and type(out["b"][0]) is int


@pytest.mark.parametrize("x", [float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 5e-324,
                               0.1, 1.7976931348623157e308, 2.0 ** -1074 * 3])
def test_floats_bitwise(x):
    out = roundtrip([x])[0]
    assert type(out) is float
    assert bits(out) == bits(x)


def test_nan_payload_survives():
    x = struct.unpack("<d", bytes.fromhex("0100000000f8ff7f"))[0]  # nan with a non-default payload
    assert bits(roundtrip(x)) == bits(x)


def test_random_float_bit_patterns():
    rng = random.Random(0)
    xs = [struct.unpack("<d", rng.getrandbits(64).to_bytes(8, "little"))[0] for _ in range(2000)]
    out = roundtrip(xs)
    assert [bits(v) for v in out] == [bits(v) for v in xs]


@pytest.mark.parametrize("n", [0, -1, 2**63 - 1, -(2**63), 2**63, 2**64, -(2**63) - 1, 2**128 + 12345,
                               -(3**200)])
def test_ints_any_size(n):
    out = roundtrip({"n": n})["n"]
    assert type(out) is int and out == n


def test_tuples_stay_tuples_and_python_random_state():
    r = random.Random(1234)
    r.random()
    state = r.getstate()
    out = roundtrip(state)
    assert type(out) is tuple and type(out[1]) is tuple
    r2 = random.Random()
    r2.setstate(out)  # would raise TypeError if tuples came back as lists
    assert [r2.random() for _ in range(5)] == [r.random() for _ in range(5)]


def test_numpy_generator_state_with_128_bit_ints():
    g = np.random.default_rng(7)
    g.random(3)
    state = g.bit_generator.state
    assert state["state"]["state"] > 2**64  # PCG64 state is a 128-bit int
    out = roundtrip(state)
    assert out == state
    g2 = np.random.default_rng()
    g2.bit_generator.state = out
    assert np.array_equal(g2.random(4), g.random(4))


def test_numpy_global_state():
    np.random.seed(3)
    state = np.random.get_state()
    out = roundtrip(state)
    assert type(out) is tuple and out[0] == "MT19937"
    assert out[1].dtype == state[1].dtype and np.array_equal(out[1], state[1])
    assert out[2:] == state[2:]


def test_non_str_keys_and_escaped_marker_keys():
    obj = {1: "one", (2, 3): "tuple key", None: 0, 2.5: "f", b"k": "bytes"}
    out = roundtrip(obj)
    assert out == obj and list(out) == list(obj)
    user = {"$tuple": [1, 2]}  # a user dict that looks like a marker must stay a dict
    assert roundtrip(user) == user
    assert type(roundtrip(user)) is dict
    user2 = {"$tensor": {"key": "x"}, "other": 1}  # two keys: cannot be a marker
    assert roundtrip(user2) == user2


def test_optimizer_state_dict_int_keys():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.ones_like(p)
    opt.step()
    sd = opt.state_dict()
    out = roundtrip(sd)
    assert list(out["state"]) == [0]
    assert torch.equal(out["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])
    assert torch.equal(out["state"][0]["step"], sd["state"][0]["step"])
    assert out["param_groups"] == sd["param_groups"]
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(out)


def test_ordered_dict_and_model_state_dict():
    out = roundtrip(OrderedDict([("b", 1), ("a", 2)]))
    assert type(out) is OrderedDict and list(out) == ["b", "a"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int8, torch.uint8, torch.bool, torch.int32])
def test_tensor_dtypes(dtype):
    t = (torch.randn(4, 3) * 100).to(dtype)
    out = roundtrip({"t": t})["t"]
    assert out.dtype == dtype and torch.equal(out, t)


def test_bf16_bitwise_with_nan_and_negative_zero():
    t = torch.tensor([float("nan"), -0.0, 0.0, float("-inf"), 1e-38], dtype=torch.bfloat16)
    out = roundtrip(t)
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_views_shared_storage_zero_dim_and_empty():
    base = torch.arange(12.0).reshape(3, 4)
    emb = torch.randn(5, 2)
    obj = {"T": base.T, "row": base[1], "slice": base[:, ::2], "emb": emb, "lm_head": emb,
           "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3), "param": torch.nn.Parameter(torch.ones(2))}
    out = roundtrip(obj)
    for k in ("T", "row", "slice", "emb", "lm_head", "empty"):
        assert torch.equal(out[k], obj[k]), k
        assert out[k].shape == obj[k].shape
    assert out["scalar"].dim() == 0 and out["scalar"].item() == 3.5
    assert type(out["param"]) is torch.Tensor and torch.equal(out["param"], torch.ones(2))


def test_encode_does_not_alias_views():
    base = torch.zeros(4)
    _tree, tensors = encode({"v": base[1:3]})
    base.fill_(7)
    assert torch.equal(next(iter(tensors.values())), torch.zeros(2))


@pytest.mark.parametrize("arr", [np.arange(5, dtype=np.int64), np.float32([[1.5, -0.0], [np.nan, 2]]),
                                 np.array(3.0), np.arange(4, dtype=np.uint16), np.arange(4, dtype=np.uint64),
                                 np.array([True, False]), np.arange(6, dtype=">i4"), np.array(["ab", "c"]),
                                 np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8", (2,))]),
                                 np.arange(6.0).reshape(2, 3).T])
def test_numpy_arrays(arr):
    out = roundtrip({"a": arr})["a"]
    assert isinstance(out, np.ndarray)
    assert out.dtype == arr.dtype and out.shape == arr.shape
    assert out.tobytes() == arr.tobytes()


@pytest.mark.parametrize("s", [np.float32(1.25), np.int64(-5), np.uint64(2**64 - 1), np.bool_(True),
                               np.float64("nan"), np.float16(-0.0), np.int8(-128)])
def test_numpy_scalars(s):
    out = roundtrip([s])[0]
    assert type(out) is type(s) and out.dtype == s.dtype and out.tobytes() == s.tobytes()


def test_bytes_str_surrogates_dtype_size_device():
    obj = [b"\x00\xffabc", b"", "\ud800x", torch.bfloat16, torch.Size([2, 3]), torch.device("cuda:1")]
    out = roundtrip(obj)
    assert out == obj
    assert type(out[4]) is torch.Size


class Opaque:
    pass


def test_refuses_unknown_types_naming_hook_path_and_type():
    with pytest.raises(CodecError) as e:
        encode({"opt": [1, {"x": Opaque()}]}, hook="myhook")
    msg = str(e.value)
    assert "myhook" in msg and "['opt'][1]['x']" in msg and "Opaque" in msg and "dataclasses.asdict" in msg
    for bad in ({1, 2}, frozenset(), object(), complex(1, 2), torch.zeros(2, dtype=torch.complex128),
                np.array([object()], dtype=object)):
        with pytest.raises(CodecError):
            encode({"k": bad}, hook="h")


def test_refuses_cycles():
    a: list = []
    a.append(a)
    with pytest.raises(CodecError, match="cycle"):
        encode(a, hook="h")


def test_unknown_marker_on_decode_is_an_error():
    with pytest.raises(CodecError, match="newer rlswift"):
        decode({"$future": 1})


def test_tree_is_plain_json_for_plain_values():
    tree, tensors = encode({"a": [1, "x"], "b": None})
    assert tree == {"a": [1, "x"], "b": None} and tensors == {}
