"""SUITS (methods/suits.py): the linear system and its differentiable solve against dense linear
algebra, the descent's sign convention, the Y-shaped network's weight sharing, the two training
phases, and running through the engine and the trainer without a shipped checkpoint."""
import numpy as np
import pytest
import torch

from conftest import blob_volume, make_image
from DeepRegistrationLib import engine, spatial
from DeepRegistrationLib.errors import UserInputError
from DeepRegistrationLib.losses import mind_ssc
from DeepRegistrationLib.methods import base, get_method, save_checkpoint, suits

TINY = (4, 5, 3)


def random_gradients(shape=TINY, channels=4, seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn((1, channels, 3, *shape), generator=generator, dtype=dtype)


def dense_matrix(blocks, regularization, epsilon):
    """``A`` as a dense (3N, 3N) matrix, column by column from the matrix-free product."""
    shape = blocks.shape[3:]
    size = 3 * int(np.prod(shape))
    columns = suits.block_columns(blocks)
    eye = torch.eye(size, dtype=blocks.dtype)
    return torch.stack([suits.system_apply(columns, e.view(1, 3, *shape), regularization,
                                           epsilon).flatten() for e in eye], dim=1)


def edge_laplacian(shape):
    """The 6-neighbour graph Laplacian of a grid built edge by edge (numpy, for one channel)."""
    index = np.arange(int(np.prod(shape))).reshape(shape)
    laplacian = np.zeros((index.size, index.size))
    for axis in range(3):
        first = np.take(index, range(shape[axis] - 1), axis=axis).ravel()
        second = np.take(index, range(1, shape[axis]), axis=axis).ravel()
        for a, b in zip(first, second):
            laplacian[a, a] += 1
            laplacian[b, b] += 1
            laplacian[a, b] -= 1
            laplacian[b, a] -= 1
    return laplacian


# ------------------------------------------------------------------------------------ the system
def test_laplacian_matches_the_edge_list_and_vanishes_on_constants():
    shape = (4, 5, 6)
    field = torch.randn((1, 3, *shape), dtype=torch.float64)
    expected = edge_laplacian(shape) @ field[0].reshape(3, -1).numpy().T
    assert np.allclose(suits.graph_laplacian(field)[0].reshape(3, -1).numpy().T, expected)
    constant = torch.full((1, 3, *shape), 2.5, dtype=torch.float64)
    assert suits.graph_laplacian(constant).abs().max() == 0
    degree = np.diag(edge_laplacian(shape)).reshape(shape)
    assert np.array_equal(suits.neighbour_count(shape)[0, 0].numpy(), degree)


def test_system_is_symmetric_positive_definite_even_where_features_are_flat():
    gradients = random_gradients()
    gradients[..., :2, :, :] = 0.0     # flat features in part of the grid: no data term there
    blocks = suits.data_blocks(gradients)
    matrix = dense_matrix(blocks, 0.7, 1e-3)
    assert torch.allclose(matrix, matrix.T, atol=1e-12)
    assert torch.linalg.eigvalsh(matrix).min() > 0.5e-3   # at least eps
    # without data term and eps, only the constant fields are in the null space of lambda L
    bare = dense_matrix(torch.zeros_like(blocks), 0.7, 0.0)
    assert int((torch.linalg.eigvalsh(bare).abs() < 1e-10).sum()) == 3


def test_preconditioned_cg_equals_a_dense_solve():
    gradients = random_gradients(seed=1)
    blocks = suits.data_blocks(gradients)
    rhs = torch.randn((1, 3, *TINY), dtype=torch.float64,
                      generator=torch.Generator().manual_seed(2))
    solution = suits.solve(blocks, rhs, 0.7, 1e-3, tolerance=1e-13, max_iterations=500)
    dense = torch.linalg.solve(dense_matrix(blocks, 0.7, 1e-3), rhs.flatten())
    assert torch.allclose(solution.flatten(), dense, atol=1e-9)


def test_batch_items_are_solved_as_separate_systems():
    blocks = torch.cat([suits.data_blocks(random_gradients(seed=s)) for s in (3, 4)])
    rhs = torch.randn((2, 3, *TINY), dtype=torch.float64)
    together = suits.solve(blocks, rhs, 0.5, 1e-3, tolerance=1e-13, max_iterations=500)
    for item in range(2):
        alone = suits.solve(blocks[item:item + 1], rhs[item:item + 1], 0.5, 1e-3,
                            tolerance=1e-13, max_iterations=500)
        assert torch.allclose(together[item:item + 1], alone, atol=1e-10)


def test_gradcheck_of_the_solve():
    blocks = suits.data_blocks(random_gradients((3, 3, 2), seed=5))
    rhs = torch.randn((1, 3, 3, 3, 2), dtype=torch.float64, requires_grad=True)
    settings = dict(regularization=0.6, epsilon=1e-3, tolerance=1e-13, max_iterations=500)
    assert torch.autograd.gradcheck(lambda b: suits.solve(blocks, b, **settings), (rhs,),
                                    fast_mode=True)

    # the block matrix, with matrix_grad (on a smaller grid: 9 inputs per voxel); perturbations
    # are kept symmetric by construction
    small = suits.data_blocks(random_gradients((2, 3, 2), seed=8))
    small_rhs = torch.randn((1, 3, 2, 3, 2), dtype=torch.float64)

    def through_blocks(raw):
        symmetric = 0.5 * (raw + raw.transpose(1, 2)) + small
        return suits.solve(symmetric, small_rhs, matrix_grad=True, **settings)
    raw = (0.1 * torch.randn_like(small)).requires_grad_(True)
    assert torch.autograd.gradcheck(through_blocks, (raw,), fast_mode=True)
    # without matrix_grad (the default) the blocks are constants of the solve
    tracked = blocks.clone().requires_grad_(True)
    suits.solve(tracked, rhs, **settings).sum().backward()
    assert tracked.grad is None and rhs.grad is not None


def test_the_backward_pass_solves_the_adjoint_instead_of_unrolling_cg():
    blocks = suits.data_blocks(random_gradients(seed=6))
    rhs = torch.randn((1, 3, *TINY), dtype=torch.float64, requires_grad=True)
    solution = suits.solve(blocks, rhs, 0.6, 1e-3, tolerance=1e-13, max_iterations=500)
    assert type(solution.grad_fn).__name__ == "LinearSolveBackward"
    assert [type(f).__name__ for f, _ in solution.grad_fn.next_functions if f is not None] \
        == ["AccumulateGrad"]
    weights = torch.randn_like(solution)
    (grad,) = torch.autograd.grad((solution * weights).sum(), rhs)
    matrix = dense_matrix(blocks, 0.6, 1e-3)
    assert torch.allclose(grad.flatten(), torch.linalg.solve(matrix.T, weights.flatten()),
                          atol=1e-9)


def test_identical_representations_and_zero_field_give_no_step():
    features = torch.rand((1, 12, 9, 10, 8))
    step = suits.descent_step(features, features.clone(), torch.zeros((1, 3, 9, 10, 8)), 1.0)
    assert torch.equal(step, torch.zeros_like(step))


def test_identical_channels_at_lambda_equal_one_channel_at_lambda_over_c():
    generator = torch.Generator().manual_seed(7)
    fixed = torch.rand((1, 1, 8, 9, 7), generator=generator, dtype=torch.float64)
    moving = torch.rand((1, 1, 8, 9, 7), generator=generator, dtype=torch.float64)
    field = 0.3 * torch.randn((1, 3, 8, 9, 7), generator=generator, dtype=torch.float64)
    copies = 5
    settings = dict(tolerance=1e-13, max_iterations=1000)
    many = suits.descent_step(fixed.repeat(1, copies, 1, 1, 1), moving.repeat(1, copies, 1, 1, 1),
                              field, 2.0, epsilon=1e-3, **settings)
    one = suits.descent_step(fixed, moving, field, 2.0 / copies, epsilon=1e-3 / copies,
                             **settings)
    assert torch.allclose(many, one, atol=1e-9)


def blob_and_shifted(shift, shape=(33, 33, 33)):
    fixed = torch.from_numpy(blob_volume(shape, seed=1, blobs=20))[None, None]
    fixed = fixed / fixed.max()
    translation = torch.zeros((1, 3, *shape))
    for axis, value in enumerate(shift):
        translation[:, axis] = value
    moving = spatial.warp(fixed, -translation)   # moving(x) = fixed(x - t): the answer is u = +t
    return fixed, moving


def test_one_iteration_recovers_a_translation_in_the_library_convention():
    fixed, moving = blob_and_shifted((1.5, 0.0, -1.0))
    coarse = suits.feature_shape(fixed.shape[2:])
    fixed_features = spatial.resize_image(mind_ssc(fixed), coarse)
    moving_features = spatial.resize_image(mind_ssc(moving), coarse)
    field = torch.zeros((1, 3, *coarse))
    step = suits.descent_step(fixed_features, moving_features, field, 1.0, tolerance=1e-6,
                              max_iterations=300)
    inner = step[:, :, 4:-4, 4:-4, 4:-4]
    # feature-grid voxels are two working-grid voxels: the shift is (0.75, 0, -0.5) of them
    assert inner[:, 0].mean() > 0.4 and inner[:, 2].mean() < -0.25
    assert inner[:, 1].abs().mean() < 0.15
    before = ((moving_features - fixed_features) ** 2).sum()
    after = ((spatial.warp(moving_features, step) - fixed_features) ** 2).sum()
    assert after < 0.5 * before


def test_the_descent_with_mind_features_registers_a_translation():
    fixed, moving = blob_and_shifted((2.0, 0.0, -1.0))
    network = suits.build_network({"cg_tolerance": 1e-3, "cg_iterations": 200})
    with torch.no_grad():
        displacement = network(fixed, moving, representation="mind", regularization=1.0)
    assert displacement.shape == (1, 3, 33, 33, 33)
    inner = displacement[:, :, 8:-8, 8:-8, 8:-8]
    assert abs(float(inner[:, 0].mean()) - 2.0) < 0.3
    assert abs(float(inner[:, 2].mean()) + 1.0) < 0.3
    assert float(((spatial.warp(moving, displacement) - fixed) ** 2).mean()) \
        < 0.05 * float(((moving - fixed) ** 2).mean())


# ----------------------------------------------------------------------------- feature network
def test_layers_three_to_five_are_shared_and_one_two_are_not():
    network = suits.build_network({}).features
    fixed_stream, moving_stream = network.streams["fixed"], network.streams["moving"]
    for index in (0, 1):   # layers 1 and 2
        assert fixed_stream[index][0].weight.data_ptr() != moving_stream[index][0].weight.data_ptr()
    assert fixed_stream[0][0].kernel_size == (5, 5, 5) and fixed_stream[0][0].dilation == (2, 2, 2)
    assert network.shared[0][0].stride == (2, 2, 2)
    # Table 1: about 98k weights
    assert 95_000 < sum(p.numel() for p in network.parameters()) < 100_000
    # a loss on the moving stream reaches the shared layers and its own stream only
    image = torch.rand((1, 1, 9, 11, 9))
    network.features(image, "moving").sum().backward()
    assert all(p.grad is not None for p in network.shared.parameters())
    assert all(p.grad is not None for p in moving_stream.parameters())
    assert all(p.grad is None for p in fixed_stream.parameters())
    features = network.features(image, "fixed")
    assert features.shape == (1, 12, 5, 6, 5) and features.min() >= 0 and features.max() <= 1


def test_feature_grid_corners_sit_on_the_input_corners():
    """Odd sides: feature voxel j is input voxel 2j, so resizing a field between the two grids
    (corners aligned) is exact; even sides are padded to odd and cropped back."""
    assert suits.feature_shape((9, 11, 7)) == (5, 6, 4)
    network = suits.build_network({})
    image = torch.rand((1, 1, 10, 11, 12))
    assert tuple(suits.pad_to_odd(image).shape[2:]) == (11, 11, 13)
    with torch.no_grad():
        out = network(image, image)
    assert out.shape == (1, 3, 10, 11, 12)


# ------------------------------------------------------------------------------------- training
def labelled_pair(shape=(17, 19, 15), seed=3):
    fixed = torch.from_numpy(blob_volume(shape, seed=seed, blobs=10))[None, None]
    fixed = fixed / fixed.max()
    moving = spatial.warp(fixed, torch.full((1, 3, *shape), 1.0))
    labels = lambda image: torch.bucketize(image, torch.tensor([0.35, 0.65]))   # noqa: E731
    return fixed, moving, labels(fixed), labels(moving)


def graph_size(tensor):
    seen, stack = set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(f for f, _ in node.next_functions)
    return len(seen)


def test_only_the_tracked_iteration_builds_a_graph():
    fixed, moving, fixed_labels, moving_labels = labelled_pair()
    network = suits.build_network({})
    sizes = []
    for k_back in (1, 4, network.iterations):
        loss, terms = suits.weakly_supervised(network, fixed, moving, fixed_labels,
                                              moving_labels, k_back)
        assert terms["k_back"] == k_back and loss.requires_grad
        sizes.append(graph_size(loss))
    assert sizes[0] == sizes[1] == sizes[2]
    # and the label-driven iterations did move the field before the tracked one
    with torch.no_grad():
        early = suits.weakly_supervised(network, fixed, moving, fixed_labels, moving_labels, 1)
        late = suits.weakly_supervised(network, fixed, moving, fixed_labels, moving_labels, 8)
    assert late[0] < early[0]


def test_phase_losses_reach_the_right_parameters():
    fixed, moving, fixed_labels, moving_labels = labelled_pair()
    network = suits.build_network({"mind_fraction": 0.5})
    batch = {"fixed_labels": fixed_labels, "moving_labels": moving_labels, "training": True,
             "iterations": 10}
    loss, terms = suits.training_loss(network, fixed, moving, dict(batch, step=2))
    assert set(terms) == {"mind_l1_fixed", "mind_l1_moving"}
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in network.parameters())
    network.zero_grad(set_to_none=True)
    loss, terms = suits.training_loss(network, fixed, moving, dict(batch, step=7))
    assert "cross_entropy" in terms
    loss.backward()
    grads = [p.grad for p in network.features.shared.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert suits.draw_k_back(15, 7) == suits.draw_k_back(15, 7)
    assert {suits.draw_k_back(15, s) for s in range(200)} == set(range(1, 16))


def test_mind_pretraining_lowers_its_loss():
    fixed, moving, _, _ = labelled_pair((11, 13, 9))
    torch.manual_seed(0)
    network = suits.build_network({"mind_fraction": 1.0})
    optimiser = torch.optim.Adam(network.parameters(), lr=5e-3)
    first = None
    for _ in range(8):
        loss, _ = suits.mind_targets(network, fixed, moving)
        first = loss.item() if first is None else first
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert suits.mind_targets(network, fixed, moving)[0].item() < 0.7 * first


# --------------------------------------------------------------------------- engine and trainer
def _images(shape=(30, 34, 28), spacing=(3.0, 3.0, 3.0)):
    fixed = blob_volume(shape, seed=5, blobs=16)
    moving = np.roll(fixed, 1, axis=0)
    return make_image(fixed, spacing), make_image(moving, spacing)


def test_engine_runs_suits_from_a_checkpoint_and_mind_without_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPREG_CHECKPOINTS", str(tmp_path))  # searched before Resources/
    spec = get_method("suits")
    fixed, moving = _images()
    torch.manual_seed(0)
    save_checkpoint(str(tmp_path / "suits.pt"), suits.build_network(spec.config), "suits",
                    dict(spec.config), {"test": "random weights"})
    result = engine.register(fixed, moving, "suits")
    assert result.displacement.shape == (1, 3, 30, 34, 28)
    assert torch.isfinite(result.displacement).all()
    # hand-crafted MIND in the same solver, and --refine with mutual information on top
    mind = engine.register(fixed, moving, "suits", options={"variant": "mind"}, refine=10,
                           similarity="mi")
    assert mind.displacement.shape == (1, 3, 30, 34, 28) and mind.refine == 10
    assert mind.similarity == "mi"


def test_missing_checkpoints_are_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(base, "checkpoint_folders", lambda: [str(tmp_path)])
    fixed, moving = _images((12, 14, 10))
    with pytest.raises(UserInputError, match="suits.pt"):
        engine.register(fixed, moving, "suits")
    with pytest.raises(UserInputError, match="mind_fraction"):
        engine.register(fixed, moving, "suits", options={"variant": "replica"})
    with pytest.raises(UserInputError, match="variant"):
        engine.register(fixed, moving, "suits", options={"variant": "ADDD"})
    # the mind variant needs no checkpoint
    result = engine.register(fixed, moving, "suits", options={"variant": "mind"})
    assert result.displacement.shape == (1, 3, 12, 14, 10)


def test_the_trainer_runs_both_phases(tmp_path):
    from training.train import TrainOptions, train
    from test_training_loop import tiny_volume
    output = str(tmp_path / "suits.pt")
    card = train(TrainOptions(method="suits", output=output, iterations=2, sources=[tiny_volume()],
                              val_every=0, val_cases=1, batch_size=1, spacing_mm=8.0,
                              config={"mind_fraction": 0.5, "iterations": 3},
                              synth={"contrast_probability": 1.0}, progress=False, log_every=1))
    log = open(tmp_path / "suits.log").read()
    assert "mind_l1_moving" in log and "cross_entropy" in log
    assert card["method"] == "suits" and card["config"]["iterations"] == 3
    network = base.load_network(get_method("suits"), path=output)
    assert isinstance(network, suits.SUITS)
