"""The sCM-step suite's own code: its fused and unfused steps compute the same loss and gradients (the fused ops'
forward-mode rules really running), a torch.compile failure becomes one line, and the rows, cases and ratios are
chosen as documented. CPU only, small networks. Run with `pytest bench/test_bench_scm_step.py`."""

import contextlib
import dataclasses
import time

import pytest
import torch

from bench import cli, common
from bench.sampling import sdpa_attention
from bench.scm_step import (
    Variant,
    compile_failure,
    isolated_row,
    make_step,
    measure_row,
    parser,
    select_cases,
    suite_variants,
    summary,
)
from cmfast import ops
from cmfast.kernels import attention as _attn
from cmfast.kernels import group_norm_silu as _gn
from cmfast.networks import network_config

# the digits network, and adm-tiny at 8 x 8 (attention at 4 x 4, two heads of 16 channels, 10 classes)
TINY = {
    "ddpmpp-digits8": network_config("ddpmpp-digits8"),
    "adm-tiny8": dataclasses.replace(network_config("adm-tiny"), image_size=8, attention_resolutions=(4,)),
}


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: these networks are too small to gain from two, and two stall when other jobs share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(step, seed=0, scale=0.1):
    """The step with random non-zero weights in student and teacher (zero-initialised output layers would make the
    gradients vanish and hide a difference); the same seed gives the same weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for net in (step.online, step.teacher):
            for p in net.parameters() if net is not None else ():
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return step


def loss_and_grads(step, sdpa: bool):
    with sdpa_attention() if sdpa else contextlib.nullcontext():
        loss = step.loss()
        loss.backward()
    return loss.detach(), {n: p.grad for n, p in step.online.named_parameters()}


def count_jvps(monkeypatch, function, calls, name):
    original = function.jvp

    def jvp(ctx, *tangents):
        calls[name] += 1
        return original(ctx, *tangents)

    monkeypatch.setattr(function, "jvp", staticmethod(jvp))


@pytest.mark.parametrize("name,kind", [("ddpmpp-digits8", "scd"), ("ddpmpp-digits8", "sct"), ("adm-tiny8", "scd")])
def test_fused_and_unfused_steps_give_the_same_loss_and_gradients(name, kind, monkeypatch):
    if ops.explain("group_norm_silu", torch.randn(1, 64, 3, 3), None, None).backend == "torch":
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    config, batch = TINY[name], 3
    plain = perturbed(make_step(config, batch, config.num_classes, kind, "cpu", Variant()))
    fused = perturbed(make_step(config, batch, config.num_classes, kind, "cpu", Variant(fused=True, sdpa=False)))
    loss, grads = loss_and_grads(plain, sdpa=True)
    calls = {"group_norm_silu": 0, "attention": 0}
    count_jvps(monkeypatch, _gn.GroupNormSiLU, calls, "group_norm_silu")
    count_jvps(monkeypatch, _attn.Attention, calls, "attention")
    fused_loss, fused_grads = loss_and_grads(fused, sdpa=False)

    assert calls["group_norm_silu"] > 0, "the fused GroupNorm+SiLU forward-mode rule did not run"
    if name.startswith("adm") and ops.explain("attention", torch.randn(1, 48, 16), 1).backend != "torch":
        assert calls["attention"] > 0, "the fused attention forward-mode rule did not run"
    assert loss.abs() > 1e-3  # the tangent and the weighting are not degenerate
    torch.testing.assert_close(fused_loss, loss, rtol=1e-4, atol=1e-6)
    scale = max(g.abs().max().item() for g in grads.values() if g is not None)
    assert scale > 1e-4
    for pname, g in grads.items():
        if g is None:
            assert fused_grads[pname] is None, pname
            continue
        torch.testing.assert_close(fused_grads[pname], g, rtol=1e-3, atol=1e-4 * scale, msg=pname)


DYNAMO_TEXT = """Observed exception
  Explanation: Dynamo found no exception handler at the top-level compiled function.

  Developer debug context: raised exception RuntimeError('Dynamo failed to run FX node with fake tensors: \
call_function <function group_norm at 0x7f>(*(GradTrackingTensor(lvl=1, value=\\n FakeTensor(..., size=(32, 32, 8, \
8))\\n), 8), **{}): got RuntimeError(\\'InferenceMode::is_enabled() && self.is_inference() INTERNAL ASSERT FAILED at \
"x.cpp":66, please report a bug to PyTorch. Expected this method to only be reached in inference mode.\\')')

from user code:
   File "/cmfast/training/scm.py", line 56, in scaled_tangent
    F_minus, dF = torch.func.jvp(F_of, (x_t, t), (trigflow.per_sample(v) * dxt_dt, v))
"""


def test_a_compile_failure_is_one_line_naming_the_op_and_the_error():
    class Unsupported(Exception):
        pass

    line = compile_failure(Unsupported(DYNAMO_TEXT))
    assert "\n" not in line and len(line) <= 400
    assert line.startswith("torch.compile cannot trace the step's torch.func.jvp: Unsupported: Observed exception")
    assert "inside: group_norm RuntimeError: InferenceMode::is_enabled() && self.is_inference() INTERNAL ASSERT" in line
    plain = compile_failure(RuntimeError("backend compiler failed\nmore"))
    assert plain == "torch.compile failed: RuntimeError: backend compiler failed"


def test_a_real_jvp_compile_failure_reads_as_one_line():
    """torch.compile(fullgraph=True) of a JVP through GroupNorm, the sCM tangent's first obstacle in this torch."""
    norm = torch.nn.GroupNorm(2, 4)

    def tangent(x):
        with torch.no_grad():
            return torch.func.jvp(lambda a: norm(a), (x,), (x,))[1]

    torch._dynamo.reset()
    try:
        torch.compile(tangent, fullgraph=True, backend="eager")(torch.randn(2, 4, 3, 3))
    except Exception as e:  # noqa: BLE001
        line = compile_failure(e)
        assert "\n" not in line and line.startswith("torch.compile"), line
        assert "func.jvp" in line or "inside:" in line, line
    else:
        pytest.skip(f"torch {torch.__version__} traces a JVP through GroupNorm")
    finally:
        torch._dynamo.reset()


def test_rows_per_device_and_options():
    cpu = suite_variants("cpu", compile=False)
    assert list(cpu) == ["eager-fp32-nchw", "eager-fp32-cl", "cmfast-fused-fp32"]
    assert all(v.dtype is None for v in cpu.values())  # no bf16 row on a CPU
    assert [n for n, v in cpu.items() if v.group == "eager"] == ["eager-fp32-nchw", "eager-fp32-cl"]
    assert cpu["cmfast-fused-fp32"].fused and not cpu["cmfast-fused-fp32"].sdpa
    with_compile = suite_variants("cpu", compile=True)
    assert list(with_compile)[3:] == ["compile-default-fp32", "compile-nets-default-fp32"]
    assert with_compile["compile-default-fp32"].compile_target == "step"
    assert not with_compile["compile-default-fp32"].channels_last  # NCHW on a CPU until an eager row is measured
    both = suite_variants("cpu", compile=True, compile_modes=("default", "max-autotune"))
    assert "compile-max-autotune-fp32" in both and "compile-nets-max-autotune-fp32" in both
    cuda = suite_variants("cuda", compile=True, best_eager={"fp32": Variant(group="eager")})
    assert {"eager-bf16-nchw", "eager-bf16-cl", "cmfast-fused-bf16", "compile-default-bf16"} <= set(cuda)
    assert cuda["eager-bf16-cl"].dtype == torch.bfloat16 and cuda["eager-bf16-cl"].precision == "bf16"
    assert not cuda["compile-default-fp32"].channels_last  # the measured fp32 baseline was NCHW
    assert cuda["compile-default-bf16"].channels_last  # none measured yet: channels_last on CUDA
    assert list(cuda).index("compile-default-fp32") > list(cuda).index("cmfast-fused-bf16")  # compile rows last


def test_cases_and_options():
    assert select_cases("cpu") == {"ddpmpp-digits8": 32, "adm-tiny": 16}
    assert select_cases("cuda") == {"ddpmpp-cifar10": 512, "adm-imagenet64": 64}
    assert select_cases("cpu", ["adm-tiny", "ddpmpp-cifar10"]) == {"adm-tiny": 16, "ddpmpp-cifar10": 512}
    assert select_cases("cpu", ["ddpmpp-tiny"], batch=8) == {"ddpmpp-tiny": 8}
    assert select_cases("cpu", None, batch=4) == {"ddpmpp-digits8": 4, "adm-tiny": 4}
    with pytest.raises(ValueError, match="give --batch"):
        select_cases("cpu", ["ddpmpp-tiny"])
    with pytest.raises(ValueError, match="unknown network preset"):
        select_cases("cpu", ["no-such-net"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--reps", "4"])  # at least 5 timed repetitions
    with pytest.raises(SystemExit, match="2"):  # `python -m bench scm-step` takes this suite's own options
        cli.main(["scm-step", "--reps", "4"])
    assert cli.SUITES["scm-step"] == "bench.scm_step"
    args = parser().parse_args(["--network", "adm-tiny", "--kind", "scd,sct", "--reps", "7", "--max-autotune"])
    assert (args.network, args.kind, args.reps, args.max_autotune) == (["adm-tiny"], ["scd", "sct"], 7, True)


def test_summary_ratios_are_against_the_fastest_eager_row_of_the_same_precision():
    case = dict(model="m", batch=4, kind="scd")
    rows = [
        {**case, "variant": "eager-fp32-nchw", "precision": "fp32", "group": "eager", "ms": 30.0},
        {**case, "variant": "eager-fp32-cl", "precision": "fp32", "group": "eager", "ms": 20.0},
        {**case, "variant": "cmfast-fused-fp32", "precision": "fp32", "group": None, "ms": 10.0},
        {**case, "variant": "compile-default-fp32", "precision": "fp32", "group": None, "skipped": "cannot trace"},
        {**case, "variant": "eager-bf16-nchw", "precision": "bf16", "group": "eager", "ms": 8.0},
        {**case, "variant": "cmfast-fused-bf16", "precision": "bf16", "group": None, "ms": 4.0},
        {**case, "kind": "sct", "variant": "cmfast-fused-fp32", "precision": "fp32", "group": None, "ms": 5.0},
    ]
    out = {(r["kind"], r["variant"]): r for r in summary(rows)}
    assert out["scd", "eager-fp32-cl"]["x_eager"] == 1.0 and out["scd", "eager-fp32-cl"]["baseline"] == "eager"
    assert out["scd", "eager-fp32-nchw"]["x_eager"] == pytest.approx(20 / 30)
    assert out["scd", "eager-fp32-nchw"]["baseline"] is None
    assert out["scd", "cmfast-fused-fp32"]["x_eager"] == pytest.approx(2.0)
    assert out["scd", "compile-default-fp32"]["note"] == "cannot trace"
    assert out["scd", "compile-default-fp32"]["x_eager"] is None
    assert out["scd", "cmfast-fused-bf16"]["x_eager"] == pytest.approx(2.0)  # against bf16 eager, not fp32
    assert out["sct", "cmfast-fused-fp32"]["x_eager"] is None  # no eager sCT row: no ratio


def test_a_measured_row_has_every_figure(monkeypatch):
    monkeypatch.setattr(common, "repeated_ms", lambda fn, device, repeats, **kw: _one_timing(fn, repeats))
    row = measure_row("ddpmpp-digits8", 2, 0, "scd", "cpu", "eager-fp32-nchw", Variant(group="eager"), 1, 1e18)
    assert "skipped" not in row, row.get("skipped")
    assert row["ms"] > 0 and row["images_s"] == pytest.approx(2 / row["ms"] * 1e3)
    assert row["saved_mib_per_image"] > 0 and row["step_peak_mib"] > 0
    assert row["attention"] == "sdpa (swapped in)" and row["precision"] == "fp32" and row["load_1m"] >= 0
    late = measure_row("ddpmpp-digits8", 2, 0, "scd", "cpu", "eager-fp32-nchw", Variant(), 5, time.monotonic() - 1)
    assert late["skipped"] == "the suite's time budget ran out" and "ms" not in late


def test_an_isolated_row_comes_back_from_its_own_process():
    v = Variant(compile_mode="default", compile_target="step")
    past = time.monotonic() - 1  # CLOCK_MONOTONIC: the same clock in the child
    row = isolated_row("ddpmpp-digits8", 2, 0, "scd", "cpu", "compile-default-fp32", v, 5, past)
    assert row["skipped"] == "the suite's time budget ran out" and row["variant"] == "compile-default-fp32"
    broken = isolated_row("no-such-net", 2, 0, "scd", "cpu", "compile-default-fp32", v, 5, 1e18)
    assert broken["skipped"].startswith("the row's process failed: ValueError: unknown network preset")


def _one_timing(fn, repeats):
    start = time.perf_counter()
    fn()
    ms = (time.perf_counter() - start) * 1e3
    return {"ms": ms, "ms_min": ms, "ms_max": ms, "repeats": repeats}
