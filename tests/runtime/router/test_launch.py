"""--dp-size through ServerArgs and the CLI, and which GPUs each replica gets (no GPU needed)."""

import pytest

from sglite.runtime.router.launch import replica_envs
from sglite.runtime.server.args import ServerArgs, parse_args


def test_dp_size_flag_round_trips_and_is_validated():
    args = parse_args(["--dp-size", "3", "--device", "cpu"])
    assert args.dp_size == 3
    assert parse_args(args.to_cli()) == args
    assert "--dp-size" not in ServerArgs(device="cpu").to_cli()  # dp 1: today's command line
    with pytest.raises(ValueError, match="dp_size"):
        ServerArgs(device="cpu", dp_size=0)


def test_each_cuda_replica_gets_its_own_slice_of_the_visible_gpus(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    assert replica_envs(ServerArgs(device="cuda", dp_size=3)) == [
        {"CUDA_VISIBLE_DEVICES": "4"}, {"CUDA_VISIBLE_DEVICES": "5"}, {"CUDA_VISIBLE_DEVICES": "6"}]
    with pytest.raises(ValueError, match="needs 4 GPUs; 3 visible"):
        replica_envs(ServerArgs(device="cuda", dp_size=4))
    # an explicit GPU (or the CPU) is shared as asked: no per-replica environment
    assert replica_envs(ServerArgs(device="cuda:0", dp_size=2)) == [{}, {}]
    assert replica_envs(ServerArgs(device="cpu", dp_size=2)) == [{}, {}]
