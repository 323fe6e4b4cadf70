"""The own safetensors format and official .pt loading: round trips, and one-line errors for bad files."""

import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import cmfast
from cmfast.checkpoint import CheckpointError, read_official_state_dict
from cmfast.checkpoint import load as load_model
from cmfast.networks import ADMUNet, build_network
from cmfast.preconditioning import ConsistencyModel, EDMDenoiser


@pytest.fixture
def model_for(perturb):
    """model_for(preset, cls=ConsistencyModel, seed=0): a model with non-trivial random weights."""

    def make(preset, cls=ConsistencyModel, seed=0):
        torch.manual_seed(seed)
        return cls(perturb(build_network(preset), seed=seed)).eval()

    return make


def inputs(model, batch=2, seed=1):
    cfg = model.net.config
    size = cfg.resolution
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    n = cfg.num_classes
    y = torch.randint(n, (batch,), generator=g) if n else None
    return x, y


@pytest.mark.parametrize(
    "preset, cls", [("ddpmpp-tiny", ConsistencyModel), ("ncsnpp-tiny", ConsistencyModel), ("adm-tiny", EDMDenoiser)]
)
def test_own_format_round_trip(tmp_path, preset, cls, model_for):
    model = model_for(preset, cls)
    model.sigma_max = 40.0  # a non-default value must survive too
    path = tmp_path / "m.safetensors"
    cmfast.save(model, path)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary file left behind
    loaded = cmfast.load(path)
    assert type(loaded) is cls and loaded.net.config == model.net.config and loaded.sigma_max == 40.0
    x, y = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 0.8, y), model(x, 0.8, y), rtol=0, atol=0)


def test_save_replaces_atomically(tmp_path, model_for):
    path = tmp_path / "m.safetensors"
    cmfast.save(model_for("ddpmpp-tiny", seed=0), path)
    second = model_for("ddpmpp-tiny", seed=1)
    cmfast.save(second, path)
    loaded = cmfast.load(path)
    for a, b in zip(loaded.net.parameters(), second.net.parameters()):
        assert torch.equal(a, b)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors: no such file or folder"):
        cmfast.load(tmp_path / "nope.safetensors")


def test_truncated_file(tmp_path, model_for):
    path = tmp_path / "m.safetensors"
    cmfast.save(model_for("ddpmpp-tiny"), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="m.safetensors") as err:
        cmfast.load(path)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("content", [b"hello, world\n" * 10, os.urandom(256), b""])
def test_foreign_file(tmp_path, content):
    path = tmp_path / "foreign.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="foreign.safetensors"):
        cmfast.load(path)


def test_safetensors_without_cmfast_metadata(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(CheckpointError, match="without cmfast metadata"):
        cmfast.load(path)


@pytest.mark.parametrize(
    "network, match", [({"model_channels": 64}, "do not fit the network"), ({"model_channels": 48}, "cannot build")]
)
def test_weights_that_do_not_fit_the_config(tmp_path, network, match, model_for):
    path = tmp_path / "m.safetensors"
    cmfast.save(model_for("adm-tiny"), path)
    meta = cmfast.checkpoint.read_metadata(path)
    meta["network"].update(network)
    save_file(load_file(str(path)), str(path), metadata={"cmfast": json.dumps(meta)})
    with pytest.raises(CheckpointError, match=match):
        cmfast.load(path)


class Payload:
    """An arbitrary object that a weights-only load must refuse to unpickle."""


@pytest.fixture
def official_state_dict(perturb):
    """official_state_dict(preset="adm-tiny", seed=0): a state dict as the official releases hold them."""

    def make(preset="adm-tiny", seed=0):
        torch.manual_seed(seed)
        return perturb(build_network(preset), seed=seed).state_dict()

    return make


@pytest.mark.parametrize("name, cls", [("cd_tiny_lpips.pt", ConsistencyModel), ("edm_tiny_ema.pt", EDMDenoiser)])
def test_official_checkpoint_loads_and_matches(tmp_path, name, cls, official_state_dict):
    state = official_state_dict()
    path = tmp_path / name
    torch.save(state, path)
    model = cmfast.load_official_checkpoint(path)
    assert type(model) is cls and model.noise_cond == "adm"
    assert model.net.config == cmfast.NETWORK_PRESETS["adm-tiny"]
    ref_net = ADMUNet(cmfast.NETWORK_PRESETS["adm-tiny"])
    ref_net.load_state_dict(state, strict=True)
    ref = cls(ref_net, noise_cond="adm")
    x, y = inputs(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x, 3.0, y), ref(x, 3.0, y), rtol=0, atol=0)
    assert type(load_model(str(path))) is cls  # the CLI's loader sniffs the format


def test_official_checkpoint_with_explicit_arch(tmp_path, official_state_dict):
    path = tmp_path / "ct.pt"
    torch.save(official_state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit"):
        cmfast.load_official_checkpoint(path, arch="adm-tiny32")
    with pytest.raises(CheckpointError, match="not an ADM preset"):
        cmfast.load_official_checkpoint(path, arch="ddpmpp-tiny")


def test_official_checkpoint_bad_files(tmp_path, official_state_dict):
    good = tmp_path / "cd.pt"
    torch.save(official_state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pt: cannot read"):
        read_official_state_dict(truncated)

    pickled = tmp_path / "pickle.pt"
    torch.save({"w": torch.ones(1), "obj": Payload()}, pickled)
    with pytest.raises(CheckpointError, match="pickle.pt"):  # weights_only refuses arbitrary objects
        read_official_state_dict(pickled)
    notdict = tmp_path / "list.pt"
    torch.save([torch.ones(1)], notdict)
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_official_state_dict(notdict)
    foreign = tmp_path / "foreign.pt"
    torch.save({"conv.weight": torch.ones(3, 3)}, foreign)
    with pytest.raises(CheckpointError, match="foreign.pt"):
        cmfast.load_official_checkpoint(foreign)


def test_near_miss_of_a_known_network_names_the_difference(tmp_path, official_state_dict):
    state = official_state_dict()
    del state["out.2.bias"]
    state["out.0.weight"] = torch.ones(7)
    path = tmp_path / "cd.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(out\.2\.bias\)"):
        cmfast.load_official_checkpoint(path)


def test_load_model_names_unknown_specs(tmp_path):
    with pytest.raises(CheckpointError, match="neither a shipped model"):
        load_model("no-such-preset-or-file")
    with pytest.raises(CheckpointError, match="is a folder, but not a diffusers pipeline"):
        load_model(str(tmp_path))


def test_written_files_get_the_usual_permissions(tmp_path, model_for):
    path = tmp_path / "m.safetensors"
    cmfast.save(model_for("ddpmpp-tiny"), path)
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "ncsnpp-tiny", "adm-tiny"])
@pytest.mark.parametrize("dtype, rel", [(None, 0.0), (torch.bfloat16, 0.05), (torch.float16, 0.01)])
def test_export_round_trip_keeps_outputs_within_the_dtype(tmp_path, model_for, preset, dtype, rel):
    """Stored in half precision, the weights round but the outputs stay within the dtype's tolerance, at the smallest
    sigma too, where NCSN++'s Fourier embedding multiplies its stored frequencies by a large ln(sigma) / 4."""
    model = model_for(preset)
    path = tmp_path / "m.safetensors"
    cmfast.save(model, path, dtype=dtype)
    back = cmfast.load(path)
    for name, buf in model.net.named_buffers():  # buffers (such as the Fourier frequencies) are stored exactly
        assert torch.equal(dict(back.net.named_buffers())[name], buf), name
    x, y = inputs(model)
    with torch.no_grad():
        for sigma in (0.002, 1.0):
            noise = torch.full((x.shape[0],), sigma).log() / 4 if model.noise_cond == "edm" else None
            noise = noise if noise is not None else 250 * torch.full((x.shape[0],), sigma).log()
            ref, out = model.net(x, noise, y), back.net(x, noise, y)
            err = (out - ref).abs().max().item()
            assert err <= rel * ref.abs().max().item(), (sigma, err)


def test_non_finite_weights_are_refused_at_load(tmp_path, model_for):
    model = model_for("ddpmpp-tiny")
    with torch.no_grad():
        next(model.net.parameters()).view(-1)[3] = float("nan")
    path = tmp_path / "nan.safetensors"
    cmfast.save(model, path)
    with pytest.raises(CheckpointError, match="non-finite"):
        cmfast.load(path)


def test_files_that_are_not_regular_are_refused(tmp_path):
    """A FIFO would block the loader forever and /dev/null reads as empty: both are refused by name at once."""
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)

    def hung(*_):
        raise TimeoutError("the loader blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        for spec in (str(fifo), "/dev/null"):
            with pytest.raises(CheckpointError, match="not a regular file"):
                load_model(spec)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_pickle_refusal_gives_no_advice_to_unpickle(tmp_path):
    pickled = tmp_path / "pickle.pt"
    torch.save({"w": torch.ones(1), "obj": Payload()}, pickled)
    with pytest.raises(CheckpointError) as err:
        read_official_state_dict(pickled)
    message = str(err.value)
    assert "weights_only=False" not in message and "\n" not in message
    assert "pickle.pt" in message and "refused" in message
