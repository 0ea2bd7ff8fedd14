"""Data side of the maze route benchmark: generation, encoding, metrics and plots.

Typical use::

    from modgrad.mazes import MazeDataset, moves_from_logits, score_routes

    data = MazeDataset(size=21, seed=42, batch_size=8)
    tokens, targets = next(iter(data))  # (8, 121, 128) float32, (8, 20) int64
    heldout = data.heldout()  # 200 mazes from MazeRng(42 + 999)
    scores = score_routes(moves_from_logits(logits), heldout.targets, heldout.path_lengths)
"""

from modgrad.mazes.encode import (
    EncoderConfig,
    MazeBatch,
    MazeDataset,
    VisualEncoder,
    make_batch,
    render_batch,
    render_pixels,
)
from modgrad.mazes.generate import (
    ACTION_NAMES,
    DOWN,
    LEFT,
    N_ACTIONS,
    RIGHT,
    ROUTE_LEN,
    UP,
    WAIT,
    Maze,
    MazeRng,
    generate_maze,
    generate_mazes,
    load_maze_bank,
    route_targets,
    save_maze_bank,
    shortest_route,
    trace_moves,
)
from modgrad.mazes.metrics import (
    RouteScores,
    correct_prefix_length,
    curriculum_horizon,
    curriculum_mask,
    first_step_accuracy,
    moves_from_logits,
    per_step_accuracy,
    prefix_lengths,
    score_routes,
    select_loss_ticks,
)
from modgrad.mazes.render import draw_maze, save_maze_png

__all__ = [
    "ACTION_NAMES", "DOWN", "LEFT", "N_ACTIONS", "RIGHT", "ROUTE_LEN", "UP", "WAIT",
    "EncoderConfig", "Maze", "MazeBatch", "MazeDataset", "MazeRng", "RouteScores", "VisualEncoder",
    "correct_prefix_length", "curriculum_horizon", "curriculum_mask", "draw_maze", "first_step_accuracy",
    "generate_maze", "generate_mazes", "load_maze_bank", "make_batch", "moves_from_logits",
    "per_step_accuracy", "prefix_lengths", "render_batch", "render_pixels", "route_targets",
    "save_maze_bank", "save_maze_png", "score_routes", "select_loss_ticks", "shortest_route", "trace_moves",
]
