"""Tests for the maze benchmark's data side: generation, routes, encoder, metrics, plots."""

import hashlib
import math
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from modgrad.mazes import (
    DOWN,
    LEFT,
    RIGHT,
    UP,
    WAIT,
    EncoderConfig,
    Maze,
    MazeDataset,
    MazeRng,
    VisualEncoder,
    correct_prefix_length,
    curriculum_horizon,
    curriculum_mask,
    first_step_accuracy,
    generate_maze,
    generate_mazes,
    load_maze_bank,
    moves_from_logits,
    per_step_accuracy,
    prefix_lengths,
    render_pixels,
    route_targets,
    save_maze_bank,
    save_maze_png,
    score_routes,
    select_loss_ticks,
    shortest_route,
    trace_moves,
)
from modgrad.mazes.encode import conv2d, lcg_normal, retina_filters, stamp_gabor_blocks

MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------
# helpers written independently of the package


def open_cell_graph(walls):
    """Return the open cells and the 4-neighbour edges between them."""
    cells = {(int(r), int(c)) for r, c in zip(*np.nonzero(~walls))}
    edges = 0
    for r, c in cells:
        edges += ((r + 1, c) in cells) + ((r, c + 1) in cells)
    return cells, edges


def bfs_distances(walls, start):
    dist = np.full(walls.shape, -1)
    dist[start] = 0
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < walls.shape[0] and 0 <= nc < walls.shape[1] and not walls[nr, nc] and dist[nr, nc] < 0:
                dist[nr, nc] = dist[r, c] + 1
                queue.append((nr, nc))
    return dist


def check_perfect_maze(maze: Maze):
    size = maze.size
    walls = maze.walls
    assert size % 2 == 1
    assert walls.shape == (size, size)
    assert walls[0, :].all()
    assert walls[-1, :].all()
    assert walls[:, 0].all()
    assert walls[:, -1].all()
    assert maze.start == (1, 1)
    assert maze.goal == (size - 2, size - 2)
    assert not walls[maze.start]
    assert not walls[maze.goal]
    # DFS visits every odd-odd cell, and even-even cells are never carved.
    assert not walls[1::2, 1::2].any()
    assert walls[0::2, 0::2].all()

    cells, edges = open_cell_graph(walls)
    dist = bfs_distances(walls, maze.start)
    reached = {(int(r), int(c)) for r, c in zip(*np.nonzero(dist >= 0))}
    assert reached == cells, "open cells are not connected"
    assert edges == len(cells) - 1, "open cells do not form a tree"


def check_route(maze: Maze):
    dist = bfs_distances(maze.walls, maze.start)
    assert maze.path_length == dist[maze.goal]
    cells, blocked = trace_moves(maze.walls, maze.start, maze.route)
    assert not blocked.any()
    assert tuple(cells[-1]) == maze.goal
    assert set(np.unique(maze.route)) <= {UP, DOWN, LEFT, RIGHT}
    # A shortest path never revisits a cell.
    assert len({tuple(c) for c in cells}) == len(cells)


# ----------------------------------------------------------------------------------------------
# generator


def test_rng_first_draws():
    rng = MazeRng(0)
    assert rng.next_u64() == 1442695040888963407
    rng = MazeRng(42)
    expected = (42 * 6364136223846793005 + 1442695040888963407) & MASK64
    assert rng.next_u64() == expected
    assert MazeRng(42).randrange(7) == (expected >> 33) % 7


# SHA-256 of the row-major '1'(wall)/'0' string of the first three size-21 mazes of seed 42 and
# their first moves, produced by a rustc build of the reference generator's algorithm.
GOLDEN_SEED42 = (
    ("b3fc9109f9a83b6f45ba9a90f3ff7796e02c3e315be7f173960df03fbf2f8c90", 56, [1, 1, 1, 1, 1, 1, 3, 3, 3, 3]),
    ("9cdf49d31a6d27a5c977fa4b782d375c9b86181627109a4e9a6fc1596309cc8a", 80, [3, 3, 3, 3, 3, 3, 1, 1, 2, 2]),
    ("390a06ce36e51518f7447081d960f207db65d6cb9f75c997170a03566d6ee451", 68, [3, 3, 3, 3, 1, 1, 1, 1, 3, 3]),
)


def walls_digest(maze):
    return hashlib.sha256("".join("1" if w else "0" for w in maze.walls.ravel()).encode()).hexdigest()


def test_mazes_match_reference_seed42():
    rng = MazeRng(42)
    for digest, path_length, first_moves in GOLDEN_SEED42:
        maze = generate_maze(21, rng)
        assert walls_digest(maze) == digest
        assert maze.path_length == path_length
        assert maze.route[:10].tolist() == first_moves


def test_maze_41_matches_reference():
    maze = generate_maze(41, MazeRng(12345))
    assert walls_digest(maze) == "d554f7cc0dc3f8bbc92a8004822b3028fd44fc569e9bd610446332da30f57f77"
    assert maze.path_length == 376


def test_rng_rejects_bad_input():
    with pytest.raises(ValueError, match="seed"):
        MazeRng(-1)
    with pytest.raises(ValueError, match="randrange"):
        MazeRng(1).randrange(0)


def test_maze_21_is_perfect():
    for seed in range(20):
        maze = generate_maze(21, MazeRng(seed))
        check_perfect_maze(maze)
        check_route(maze)


def test_maze_21_route_facts():
    for seed in range(50):
        maze = generate_maze(21, MazeRng(seed))
        assert maze.path_length >= 36  # Manhattan distance from (1, 1) to (19, 19)
        assert maze.route[0] in (DOWN, RIGHT)
        targets = route_targets(maze.route)
        assert targets.shape == (20,)
        np.testing.assert_array_equal(targets, maze.route[:20])
        assert WAIT not in targets


def test_route_matches_independent_bfs_order():
    # An open 3x3 room has several shortest paths from corner to corner. Expanding up, down,
    # left, right reaches the goal first through the cells below the start, so the route goes down first.
    walls = np.ones((5, 5), dtype=bool)
    walls[1:4, 1:4] = False
    route = shortest_route(walls, (1, 1), (3, 3))
    np.testing.assert_array_equal(route, [DOWN, DOWN, RIGHT, RIGHT])


def test_route_unreachable_goal_is_empty():
    walls = np.ones((5, 5), dtype=bool)
    walls[1, 1] = walls[3, 3] = False
    assert len(shortest_route(walls, (1, 1), (3, 3))) == 0


def test_route_rejects_wall_start():
    walls = np.ones((5, 5), dtype=bool)
    walls[3, 3] = False
    with pytest.raises(ValueError, match="start"):
        shortest_route(walls, (1, 1), (3, 3))


def test_route_targets_pads_with_wait():
    maze = generate_maze(5, MazeRng(3))
    assert maze.path_length == 4
    targets = route_targets(maze.route)
    np.testing.assert_array_equal(targets[:4], maze.route)
    assert (targets[4:] == WAIT).all()


def test_even_size_rounds_up():
    assert generate_maze(20, MazeRng(1)).size == 21
    np.testing.assert_array_equal(generate_maze(20, MazeRng(1)).walls, generate_maze(21, MazeRng(1)).walls)


def test_size_too_small_raises():
    with pytest.raises(ValueError, match="at least 3"):
        generate_maze(1, MazeRng(0))


def test_size_3_has_empty_route():
    maze = generate_maze(3, MazeRng(0))
    assert maze.start == maze.goal == (1, 1)
    assert maze.path_length == 0


def test_generator_is_deterministic_per_seed():
    a = generate_mazes(5, 21, MazeRng(7))
    b = generate_mazes(5, 21, MazeRng(7))
    c = generate_mazes(5, 21, MazeRng(8))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.walls, y.walls)
        np.testing.assert_array_equal(x.route, y.route)
    assert any(not np.array_equal(x.walls, z.walls) for x, z in zip(a, c))
    # Successive mazes of one stream differ.
    assert not np.array_equal(a[0].walls, a[1].walls)


def test_generate_mazes_skips_short_paths():
    # At size 7 the shortest possible path is 8, so a threshold of 9 drops some mazes without replacement.
    mazes = generate_mazes(40, 7, MazeRng(0), min_path_length=9)
    assert 0 < len(mazes) < 40
    assert all(m.path_length >= 9 for m in mazes)


@settings(max_examples=60, deadline=None)
@given(size=st.integers(min_value=3, max_value=41), seed=st.integers(min_value=0, max_value=MASK64))
def test_generator_property(size, seed):
    maze = generate_maze(size, MazeRng(seed))
    check_perfect_maze(maze)
    check_route(maze)


def test_trace_moves_blocks_walls():
    maze = generate_maze(21, MazeRng(0))
    cells, blocked = trace_moves(maze.walls, maze.start, np.array([UP, LEFT, WAIT]))
    assert blocked.tolist() == [True, True, False]  # Wait stays in place without being blocked
    assert (cells == maze.start).all()


def test_maze_bank_round_trip(tmp_path):
    mazes = generate_mazes(3, 11, MazeRng(5))
    path = tmp_path / "bank.bin"
    save_maze_bank(path, mazes)
    assert path.stat().st_size == 12 + 3 * (11 * 11 + 16)
    loaded = load_maze_bank(path)
    for a, b in zip(mazes, loaded):
        np.testing.assert_array_equal(a.walls, b.walls)
        np.testing.assert_array_equal(a.route, b.route)
        assert (a.start, a.goal) == (b.start, b.goal)


def test_maze_bank_truncated_raises(tmp_path):
    path = tmp_path / "bank.bin"
    save_maze_bank(path, generate_mazes(2, 5, MazeRng(0)))
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ValueError, match="truncated"):
        load_maze_bank(path)


# ----------------------------------------------------------------------------------------------
# pixels and encoder


def test_pixels_colours():
    maze = generate_maze(21, MazeRng(0))
    px = render_pixels(maze)
    assert px.shape == (3, 21, 21)
    assert px.dtype == np.float32
    np.testing.assert_array_equal(px[:, 1, 1], [1, 0, 0])
    np.testing.assert_array_equal(px[:, 19, 19], [0, 1, 0])
    assert (px[:, maze.walls] == 0).all()
    open_cells = ~maze.walls
    open_cells[1, 1] = open_cells[19, 19] = False
    assert (px[:, open_cells] == 1).all()


def test_pixels_sdf_grey_levels():
    maze = generate_maze(21, MazeRng(0))
    px = render_pixels(maze, sdf=True)
    # The BFS distance to the nearest wall over an unobstructed grid is the Manhattan distance.
    wall_cells = np.argwhere(maze.walls)
    d = np.zeros((21, 21))
    for r, c in np.argwhere(~maze.walls):
        d[r, c] = np.abs(wall_cells - (r, c)).sum(axis=1).min()
    expected = np.where(maze.walls, 0.0, 0.1 + 0.9 * d / d.max())
    open_cells = ~maze.walls
    open_cells[1, 1] = open_cells[19, 19] = False
    for channel in range(3):
        np.testing.assert_allclose(px[channel][open_cells], expected[open_cells], rtol=1e-6)
    np.testing.assert_array_equal(px[:, 1, 1], [1, 0, 0])
    np.testing.assert_array_equal(px[:, 19, 19], [0, 1, 0])


def scalar_lcg_normal(seed, n):
    """Box-Muller over the LCG, one draw at a time."""
    state, out = seed, []
    for _ in range(n):
        state = (state * 6364136223846793005 + 1442695040888963407) & MASK64
        u1 = max((state >> 40) / 2**24, 1e-10)
        state = (state * 6364136223846793005 + 1442695040888963407) & MASK64
        u2 = (state >> 40) / 2**24
        out.append(math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2))
    return np.array(out)


def test_lcg_normal_matches_scalar_draws():
    # float32 log/cos against float64 math: agreement to float32 precision (abs 1e-5 for |z| < 6).
    for seed in (31337, 37481, 55913):
        np.testing.assert_allclose(lcg_normal(seed, 1000), scalar_lcg_normal(seed, 1000), atol=1e-5)


def test_lcg_normal_statistics():
    z = lcg_normal(64 * 128 * 3 + 31337, 73728)
    assert abs(z.mean()) < 0.02
    assert abs(z.std() - 1.0) < 0.02


def test_conv2d_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 21, 21)).astype(np.float32)
    w = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    for stride in (1, 2):
        ours = conv2d(x, w, stride=stride, padding=1)
        ref = torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=stride, padding=1).numpy()
        # float32 sums of 27 products: rtol/atol 1e-5
        np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_retina_bank_values():
    bank = retina_filters()
    assert bank.shape == (12, 3, 3, 3)
    assert bank[0, 0, 1, 1] == 1.0
    assert bank[0, 0, 0, 0] == -0.125
    np.testing.assert_allclose(bank[:9].sum(axis=(2, 3)), 0.0, atol=1e-7)  # centre-surround ignores flat light
    assert bank[11, :, 1, 1].tolist() == pytest.approx([1 / 3] * 3)
    assert bank[9].sum() == pytest.approx(3.0)


def test_gabor_blocks_replace_one_channel():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 12, 3, 3)).astype(np.float32)
    stamped = stamp_gabor_blocks(w)
    g = 1 / math.sqrt(2)
    for oc in range(32):
        source = (oc // 16) % 2
        norm = np.linalg.norm(stamped[oc, source])
        assert abs(norm - g) <= 0.03 * g * 3 + 1e-6  # noise is at most 3 % of g per weight
        others = [c for c in range(12) if c != source]
        np.testing.assert_array_equal(stamped[oc, others], w[oc, others])
    # Orientation 0 with phase 0 is even in x and y, and orientation pi/2 is its transpose,
    # up to the noise of at most 2 * 3 % of g between two weights.
    noise = 2 * 0.03 * g + 1e-6
    k0, k4 = stamped[0, 0], stamped[4, 0]
    assert np.abs(k0 - k0[:, ::-1]).max() <= noise
    assert np.abs(k0 - k0[::-1, :]).max() <= noise
    assert np.abs(k4 - k0.T).max() <= noise
    assert np.abs(k0 - k0.T).max() > 10 * noise


def test_encoder_shape_dtype():
    enc = VisualEncoder.single_ctm()
    mazes = generate_mazes(4, 21, MazeRng(0))
    tokens = enc.encode_mazes(mazes)
    assert tokens.shape == (4, 121, 128)
    assert tokens.dtype == np.float32
    assert enc.token_grid == (11, 11)
    assert np.isfinite(tokens).all()


def test_encoder_is_deterministic():
    mazes = generate_mazes(3, 21, MazeRng(1))
    a = VisualEncoder.single_ctm().encode_mazes(mazes)
    b = VisualEncoder.single_ctm().encode_mazes(mazes)
    np.testing.assert_array_equal(a, b)
    c = VisualEncoder(EncoderConfig(weight_seed=5)).encode_mazes(mazes)
    d = VisualEncoder(EncoderConfig(weight_seed=5)).encode_mazes(mazes)
    np.testing.assert_array_equal(c, d)
    assert not np.allclose(a, c)


def test_encoder_presets_differ_only_in_v1():
    single, brain = VisualEncoder.single_ctm(), VisualEncoder.brain()
    for name in ("retina", "v2", "v4"):
        np.testing.assert_array_equal(single.weights[name], brain.weights[name])
    assert not np.array_equal(single.weights["v1"], brain.weights["v1"])


def test_encoder_weights_match_reference():
    # First weights of the reference V1 (Gabor-stamped), V2 and V4, from a rustc build of its init.
    # About 1.5 % of reference weights differ by 1 ulp (its float32 ln/cos are not correctly
    # rounded), so compare with rtol 2e-7, about 1 ulp.
    enc = VisualEncoder.single_ctm()
    golden = {
        "v1": [-0.10255258530378342, 0.20538248121738434, -0.09966608881950378,
               -0.2124667465686798, 0.5115069150924683, -0.21458818018436432],
        "v2": [-0.18993441760540009, -0.07810160517692566, -0.02570628933608532,
               0.005613389424979687, 0.07431426644325256, -0.011441695503890514],
        "v4": [-0.052792660892009735, 0.0017917799996212125, -0.02015741541981697,
               -0.0017227604985237122, -0.02626354619860649, 0.02755693718791008],
    }
    for name, values in golden.items():
        np.testing.assert_allclose(enc.weights[name].ravel()[:6], np.float32(values), rtol=2e-7, atol=0)


def test_encoder_reference_weight_streams():
    enc = VisualEncoder.brain()
    scale = math.sqrt(2 / (64 * 9))
    np.testing.assert_allclose(enc.weights["v4"].ravel()[:50], scalar_lcg_normal(64 * 128 * 3 + 31337, 50) * scale,
                               atol=1e-6)
    np.testing.assert_array_equal(enc.weights["retina"], retina_filters())


def test_encoder_batch_equals_single():
    enc = VisualEncoder.single_ctm()
    mazes = generate_mazes(3, 21, MazeRng(2))
    batch = enc.encode_mazes(mazes)
    for i, maze in enumerate(mazes):
        # float32 matmul blocking may differ with batch size: rtol/atol 1e-5
        np.testing.assert_allclose(batch[i], enc.encode_mazes([maze])[0], rtol=1e-5, atol=1e-5)


def test_tokens_are_v4_map_transposed():
    enc = VisualEncoder.single_ctm()
    pixels = np.stack([render_pixels(generate_maze(21, MazeRng(3)))])
    v4 = enc.feature_maps(pixels)["v4"]
    tokens = enc(pixels)
    for y, x in ((0, 0), (0, 10), (7, 3), (10, 10)):
        np.testing.assert_array_equal(tokens[0, y * 11 + x], v4[0, :, y, x])


def test_encoder_rejects_wrong_pixel_shape():
    with pytest.raises(ValueError, match="pixels must have shape"):
        VisualEncoder.single_ctm()(np.zeros((1, 3, 11, 11), dtype=np.float32))


# ----------------------------------------------------------------------------------------------
# metrics


TRUE = np.array([[1, 1, 3, 3], [3, 1, 1, 0]])


def test_metrics_all_right():
    assert first_step_accuracy(TRUE, TRUE) == 1.0
    assert per_step_accuracy(TRUE, TRUE) == 1.0
    assert correct_prefix_length(TRUE, TRUE) == 4.0


def test_metrics_all_wrong():
    wrong = (TRUE + 1) % 5
    assert first_step_accuracy(wrong, TRUE) == 0.0
    assert per_step_accuracy(wrong, TRUE) == 0.0
    assert correct_prefix_length(wrong, TRUE) == 0.0


def test_metrics_first_wrong_rest_right():
    pred = TRUE.copy()
    pred[0, 0] = 0
    assert first_step_accuracy(pred, TRUE) == 0.5
    assert per_step_accuracy(pred, TRUE) == 7 / 8
    np.testing.assert_array_equal(prefix_lengths(pred, TRUE), [0, 4])
    assert correct_prefix_length(pred, TRUE) == 2.0


def test_metrics_prefix_stops_at_first_miss():
    pred = np.array([[1, 1, 0, 3], [3, 1, 1, 4]])
    np.testing.assert_array_equal(prefix_lengths(pred, TRUE), [2, 3])
    assert per_step_accuracy(pred, TRUE) == 6 / 8


def test_metrics_short_routes_ignore_padding():
    true = np.array([[1, 3, WAIT, WAIT], [1, 1, 3, 3]])
    pred = np.array([[1, 3, 0, 0], [1, 1, 3, 0]])
    lengths = np.array([2, 9])
    np.testing.assert_array_equal(prefix_lengths(pred, true, lengths), [2, 3])
    assert per_step_accuracy(pred, true, lengths) == 5 / 6
    # Without lengths the wrong guesses on the padding count.
    assert per_step_accuracy(pred, true) == 5 / 8


def test_score_routes_bundles_metrics():
    pred = np.array([[1, 1, 0, 3], [0, 1, 1, 0]])
    scores = score_routes(pred, TRUE)
    assert scores.first_step == 0.5
    assert scores.per_step == 6 / 8
    assert scores.correct_prefix == 1.0
    assert scores.n_mazes == 2


def test_metrics_reject_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        first_step_accuracy(TRUE[:, :3], TRUE)


def test_moves_from_logits_ties_take_last():
    logits = np.zeros((1, 10), dtype=np.float32)
    logits[0, 1] = logits[0, 3] = 2.0  # position 0: tie between 1 and 3
    np.testing.assert_array_equal(moves_from_logits(logits), [[3, 4]])  # position 1: all equal -> 4


def test_moves_from_logits_rejects_nan():
    with pytest.raises(ValueError, match="NaN"):
        moves_from_logits(np.full((1, 5), np.nan))


def test_select_loss_ticks_tie_rules():
    losses = np.array([[2.0, 1.0, 1.0, 3.0]])
    certainty = np.array([[0.1, 0.9, 0.9, 0.2]])
    t_min, t_cert = select_loss_ticks(losses, certainty)
    assert t_min.tolist() == [1]  # first minimum
    assert t_cert.tolist() == [2]  # last maximum


def test_curriculum_horizon_and_mask():
    true = np.tile(np.array([1, 1, 3, 3, 1, 1, 3, 3, 1, 1]), (3, 1))
    pred = true.copy()
    pred[0, 0] = 0  # prefix 0
    pred[1, 4] = 0  # prefix 4
    prefix, horizon = curriculum_horizon(pred, true, lookahead=5)
    assert prefix.tolist() == [0, 4, 10]
    assert horizon.tolist() == [5, 9, 10]  # capped at L = 10
    mask = curriculum_mask(horizon, 10)
    assert mask.sum(axis=1).tolist() == [5, 9, 10]
    assert mask[0, :5].all()
    assert not mask[0, 5:].any()


# ----------------------------------------------------------------------------------------------
# dataset and plots


def test_dataset_batches():
    data = MazeDataset(size=21, seed=42, batch_size=4)
    tokens, targets = next(iter(data))
    assert tokens.shape == (4, 121, 128)
    assert tokens.dtype == np.float32
    assert targets.shape == (4, 20)
    assert targets.dtype == np.int64
    # The first batch is the first four mazes of MazeRng(42).
    expected = generate_mazes(4, 21, MazeRng(42))
    np.testing.assert_array_equal(targets, np.stack([m.route[:20] for m in expected]))


def test_dataset_is_deterministic():
    a = MazeDataset(21, seed=3, batch_size=2)
    b = MazeDataset(21, seed=3, batch_size=2)
    for _ in range(2):
        ba, bb = a.next_batch(), b.next_batch()
        np.testing.assert_array_equal(ba.tokens, bb.tokens)
        np.testing.assert_array_equal(ba.targets, bb.targets)


def test_heldout_uses_separate_stream():
    data = MazeDataset(21, seed=42, batch_size=8)
    heldout = data.heldout()
    assert heldout.tokens.shape == (200, 121, 128)
    assert heldout.targets.shape == (200, 20)
    first = generate_maze(21, MazeRng(42 + 999))
    np.testing.assert_array_equal(heldout.mazes[0].walls, first.walls)
    # Drawing training batches does not move the held-out set.
    data.next_batch()
    np.testing.assert_array_equal(data.heldout(count=5).targets, heldout.targets[:5])


def test_dataset_rejects_mismatched_encoder():
    with pytest.raises(ValueError, match="does not match"):
        MazeDataset(21, seed=0, encoder=VisualEncoder.single_ctm(11))


def test_save_maze_png(tmp_path):
    maze = generate_maze(21, MazeRng(0))
    predicted = maze.route[:20].copy()
    predicted[5:] = UP
    path = save_maze_png(tmp_path / "maze.png", maze, predicted, title="seed 0")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
