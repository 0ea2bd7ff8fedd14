"""Draw a maze with its true route and a predicted route, saved as PNG.

Uses matplotlib's Agg canvas directly (no pyplot), so it works headless and leaves the global
matplotlib backend alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from modgrad.files import atomic_write

from modgrad.mazes.generate import ROUTE_LEN, Maze, route_targets, trace_moves
from modgrad.mazes.metrics import prefix_lengths


def draw_maze(ax, maze: Maze, predicted: np.ndarray | None = None, route_len: int = ROUTE_LEN) -> None:
    """Draw the maze, the first `route_len` moves of the true route and the predicted moves on `ax`.

    The true route is a green line and the prediction a dashed orange line. A predicted move into
    a wall or off the grid does not move the marker and is drawn as a red cross at the cell
    where it was attempted.
    """
    image = np.where(maze.walls, 0.15, 1.0)
    ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.scatter([maze.start[1]], [maze.start[0]], s=80, c="red", marker="s", label="start", zorder=3)
    ax.scatter([maze.goal[1]], [maze.goal[0]], s=80, c="limegreen", marker="s", label="goal", zorder=3)

    true_cells, _ = trace_moves(maze.walls, maze.start, maze.route[:route_len])
    ax.plot(true_cells[:, 1], true_cells[:, 0], color="tab:green", linewidth=3, alpha=0.8, label="true route")

    if predicted is not None:
        predicted = np.asarray(predicted)[:route_len]
        cells, blocked = trace_moves(maze.walls, maze.start, predicted)
        targets = route_targets(maze.route, len(predicted))
        correct = int(prefix_lengths(predicted[None], targets[None], np.array([maze.path_length]))[0])
        ax.plot(cells[:, 1], cells[:, 0], color="tab:orange", linewidth=2, linestyle="--",
                label=f"predicted ({correct} correct prefix)")
        if blocked.any():
            hit = cells[:-1][blocked]
            ax.scatter(hit[:, 1], hit[:, 0], s=60, c="red", marker="x", label="blocked move", zorder=4)

    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=2, fontsize=7, frameon=False)


def save_maze_png(path: str | Path, maze: Maze, predicted: np.ndarray | None = None,
                  route_len: int = ROUTE_LEN, title: str | None = None, dpi: int = 100) -> Path:
    """Render one maze (see `draw_maze`) to a PNG file and return its path."""
    fig = Figure(figsize=(4.5, 5.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw_maze(ax, maze, predicted, route_len)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
