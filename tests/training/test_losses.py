"""Losses against hand computations: EDM's loss with the exact Gaussian denoiser, Algorithm 2 and 3 replayed step by
step with tiny linear networks, the iCT options, and shared dropout masks."""

import copy
import math

import pytest
import torch
from torch import nn

from cmfast import ConsistencyModel, EDMDenoiser
from cmfast.sampling import generators_from_seeds, karras_sigmas
from cmfast.training.distances import l2, pseudo_huber
from cmfast.training.losses import CDLoss, CTLoss, EDMLoss, SharedRNG
from cmfast.training.schedules import ct_target_ema, lognormal_index_probs

EPS, T, RHO, SD = 0.002, 80.0, 7.0, 0.5


def karras_ascending(n):
    """REFERENCE.md section 1: t_1 < ... < t_N, as a float64 tensor (index i-1 holds t_i)."""
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return (EPS ** (1 / RHO) + (i - 1) / (n - 1) * (T ** (1 / RHO) - EPS ** (1 / RHO))) ** RHO


def data(seed, shape=(4, 3, 5, 6)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


class Linear(nn.Module):
    """f(x, sigma, labels) = w x + b sigma (+ labels): a tiny model that records every call."""

    def __init__(self, w=0.7, b=0.01):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))
        self.b = nn.Parameter(torch.tensor(b))
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.detach().clone(), sigma.detach().clone(), class_labels, torch.is_grad_enabled()))
        out = self.w * x + self.b * sigma.reshape(-1, 1, 1, 1)
        return out if class_labels is None else out + class_labels.reshape(-1, 1, 1, 1)


class GaussianDenoiser(nn.Module):
    """The exact denoiser of data N(0, SD^2 I): D(x, sigma) = SD^2 / (SD^2 + sigma^2) x. Records its sigmas."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(1.0))  # 1, but a parameter: a teacher run with grad would get one
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((sigma.detach().clone(), torch.is_grad_enabled()))
        return self.gain * SD**2 / (SD**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * x


def heun_reference(D, x, t, s):
    """REFERENCE.md section 4, per sample: t, s are (B,) with s < t."""
    t4, s4 = t.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    d = (x - D(x, t4)) / t4
    x_e = x + (s4 - t4) * d
    d2 = (x_e - D(x_e, s4)) / s4
    return x + (s4 - t4) * (d + d2) / 2


def exact_D(x, sigma):
    return SD**2 / (SD**2 + sigma**2) * x


# --- EDM -------------------------------------------------------------------------------------------------------------


def test_edm_loss_replayed_with_a_zero_denoiser():
    y = data(0)
    loss = EDMLoss()(lambda x, sigma, labels=None: torch.zeros_like(x), y, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    sigma = (torch.randn(4, generator=g, dtype=torch.float64) * 1.2 - 1.2).exp()  # sigma first, then the noise
    weight = (sigma**2 + SD**2) / (sigma * SD) ** 2
    expected = weight * y.double().square().mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected.float())


def test_edm_loss_of_the_exact_gaussian_denoiser_is_one_in_expectation():
    # E[(D(y + sigma n) - y)^2] = sigma^2 SD^2 / (sigma^2 + SD^2) per pixel, times lambda(sigma): exactly 1
    g = torch.Generator().manual_seed(0)
    y = SD * torch.randn(6, 3, 64, 64, generator=g)
    sigmas = []

    def D(x, sigma, labels=None):
        sigmas.append(sigma.clone())
        return exact_D(x, sigma.reshape(-1, 1, 1, 1))

    loss = EDMLoss(p_mean=0.3, p_std=1.5)(D, y, generator=g)
    torch.testing.assert_close(loss, torch.ones(6), rtol=0, atol=0.06)  # 12288 pixels: std ~0.013
    assert float(sigmas[0].std()) > 0.3  # a spread of sigmas, all with the same expected loss
    wrong = EDMLoss(p_mean=0.3, p_std=1.5, sigma_data=1.0)(D, y, generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(wrong, torch.ones(6), atol=0.1)


def test_edm_loss_per_sample_generators_make_samples_independent_of_the_batch():
    y, loss = data(1), EDMLoss()
    net = Linear()
    full = loss(net, y, generator=generators_from_seeds(range(4)))
    for i in range(4):
        one = loss(net, y[i : i + 1], generator=generators_from_seeds([i]))
        torch.testing.assert_close(one, full[i : i + 1])


# --- consistency distillation ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_cd_loss_replays_algorithm_2(solver):
    n_scales, x = 7, data(2)
    online, target, teacher = Linear(0.7, 0.01), Linear(0.6, -0.02), GaussianDenoiser()
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0])
    loss_fn = CDLoss(teacher, target, num_scales=n_scales, solver=solver, distance="l2")
    loss = loss_fn(online, x, labels, generator=torch.Generator().manual_seed(9))

    g = torch.Generator().manual_seed(9)  # noise first, then the indices, as the official code
    z = torch.randn(x.shape, generator=g)
    j = torch.randint(n_scales - 1, (4,), generator=g)
    asc = karras_ascending(n_scales)
    n = n_scales - 1 - j  # the paper's n in {1..N-1}
    t_next, t_n = asc[n], asc[n - 1]  # t_(n+1), t_n
    x_next = x.double() + t_next.reshape(-1, 1, 1, 1) * z.double()
    if solver == "heun":
        x_hat = heun_reference(exact_D, x_next, t_next, t_n)
    else:
        t4 = t_next.reshape(-1, 1, 1, 1)
        x_hat = x_next + (t_n.reshape(-1, 1, 1, 1) - t4) * (x_next - exact_D(x_next, t4)) / t4
    lab = labels.double().reshape(-1, 1, 1, 1)
    f_online = 0.7 * x_next + 0.01 * t_next.reshape(-1, 1, 1, 1) + lab
    f_target = 0.6 * x_hat - 0.02 * t_n.reshape(-1, 1, 1, 1) + lab
    torch.testing.assert_close(loss.double(), (f_online - f_target).square().mean(dim=(1, 2, 3)), rtol=2e-5, atol=1e-6)

    (x_on, s_on, lab_on, grad_on), (x_tg, s_tg, lab_tg, grad_tg) = online.calls[0], target.calls[0]
    torch.testing.assert_close(s_on.double(), t_next, rtol=1e-6, atol=0)
    torch.testing.assert_close(s_tg.double(), t_n, rtol=1e-6, atol=0)
    torch.testing.assert_close(x_on.double(), x_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_tg.double(), x_hat, rtol=1e-5, atol=1e-5)
    assert grad_on and not grad_tg and lab_on is labels and lab_tg is labels
    teacher_sigmas = [s.double() for s, _ in teacher.calls]
    assert len(teacher_sigmas) == (2 if solver == "heun" else 1)
    torch.testing.assert_close(teacher_sigmas[0], t_next, rtol=1e-6, atol=0)
    if solver == "heun":
        torch.testing.assert_close(teacher_sigmas[1], t_n, rtol=1e-6, atol=0)
    assert not any(grad for _, grad in teacher.calls)


def test_cd_heun_and_euler_differ_and_only_the_online_net_gets_gradients():
    x = data(3)
    results = {}
    for solver in ("heun", "euler"):
        online, target, teacher = Linear(), Linear(0.5), GaussianDenoiser()
        loss = CDLoss(teacher, target, num_scales=5, solver=solver, distance="l1")(
            online, x, generator=torch.Generator().manual_seed(0)
        )
        loss.sum().backward()
        assert online.w.grad is not None and float(online.w.grad.abs()) > 0 and online.b.grad is not None
        assert target.w.grad is None and target.b.grad is None and teacher.gain.grad is None
        results[solver] = loss.detach()
    assert not torch.allclose(results["heun"], results["euler"], rtol=1e-3)


def test_cd_indices_cover_the_grid_uniformly():
    n_scales, b = 5, 4000
    online, teacher = Linear(), GaussianDenoiser()
    loss_fn = CDLoss(teacher, None, num_scales=n_scales, distance="l2")
    loss_fn(online, torch.zeros(b, 1, 1, 1), generator=torch.Generator().manual_seed(1))
    grid = karras_sigmas(n_scales).float()
    (_, s_on, _, grad_on), (_, s_tg, _, grad_tg) = online.calls  # target=None: the online net again, without grad
    assert grad_on and not grad_tg
    j = (s_on[:, None] - grid[None]).abs().argmin(dim=1)
    torch.testing.assert_close(s_on, grid[j], rtol=0, atol=0)
    torch.testing.assert_close(s_tg, grid[j + 1], rtol=0, atol=0)  # the next smaller level
    counts = torch.bincount(j, minlength=n_scales)
    assert counts[-1] == 0 and bool((counts[:-1] - b / 4).abs().lt(5 * math.sqrt(b * 3 / 16)).all())
    assert float(s_tg.min()) == pytest.approx(EPS) and float(s_on.max()) == pytest.approx(T)
    assert loss_fn.target_ema(0) == 0 and loss_fn.num_scales(123) == n_scales


def test_cd_with_consistency_models_and_per_sample_generators(perturb, recording_net_class):
    torch.manual_seed(0)
    online = ConsistencyModel(perturb(recording_net_class(), seed=1)).train()
    target = copy.deepcopy(online).requires_grad_(False)
    teacher = EDMDenoiser(perturb(recording_net_class(), seed=2)).eval()
    loss_fn = CDLoss(teacher, target, num_scales=18, distance="l2", mu=0.95)
    x = data(4, (3, 3, 8, 8))
    loss = loss_fn(online, x, generator=generators_from_seeds([10, 11, 12]))
    assert loss.shape == (3,) and bool(loss.isfinite().all()) and bool((loss > 0).all())
    loss.sum().backward()
    assert all(p.grad is not None for p in online.net.conv.parameters())  # (the label embedding is unused)
    assert all(p.grad is None for p in teacher.parameters())
    grid = karras_sigmas(18)
    for module, offset in ((online.net, 0), (target.net, 1)):
        sigma = (4 * module.calls[-1][1].double()).exp()  # RecordingNet sees c_noise = ln(sigma) / 4
        j = (sigma[:, None] - grid[None]).abs().argmin(dim=1)
        torch.testing.assert_close(sigma, grid[j], rtol=1e-5, atol=0)
        if offset == 0:
            j_online = j
    torch.testing.assert_close(j, j_online + 1)
    second = loss_fn(online, x[1:2], generator=generators_from_seeds([11]))
    torch.testing.assert_close(second.detach(), loss[1:2].detach(), rtol=1e-5, atol=1e-7)
    assert loss_fn.target_ema(7) == 0.95
    with pytest.raises(ValueError, match="needs a target"):
        CDLoss(teacher, None, mu=0.95)
    with pytest.raises(ValueError, match="solver"):
        CDLoss(teacher, target, solver="rk4")


# --- consistency training --------------------------------------------------------------------------------------------


def test_ct_loss_replays_algorithm_3_with_the_same_noise():
    x = data(5)
    online, target = Linear(0.7, 0.01), Linear(0.6, -0.02)
    loss_fn = CTLoss(target, 1000, distance="l2")
    loss = loss_fn(online, x, step=500, generator=torch.Generator().manual_seed(3))
    assert loss_fn.num_scales(500) == 107

    g = torch.Generator().manual_seed(3)
    z = torch.randn(x.shape, generator=g).double()
    j = torch.randint(106, (4,), generator=g)
    asc = karras_ascending(107)
    t_next, t_n = asc[106 - j], asc[105 - j]
    x_next = x.double() + t_next.reshape(-1, 1, 1, 1) * z
    x_n = x.double() + t_n.reshape(-1, 1, 1, 1) * z  # the same z
    f_online = 0.7 * x_next + 0.01 * t_next.reshape(-1, 1, 1, 1)
    f_target = 0.6 * x_n - 0.02 * t_n.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(loss.double(), (f_online - f_target).square().mean(dim=(1, 2, 3)), rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(target.calls[0][0].double(), x_n, rtol=1e-5, atol=1e-5)
    assert not target.calls[0][3]


@pytest.mark.parametrize("step, n_scales", [(0, 2), (1, 6), (500, 107), (1000, 151)])
def test_ct_loss_samples_the_grid_of_n_k_points(step, n_scales):
    online = Linear(1.0, 0.0)
    loss_fn = CTLoss(None, 1000, distance="l2")
    x = data(6, (256, 1, 2, 2))
    loss_fn(online, x, step=step, generator=torch.Generator().manual_seed(step))
    grid = karras_sigmas(n_scales).float()
    (x_on, s_on, _, _), (x_tg, s_tg, _, _) = online.calls
    j = (s_on[:, None] - grid[None]).abs().argmin(dim=1)
    torch.testing.assert_close(s_on, grid[j], rtol=0, atol=0)
    torch.testing.assert_close(s_tg, grid[j + 1], rtol=0, atol=0)
    assert int(j.max()) == n_scales - 2  # both ends of the grid are reached (256 draws)
    if n_scales > 2:
        wrong = karras_sigmas(n_scales + 1).float()
        assert float((s_on[:, None] - wrong[None]).abs().min(dim=1).values.max()) > 1e-3  # not the N(k)+1 grid
    z_on = (x_on - x) / s_on.reshape(-1, 1, 1, 1)
    z_tg = (x_tg - x) / s_tg.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(z_on, z_tg, rtol=1e-3, atol=1e-3)  # the same z
    assert loss_fn.target_ema(step) == 0.0


def test_ct_target_ema_follows_the_schedule():
    loss_fn = CTLoss(Linear(), 800, mu0=0.95, s1=200, mu_variant="official", distance="l2")
    for k in (0, 1, 400, 800):
        assert loss_fn.target_ema(k) == ct_target_ema(k, 800, 2, 200, 0.95, "official")
    assert CTLoss(Linear(), 800, distance="l2").target_ema(0) == pytest.approx(0.9)


def test_ict_weighting_is_one_over_the_gap():
    x = data(7)
    plain = CTLoss(None, 1000, distance="l2")
    weighted = CTLoss(None, 1000, distance="l2", weighting="ict")
    online = Linear()
    a = plain(online, x, step=300, generator=torch.Generator().manual_seed(4))
    b = weighted(online, x, step=300, generator=torch.Generator().manual_seed(4))
    s_on, s_tg = online.calls[2][1].double(), online.calls[3][1].double()
    torch.testing.assert_close(b.double(), a.double() / (s_on - s_tg), rtol=1e-4, atol=0)


def test_ict_switches_on_all_options():
    loss_fn = CTLoss(None, 400000, ict=True)
    assert loss_fn.distance is pseudo_huber and loss_fn.weighting == "ict" and loss_fn.index_sampling == "lognormal"
    assert [loss_fn.num_scales(k) for k in (0, 50000, 400000)] == [11, 21, 1281]
    assert loss_fn.target_ema(123) == 0.0
    single = CTLoss(None, 400000, ict=True, weighting="uniform", distance="l2")
    assert single.weighting == "uniform" and single.distance is l2 and single.index_sampling == "lognormal"
    with pytest.raises(ValueError, match="target=None"):
        CTLoss(Linear(), 1000, ict=True)
    with pytest.raises(ValueError, match="curriculum"):
        CTLoss(Linear(), 1000, curriculum="ict", distance="l2")


@pytest.mark.parametrize("per_sample", [False, True])
def test_ict_lognormal_index_frequencies(per_sample):
    b = 3000 if per_sample else 20000
    online = Linear(1.0, 0.0)
    loss_fn = CTLoss(None, 400000, ict=True)
    gen = generators_from_seeds(range(b)) if per_sample else torch.Generator().manual_seed(2)
    loss = loss_fn(online, torch.zeros(b, 1, 1, 1), step=0, generator=gen)
    grid = karras_sigmas(11).float()
    s_on, s_tg = online.calls[0][1], online.calls[1][1]
    j = (s_on[:, None] - grid[None]).abs().argmin(dim=1)
    torch.testing.assert_close(s_tg, grid[j + 1], rtol=0, atol=0)
    probs = lognormal_index_probs(karras_sigmas(11))
    counts = torch.bincount(j, minlength=11)[:10].double()
    assert bool(((counts - b * probs).abs() <= 5 * (b * probs * (1 - probs)).sqrt() + 1).all())
    # zero images, f = x: d = ||(t_(n+1) - t_n) z||, pseudo-Huber with c = 0.00054, weighted by 1 / (t_(n+1) - t_n)
    gap = (s_on - s_tg).double()
    expected = (((gap * online.calls[0][0].reshape(-1) / s_on).double() ** 2 + 0.00054**2).sqrt() - 0.00054) / gap
    torch.testing.assert_close(loss.double(), expected, rtol=1e-3, atol=1e-6)


# --- shared dropout --------------------------------------------------------------------------------------------------


class DropoutNet(nn.Module):
    def __init__(self, ignore_input=False):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.ignore_input = ignore_input

    def forward(self, x, sigma, class_labels=None):
        h = torch.ones_like(x) if self.ignore_input else x
        return self.drop(self.conv(h))


def test_shared_rng_gives_identical_networks_identical_dropout_masks():
    torch.manual_seed(0)
    online = DropoutNet().train()
    target = copy.deepcopy(online)
    x = data(8, (2, 3, 6, 6))
    sigma = torch.ones(2)
    rng = SharedRNG(x.device)
    with rng:
        a = online(x, sigma)
    with rng:
        b = target(x, sigma)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(online(x, sigma), target(x, sigma))  # without the helper the masks differ


@pytest.mark.parametrize("with_target", [True, False])
def test_consistency_losses_share_dropout_masks(with_target):
    torch.manual_seed(1)
    net = DropoutNet(ignore_input=True).train()  # output = dropout(constant): equal exactly when the masks are
    target = copy.deepcopy(net) if with_target else None
    x = data(9, (3, 3, 4, 4))
    ct = CTLoss(target, 100, distance="l2")(net, x, step=50)
    cd = CDLoss(GaussianDenoiser(), target, num_scales=10, distance="l2")(net, x)
    assert float(ct.detach().abs().max()) == 0 and float(cd.detach().abs().max()) == 0
    assert not torch.equal(net(x, None), net(x, None))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_shared_rng_on_cuda():
    torch.manual_seed(0)
    online = DropoutNet().cuda().train()
    target = copy.deepcopy(online)
    x = data(10, (2, 3, 6, 6)).cuda()
    rng = SharedRNG(x.device)
    with rng:
        a = online(x, None)
    with rng:
        b = target(x, None)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(online(x, None), target(x, None))
    net = DropoutNet(ignore_input=True).cuda().train()
    assert float(CTLoss(None, 100, distance="l2")(net, x, step=50).detach().abs().max()) == 0
