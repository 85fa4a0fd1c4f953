"""--tp-size: a ServerArgs field (validated without torch) that the launcher's to_cli carries; and
the import rule of sglite.runtime.distributed."""

import pytest

from sglite.runtime.server.args import ServerArgs, parse_args


def test_tp_size_flag_round_trips_and_is_validated():
    args = parse_args(["--tp-size", "2", "--device", "cpu"])
    assert args.tp_size == 2
    assert parse_args(args.to_cli()) == args
    assert ServerArgs(device="cpu").tp_size == 1
    with pytest.raises(ValueError, match="tp_size"):
        ServerArgs(device="cpu", tp_size=0)


def test_distributed_imports_neither_the_scheduler_nor_the_server():
    """Beside the executor in the layering: models, mem and (in a worker) the executor only."""
    from tests.test_import_boundaries import _runtime_loaded, _under

    assert not _under(_runtime_loaded("distributed"), "scheduler", "server", "sampling")
