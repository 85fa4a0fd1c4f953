"""ServerArgs: device-dependent defaults, explicit values kept, CLI round trip, validation."""

import pytest

from sglite.runtime.server.args import DEVICE_DEFAULTS, ServerArgs, parse_args


@pytest.mark.parametrize("device,kind", [("cpu", "cpu"), ("cuda", "cuda"), ("cuda:1", "cuda")])
def test_unset_knobs_take_the_device_defaults(device, kind):
    args = ServerArgs(device=device)
    for name, value in DEVICE_DEFAULTS[kind].items():
        assert getattr(args, name) == value


def test_explicit_values_win_and_round_trip_through_the_cli():
    args = ServerArgs(device="cuda", max_running_requests=64, chunked_prefill_size=-1, cuda_graph_max_bs=32,
                      page_size=16)
    assert (args.max_running_requests, args.chunked_prefill_size, args.page_size) == (64, -1, 16)
    assert parse_args(args.to_cli()) == args
    assert parse_args(["--device", "cuda", "--chunked-prefill-size", "8192"]).max_running_requests == 512


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_running_requests=0), "max_running_requests"),
    (dict(chunked_prefill_size=0), "chunked_prefill_size"),
    (dict(max_total_tokens=0), "max_total_tokens"),
    (dict(page_size=0), "page_size"),
    (dict(address="localhost:5555"), "address"),
    (dict(schedule_policy="random"), "schedule_policy"),
])
def test_bad_values_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ServerArgs(**kwargs)


@pytest.mark.parametrize("address,ok", [
    ("tcp://127.0.0.1:5555", True), ("tcp://localhost:5555", True), ("tcp://[::1]:5555", True),
    ("ipc:///tmp/x.sock", True), ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False),
    ("tcp://10.1.2.3:5555", False),
])
def test_only_loopback_binds_without_allow_remote(address, ok, monkeypatch):
    monkeypatch.delenv("SGLITE_AUTH_TOKEN", raising=False)
    if ok:
        ServerArgs(address=address, device="cpu")
        return
    with pytest.raises(ValueError, match="--allow-remote"):
        ServerArgs(address=address, device="cpu")
    with pytest.raises(ValueError, match="auth token"):
        ServerArgs(address=address, device="cpu", allow_remote=True)
    args = ServerArgs(address=address, device="cpu", allow_remote=True, auth_token="t0k")
    assert "t0k" not in args.to_cli()  # the token travels in the environment, not in argv
    monkeypatch.setenv("SGLITE_AUTH_TOKEN", "from-env")
    assert ServerArgs(address=address, device="cpu", allow_remote=True).auth_token == "from-env"
