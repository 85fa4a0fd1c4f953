"""--tp-size: a ServerArgs field (validated without torch) that the launcher's to_cli carries."""

import pytest

from sglite.runtime.server.args import ServerArgs, parse_args


def test_tp_size_flag_round_trips_and_is_validated():
    args = parse_args(["--tp-size", "2", "--device", "cpu"])
    assert args.tp_size == 2
    assert parse_args(args.to_cli()) == args
    assert ServerArgs(device="cpu").tp_size == 1
    with pytest.raises(ValueError, match="tp_size"):
        ServerArgs(device="cpu", tp_size=0)
