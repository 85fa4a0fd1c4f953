"""The tensor-parallel control message is msgpack with typed extensions, never pickle: what rank 0
sends round-trips, and anything else is refused when it is encoded."""

import numpy as np
import pytest
import torch

from sglite.runtime.distributed.runner import _BatchRef, _pack, _TensorArg, _unpack


def test_control_messages_round_trip():
    msg = ("forward_decode", ([1, 2], (3, np.int64(4)), _TensorArg(0, (2, 3), torch.int64, False)),
           {"fed_index": [0, 1], "none": None, "batch": _BatchRef(5), "ratio": 0.5, "flag": True},
           7, [_TensorArg(1, (8,), torch.bfloat16, True)])
    assert _unpack(_pack(msg)) == (
        "forward_decode", ([1, 2], (3, 4), _TensorArg(0, (2, 3), torch.int64, False)),
        {"fed_index": [0, 1], "none": None, "batch": _BatchRef(5), "ratio": 0.5, "flag": True},
        7, [_TensorArg(1, (8,), torch.bfloat16, True)])
    assert _unpack(_pack(None)) is None


def test_anything_else_is_refused():
    with pytest.raises(TypeError, match="object"):
        _pack(("forward", object()))
    bad_dtype = _pack(_TensorArg(0, (1,), torch.int64, False)).replace(b"int64", b"uint9")
    with pytest.raises(ValueError, match="dtype"):
        _unpack(bad_dtype)
