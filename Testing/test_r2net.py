"""R2Net and MS-R2Net (methods/r2net.py, methods/ms_r2net.py): Lipschitz-continuous residual
blocks, shared (SVF) and separate (NSVF) weights, identity at zero velocity, the chunk split/merge
of MS-R2Net and its two training phases, and the shipped checkpoints: their model cards recompute
from their weights and their strict folding stays under the project's target."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import jvp, vjp

from conftest import blob_volume, make_image
from DeepRegistrationLib import engine, spatial, synthetic
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.methods import get_method, ms_r2net, r2net, save_checkpoint

SHAPE = (32, 32, 32)
# forward-mode AD (torch.func.jvp) loads decompositions through the deprecated torch.jit.script
pytestmark = pytest.mark.filterwarnings(
    "ignore:`torch.jit.script` is deprecated:DeprecationWarning")


def pair(shape=SHAPE, seed=0):
    fixed = torch.from_numpy(blob_volume(shape, seed))[None, None]
    moving = torch.from_numpy(blob_volume(shape, seed + 1))[None, None]
    return fixed / fixed.max(), moving / moving.max()


def smooth_velocity(magnitude, shape=SHAPE, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return synthetic.random_velocity(shape, 8.0, magnitude, generator)


def operator_norm(function, shape, iterations=60, seed=0):
    """Largest gain of a linear ``function`` by power iteration (adjoint by autograd)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    for _ in range(iterations):
        y, adjoint = vjp(function, x)
        (x,) = adjoint(y)
        x = x / x.norm()
    return float(function(x).norm().detach())


def local_lipschitz(function, point, iterations=60, seed=0):
    """Largest singular value of the Jacobian of ``function`` at ``point`` by power iteration on
    ``J^T J`` (Jacobian-vector products forward, vector-Jacobian products back)."""
    u = torch.randn(point.shape, generator=torch.Generator().manual_seed(seed))
    for _ in range(iterations):
        _, ju = jvp(function, (point,), (u / u.norm(),))
        _, adjoint = vjp(function, point)
        (u,) = adjoint(ju)
    _, ju = jvp(function, (point,), (u / u.norm(),))
    return float(ju.norm().detach())


# ------------------------------------------------------------------------ Lipschitz continuity
@pytest.mark.parametrize("stationary", [True, False])
def test_block_lipschitz_constant_is_at_most_the_step_scale(stationary):
    torch.manual_seed(1)
    network = r2net.build_network({"stationary": stationary, "blocks": 3}).eval()
    for index, block in enumerate(network.integrate.blocks):
        h = block.step_scale
        gains = [local_lipschitz(block.residual, point, iterations=40, seed=index)
                 for point in (torch.zeros(1, 3, 16, 16, 16), 0.3 * torch.randn(1, 3, 16, 16, 16),
                               smooth_velocity(2.0, (16, 16, 16), seed=index))]
        assert max(gains) <= 1.03 * h, gains
        # ... and the bound is not far from attained: the constraint does not over-shrink F
        assert max(gains) > 0.3 * h, gains


def test_each_convolution_has_operator_norm_one():
    """Per-layer operator norms by power iteration on the convolution itself (with its replicate
    padding): 1 up to the power iteration; the reshaped-matrix normalisation of the paper's code
    ("matrix") leaves 3x3x3 convolutions well above 1, which is why it is not the default."""
    torch.manual_seed(2)
    for mode, low, high in (("operator", 0.97, 1.02), ("matrix", 1.05, math.sqrt(27))):
        network = r2net.build_network({"stationary": False, "blocks": 4, "lipschitz": mode}).eval()
        norms = []
        for block in network.integrate.blocks:
            w1, w2 = block.conv1.weight.detach(), block.conv2.weight.detach()
            n1 = operator_norm(lambda x: r2net.padded_conv(x, w1), (1, 3, 24, 24, 24))
            n2 = operator_norm(lambda x: r2net.padded_conv(x, w2), (1, 3, 8, 8, 8))
            assert n2 == pytest.approx(1.0, abs=0.01)
            norms.append(n1)
        assert all(low <= n <= high for n in norms), (mode, norms)


@pytest.mark.parametrize("name", ["r2net-svf", "r2net-nsvf", "ms-r2net"])
def test_shipped_weights_keep_every_block_lipschitz(name):
    """On the *trained* weights of a shipped checkpoint: each block's convolutions have operator
    norm about 1 (power iteration on the padded convolution itself) and each block's local
    Lipschitz constant stays below its step scale h (up to the power iteration's 3%)."""
    spec = get_method(name)
    if spec.checkpoint_path() is None:
        pytest.skip(f"{name} has no shipped checkpoint")
    from DeepRegistrationLib.methods import load_network
    network = load_network(spec)
    blocks = list(network.integrate.blocks)
    if name == "ms-r2net":
        blocks += list(network.chunk_branch.integrate.blocks)
    for index, block in enumerate(blocks):
        w1, w2 = block.conv1.weight.detach(), block.conv2.weight.detach()
        assert operator_norm(lambda x: r2net.padded_conv(x, w1), (1, 3, 20, 20, 20),
                             iterations=40) == pytest.approx(1.0, abs=0.03)
        assert operator_norm(lambda x: r2net.padded_conv(x, w2), (1, 3, 8, 8, 8),
                             iterations=40) == pytest.approx(1.0, abs=0.01)
        point = smooth_velocity(2.0, (16, 16, 16), seed=index)
        gain = local_lipschitz(block.residual, point, iterations=30, seed=index)
        assert gain <= 1.03 * block.step_scale, (index, gain)


def test_an_unconverged_norm_estimate_is_converged_before_it_is_trusted():
    """One power iteration underestimates the padded convolution's norm, so the normalised
    kernel can exceed the Lipschitz bound (what a 100-step phase-2 MS-R2Net block shipped with);
    ``converge_operator_norms`` -- run by the trainer before every validation, so before every
    save -- brings it to 1."""
    torch.manual_seed(8)
    conv = torch.nn.Conv3d(3, 3, 3, padding=0, bias=False)
    # a kernel whose top mode lives at the border (34 % above the interior's norm, which the
    # spectrum gives exactly), where only the power iteration sees it
    with torch.no_grad():
        conv.weight.copy_(torch.randn(3, 3, 3, 3, 3))
    torch.nn.utils.parametrize.register_parametrization(
        conv, "weight", r2net.OperatorSpectralNorm(conv.weight.detach(), initial_iterations=0))
    conv.eval()

    def gain():
        weight = conv.weight.detach()
        return operator_norm(lambda x: r2net.padded_conv(x, weight), (1, 3, 20, 20, 20),
                             iterations=60)
    assert gain() > 1.03   # beyond what the shipped-weights test allows
    module = torch.nn.Sequential(conv)
    r2net.converge_operator_norms(module)
    assert gain() == pytest.approx(1.0, abs=0.01)


def test_conv_operator_norm_is_the_convolution_gain():
    torch.manual_seed(3)
    weight = torch.randn(3, 3, 3, 3, 3)
    periodic = operator_norm(lambda x: F.conv3d(F.pad(x, (1,) * 6, mode="circular"), weight),
                             (1, 3, 16, 16, 16), iterations=200)
    assert float(r2net.conv_operator_norm(weight)) == pytest.approx(periodic, rel=0.01)
    matrix = float(torch.linalg.matrix_norm(weight.flatten(1), ord=2))
    assert float(r2net.conv_operator_norm(weight)) > 1.2 * matrix  # why 'matrix' is not enough


def test_blocks_are_invertible_by_fixed_point_iteration():
    """Lip(F) < 1 makes v -> v + F(v) invertible (i-ResNet): x = y - F(x) converges."""
    torch.manual_seed(4)
    block = r2net.build_network({}).eval().integrate.blocks[0]
    v = smooth_velocity(3.0)
    with torch.no_grad():
        y = block(v)
        x = y.clone()
        for _ in range(40):
            x = y - block.residual(x)
    assert (x - v).abs().max() < 1e-5


# ------------------------------------------------------------------------- SVF versus NSVF
def test_svf_blocks_share_parameters_and_nsvf_blocks_do_not():
    def block_parameters(config):
        return sum(p.numel() for p in r2net.build_network(config).integrate.parameters())

    svf = r2net.build_network({"stationary": True, "blocks": 7})
    steps = svf.integrate.step_blocks
    assert len(steps) == 7 and all(block is steps[0] for block in steps)
    first, last = list(steps[0].parameters()), list(steps[-1].parameters())
    assert all(a is b for a, b in zip(first, last))
    assert block_parameters({"stationary": True, "blocks": 2}) == \
        block_parameters({"stationary": True, "blocks": 7})

    nsvf = r2net.build_network({"stationary": False, "blocks": 7})
    steps = nsvf.integrate.step_blocks
    assert len({id(block) for block in steps}) == 7
    pointers = [p.data_ptr() for block in steps for p in block.parameters()]
    assert len(set(pointers)) == len(pointers)
    one = block_parameters({"stationary": False, "blocks": 1})
    assert block_parameters({"stationary": False, "blocks": 7}) == 7 * one
    assert block_parameters({"stationary": True, "blocks": 7}) == one


def test_the_last_state_is_the_displacement():
    torch.manual_seed(5)
    network = r2net.build_network({"stationary": False}).eval()
    with torch.no_grad():
        torch.nn.init.normal_(network.flow.weight, 0.0, 0.05)
        fixed, moving = pair()
        v0 = network.velocity(fixed, moving)
        states = network.integrate(v0, trajectory=True)
        assert len(states) == 8 and torch.equal(states[0], v0)
        for block, before, after in zip(network.integrate.step_blocks, states, states[1:]):
            assert torch.allclose(after, before + block.residual(before), atol=1e-6)
            assert (after - before).abs().max() <= block.step_scale  # tanh bounds each step
        assert torch.equal(network(fixed, moving), states[-1])


# ------------------------------------------------------------------- identity and no folding
def zero_heads(module):
    for head in [m for name, m in module.named_modules() if name.endswith("flow")]:
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
    return module


@pytest.mark.parametrize("config", [{"stationary": True}, {"stationary": False}])
def test_zero_velocity_network_is_the_identity(config):
    network = zero_heads(r2net.build_network(config))
    fixed, moving = pair()
    with torch.no_grad():
        assert torch.equal(network(fixed, moving), torch.zeros(1, 3, *SHAPE))
        # fresh (not zeroed) networks start near the identity too
        assert r2net.build_network(config)(fixed, moving).abs().max() < 1e-2


@pytest.mark.parametrize("phase", [1, 2])
def test_zero_velocity_ms_r2net_is_the_identity(phase):
    network = zero_heads(ms_r2net.build_network({"phase": phase}))
    fixed, moving = pair((34, 30, 36))
    with torch.no_grad():
        assert torch.equal(network(fixed, moving), torch.zeros(1, 3, 34, 30, 36))


# ------------------------------------------------- the shipped checkpoints (property tests)
SHIPPED = ["vm-diff", "r2net-svf", "r2net-nsvf", "ms-r2net"]
# the project's folding target (issues #4 and #5: "% folding under 0.5 without refinement"),
# held to by the strict measure -- a voxel is folded when any of its 8 one-sided Jacobians has
# det <= 0, which central differences can miss -- on the mean over the card's validation cases,
# and no single case above twice that
STRICT_FOLDING_MEAN_BOUND = 0.5
STRICT_FOLDING_CASE_BOUND = 1.0


def shipped(name):
    spec = get_method(name)
    if spec.checkpoint_path() is None:
        pytest.skip(f"{name} has no shipped checkpoint")
    from DeepRegistrationLib.methods import load_network
    from DeepRegistrationLib.methods.base import read_model_card
    card = read_model_card(spec.checkpoint_path())
    assert card is not None, f"the shipped {name} checkpoint has no model card"
    return load_network(spec), card


@pytest.mark.parametrize("name", SHIPPED)
def test_the_shipped_card_recomputes_from_the_shipped_weights(name):
    """Each card's validation figures (Dice, ground-truth error, folding, SDlogJ, NCC) come back
    from the shipped weights on the card's own validation cases (tolerances in
    Testing/model_cards.py); vm-diff is the R2Nets' baseline in every comparison."""
    from model_cards import differences
    network, card = shipped(name)
    assert differences(network, card) == {}


@pytest.mark.parametrize("name", ["r2net-svf", "r2net-nsvf", "ms-r2net"])
def test_the_shipped_r2nets_strict_folding_stays_under_the_target(name):
    from model_cards import validation_pairs
    from DeepRegistrationLib.metrics import folding_percent_strict
    network, card = shipped(name)
    folding = []
    with torch.inference_mode():
        for pair in validation_pairs(card):
            folding.append(folding_percent_strict(network(pair.fixed, pair.moving).clone()))
    assert np.mean(folding) < STRICT_FOLDING_MEAN_BOUND, folding
    assert max(folding) < STRICT_FOLDING_CASE_BOUND, folding


# -------------------------------------------------------------------------------- MS chunks
@pytest.mark.parametrize("shape", [(32, 32, 32), (33, 40, 29), (96, 128, 112)])
def test_chunk_split_and_merge_reproduce_a_field_exactly(shape):
    fields = [smooth_velocity(4.0, shape), torch.full((1, 3, *shape), 2.7)]
    for field in fields:
        chunks = ms_r2net.split_chunks(field, k=2, overlap=2)
        assert len(chunks) == 8 and len({tuple(c.shape) for c in chunks}) == 1
        assert torch.equal(ms_r2net.merge_chunks(chunks, shape, overlap=2), field)
    for n in shape:
        size, starts = ms_r2net.chunk_layout(n, 2, 2)
        assert starts[0] == 0 and starts[-1] + size == n
        assert size - (starts[1] - starts[0]) >= 2  # neighbours overlap by at least 2 voxels
    assert ms_r2net.chunk_layout(32, 2, 2) == (17, [0, 15])  # exactly 2 when it divides


def test_merge_averages_the_overlaps():
    shape = (20, 20, 20)
    chunks = [torch.full((1, 1, 11, 11, 11), float(index)) for index in range(8)]
    merged = ms_r2net.merge_chunks(chunks, shape, overlap=2)
    assert merged[0, 0, 0, 0, 0] == 0.0 and merged[0, 0, -1, -1, -1] == 7.0
    assert merged[0, 0, 9, 0, 0] == pytest.approx((0 + 4) / 2)     # two chunks along D
    assert merged[0, 0, 9, 9, 9] == pytest.approx(sum(range(8)) / 8)  # the centre: all eight
    three = ms_r2net.split_chunks(torch.arange(27.0 ** 2).view(1, 1, 9, 9, 9), k=3, overlap=1)
    assert len(three) == 27
    with pytest.raises(ValueError):
        ms_r2net.merge_chunks(chunks[:7], shape)


def test_ms_phases_train_the_right_parts():
    fixed, moving = pair((34, 30, 36))
    for phase, trained, frozen in ((1, ("chunk_branch", "global_branch"), ("fuse", "integrate")),
                                   (2, ("fuse", "integrate"), ("chunk_branch", "global_branch"))):
        torch.manual_seed(phase)
        network = ms_r2net.build_network({"phase": phase})
        loss, terms = ms_r2net.training_loss(network, fixed, moving, None)
        loss.backward()
        assert all(isinstance(v, float) for v in terms.values())
        for name, parameter in network.named_parameters():
            has_gradient = parameter.grad is not None and bool(parameter.grad.abs().sum() > 0)
            if name.startswith(trained):
                assert has_gradient, name
            elif name.startswith(frozen):
                assert not has_gradient, name
        if phase == 1:
            assert set(terms) == {f"{branch}_{term}" for branch in ("chunk", "global")
                                  for term in ("lncc", "folding", "diffusion")}
        with torch.no_grad():
            assert network(fixed, moving).shape == (1, 3, 34, 30, 36)


def test_fuse_starts_as_the_mean_of_the_two_velocities():
    network = ms_r2net.build_network({"phase": 2})
    a, b = smooth_velocity(2.0, seed=1), smooth_velocity(2.0, seed=2)
    with torch.no_grad():
        assert torch.allclose(network.fuse_velocities(a, b), 0.5 * (a + b), atol=1e-6)


# ------------------------------------------------------------------------ loss, specs, engine
def test_training_loss_is_similarity_plus_weighted_folding():
    torch.manual_seed(6)
    network = r2net.build_network({})
    fixed, moving = pair()
    total, terms = r2net.training_loss(network, fixed, moving, {"multimodal": [False]})
    total.backward()
    assert set(terms) == {"lncc", "folding", "diffusion"}   # LNCC + smoothness: our recipe
    assert network.unet.stem[0].weight.grad is not None
    assert network.integrate.blocks[0].conv1.parametrizations.weight.original.grad is not None
    # the folding term is the library's negative Jacobian loss, identity added once
    folded = torch.zeros(1, 3, *SHAPE)
    folded[0, 2] = -2.0 * spatial.identity_grid(SHAPE)[0, 2]   # x -> -x along W: det = -1
    value, parts = r2net.registration_loss(folded, fixed, moving)   # the paper's: MSE + folding
    assert set(parts) == {"mse", "folding"}
    assert parts["folding"] == pytest.approx(1.0)
    assert float(value) == pytest.approx(parts["mse"] + r2net.FOLDING_WEIGHT, rel=1e-5)
    assert r2net.registration_loss(torch.zeros(1, 3, *SHAPE), fixed, moving)[1]["folding"] == 0
    ngf = r2net.build_network({"similarity": "ngf"})
    assert "ngf" in r2net.training_loss(ngf, fixed, moving)[1]
    with pytest.raises(ValueError):
        r2net.build_network({"similarity": "nonsense"})
    with pytest.raises(UserInputError):
        r2net.build_network({"lipschitz": "nonsense"})


@pytest.mark.parametrize("name", ["r2net-svf", "ms-r2net"])
def test_engine_runs_from_a_checkpoint(name, tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPREG_CHECKPOINTS", str(tmp_path))  # searched before Resources/
    spec = get_method(name)
    torch.manual_seed(7)
    network = spec.build_network(spec.config)
    with torch.no_grad():  # a visible initial velocity, so the field shows the checkpoint is used
        for head in [m for n, m in network.named_modules() if n.endswith("flow")]:
            torch.nn.init.normal_(head.weight, 0.0, 0.02)
    save_checkpoint(str(tmp_path / f"{name}.pt"), network, name, dict(spec.config), {"test": 1})
    fixed = make_image(blob_volume((20, 18, 22), 0), spacing=(4.0, 4.0, 4.0))
    moving = make_image(blob_volume((20, 18, 22), 1), spacing=(4.0, 4.0, 4.0))
    result = engine.register(fixed, moving, name)
    assert result.displacement.shape == (1, 3, 20, 18, 22)
    assert torch.isfinite(result.displacement).all()
    assert result.displacement.abs().max() > 0.01
    again = engine.register(fixed, moving, name)   # deterministic
    assert torch.equal(again.displacement, result.displacement)


def test_ms_init_starts_both_branches_from_a_trained_r2net(tmp_path):
    """``python -m training ms-init``: a warm start whose branches hold the R2Net's weights,
    loadable by the trainer (method ms-r2net); a non-R2Net checkpoint is a one-line error."""
    from DeepRegistrationLib.methods import save_checkpoint
    from training.__main__ import main
    torch.manual_seed(3)
    source = r2net.build_network({"stationary": False})
    save_checkpoint(str(tmp_path / "nsvf.pt"), source, "r2net-nsvf",
                    dict(r2net.DEFAULT_CONFIG, stationary=False), {})
    assert main(["ms-init", "--from", str(tmp_path / "nsvf.pt"),
                 "--output", str(tmp_path / "ms.pt")]) == 0
    state = torch.load(tmp_path / "ms.pt", weights_only=False)
    assert state["method"] == "ms-r2net"
    network = ms_r2net.build_network(state["config"])
    network.load_state_dict(state["state_dict"])
    for branch in (network.chunk_branch, network.global_branch):
        for name, value in source.state_dict().items():
            assert torch.equal(branch.state_dict()[name], value), name
    save_checkpoint(str(tmp_path / "vm.pt"), torch.nn.Linear(1, 1), "vm-diff", {}, {})
    assert main(["ms-init", "--from", str(tmp_path / "vm.pt"),
                 "--output", str(tmp_path / "x.pt")]) == 2
