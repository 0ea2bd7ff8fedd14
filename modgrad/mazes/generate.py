"""Maze generation, BFS routes and move targets for the maze route benchmark.

A maze is a square grid of walls and open cells, carved by a randomised depth-first search
(recursive backtracker) on the odd coordinates. The open cells form a spanning tree, so every
pair of open cells is joined by exactly one path. The random stream is the reference
benchmark's 64-bit LCG, so a seed gives the reference's mazes cell for cell.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Action alphabet of the benchmark: one class per move plus Wait, which pads short routes.
UP, DOWN, LEFT, RIGHT, WAIT = 0, 1, 2, 3, 4
N_ACTIONS = 5
ACTION_NAMES = ("up", "down", "left", "right", "wait")
# (d_row, d_col) per action, indexed by action id. Wait stays in place.
MOVE_DELTAS = np.array([(-1, 0), (1, 0), (0, -1), (0, 1), (0, 0)], dtype=np.int64)

ROUTE_LEN = 20  # moves predicted per maze
MIN_PATH_LENGTH = 3  # shorter mazes are skipped when sampling, as in the reference
_MASK64 = (1 << 64) - 1
_LCG_MUL = 6364136223846793005
_LCG_INC = 1442695040888963407


class MazeRng:
    """64-bit LCG that drives maze carving: `s = s·6364136223846793005 + 1442695040888963407`.

    The first draw advances the state before use (state starts at the seed itself), and
    `randrange(n)` is `(s >> 33) mod n`, which has a slight modulo bias kept for parity.
    """

    def __init__(self, seed: int):
        if not 0 <= seed <= _MASK64:
            raise ValueError(f"seed must be in [0, 2**64), got {seed}")
        self.state = seed

    def next_u64(self) -> int:
        self.state = (self.state * _LCG_MUL + _LCG_INC) & _MASK64
        return self.state

    def randrange(self, n: int) -> int:
        if n <= 0:
            raise ValueError(f"randrange needs n >= 1, got {n}")
        return (self.next_u64() >> 33) % n


@dataclass(frozen=True)
class Maze:
    """A square maze with its shortest start-to-goal route.

    `walls[r, c]` is True for a wall. `route` contains one action id (0-3) per single-cell move
    of the BFS shortest path, so `path_length == len(route)`.
    """

    walls: np.ndarray  # (S, S) bool
    start: tuple[int, int]
    goal: tuple[int, int]
    route: np.ndarray  # (path_length,) int64

    @property
    def size(self) -> int:
        return self.walls.shape[0]

    @property
    def path_length(self) -> int:
        return len(self.route)


def generate_maze(size: int, rng: MazeRng) -> Maze:
    """Carve a perfect maze by randomised iterative DFS from (1, 1).

    An even `size` is rounded up to the next odd number. The border is all walls, the start
    is (1, 1) and the goal (size-2, size-2). Candidate neighbours two cells away are tried in
    the order up, down, left, right, and `rng.randrange(len(candidates))` picks one, so
    the draw sequence matches the reference generator exactly.
    """
    size = size | 1
    if size < 3:
        raise ValueError(f"maze size must be at least 3 (an even size rounds up), got {size}")

    walls = np.ones((size, size), dtype=bool)
    walls[1, 1] = False
    stack = [(1, 1)]
    while stack:
        r, c = stack[-1]
        candidates = []
        for dr, dc in ((-2, 0), (2, 0), (0, -2), (0, 2)):
            nr, nc = r + dr, c + dc
            if 0 < nr < size - 1 and 0 < nc < size - 1 and walls[nr, nc]:
                candidates.append((nr, nc))
        if not candidates:
            stack.pop()
            continue
        nr, nc = candidates[rng.randrange(len(candidates))]
        walls[(r + nr) // 2, (c + nc) // 2] = False
        walls[nr, nc] = False
        stack.append((nr, nc))

    start, goal = (1, 1), (size - 2, size - 2)
    return Maze(walls=walls, start=start, goal=goal, route=shortest_route(walls, start, goal))


def shortest_route(walls: np.ndarray, start: tuple[int, int], goal: tuple[int, int]) -> np.ndarray:
    """Return the BFS shortest path from start to goal as action ids.

    Neighbours are expanded in the order up, down, left, right and each cell keeps the parent
    that discovered it first, which fixes the route when several shortest paths exist.
    An unreachable goal gives an empty route, as in the reference.
    """
    size_r, size_c = walls.shape
    for name, (r, c) in (("start", start), ("goal", goal)):
        if not (0 <= r < size_r and 0 <= c < size_c) or walls[r, c]:
            raise ValueError(f"{name} {(r, c)} must be an open cell inside the {size_r}x{size_c} grid")

    parent: dict[tuple[int, int], tuple[int, int, int]] = {}
    visited = np.zeros_like(walls, dtype=bool)
    visited[start] = True
    queue = deque([start])
    while queue:
        r, c = queue.popleft()
        if (r, c) == goal:
            break
        for action in (UP, DOWN, LEFT, RIGHT):
            nr, nc = r + int(MOVE_DELTAS[action, 0]), c + int(MOVE_DELTAS[action, 1])
            if 0 <= nr < size_r and 0 <= nc < size_c and not walls[nr, nc] and not visited[nr, nc]:
                visited[nr, nc] = True
                parent[(nr, nc)] = (r, c, action)
                queue.append((nr, nc))

    moves = []
    cell = goal
    while cell != start and cell in parent:
        r, c, action = parent[cell]
        moves.append(action)
        cell = (r, c)
    return np.array(moves[::-1], dtype=np.int64)


def route_targets(route: np.ndarray, route_len: int = ROUTE_LEN) -> np.ndarray:
    """Return the first `route_len` moves of a route, padded with WAIT when it is shorter."""
    targets = np.full(route_len, WAIT, dtype=np.int64)
    n = min(route_len, len(route))
    targets[:n] = route[:n]
    return targets


def trace_moves(walls: np.ndarray, start: tuple[int, int], moves: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Follow moves from start and return the visited cells and which moves were blocked.

    A move into a wall or off the grid leaves the position unchanged and is marked blocked.
    Returns positions (len(moves) + 1, 2) and blocked (len(moves),) bool.
    """
    moves = np.asarray(moves, dtype=np.int64)
    if moves.size and (moves.min() < 0 or moves.max() >= N_ACTIONS):
        raise ValueError(f"moves must be action ids in [0, {N_ACTIONS}), got values {np.unique(moves)}")
    size_r, size_c = walls.shape
    positions = np.empty((len(moves) + 1, 2), dtype=np.int64)
    blocked = np.zeros(len(moves), dtype=bool)
    r, c = start
    positions[0] = (r, c)
    for i, action in enumerate(moves):
        nr, nc = r + int(MOVE_DELTAS[action, 0]), c + int(MOVE_DELTAS[action, 1])
        if 0 <= nr < size_r and 0 <= nc < size_c and not walls[nr, nc]:
            r, c = nr, nc
        else:
            blocked[i] = True
        positions[i + 1] = (r, c)
    return positions, blocked


def iter_mazes(size: int, rng: MazeRng, min_path_length: int = MIN_PATH_LENGTH) -> Iterator[Maze]:
    """Yield mazes from `rng` forever, skipping those with `path_length < min_path_length`."""
    while True:
        maze = generate_maze(size, rng)
        if maze.path_length >= min_path_length:
            yield maze


def generate_mazes(count: int, size: int, rng: MazeRng, min_path_length: int = MIN_PATH_LENGTH) -> list[Maze]:
    """Generate `count` mazes and drop those with `path_length < min_path_length`.

    Like the reference batch and evaluation loops, a skipped maze is not replaced, so the list
    can be shorter than `count`. That never happens at size 21, where every path is at least 36.
    """
    mazes = [generate_maze(size, rng) for _ in range(count)]
    return [m for m in mazes if m.path_length >= min_path_length]


def save_maze_bank(path: str | Path, mazes: list[Maze]) -> None:
    """Write mazes in the reference bank format.

    Little-endian u32 `n, h, w`, then per maze `h·w` bytes (1 = wall) and u32
    `start_row, start_col, goal_row, goal_col`. Routes are not stored.
    """
    if not mazes:
        raise ValueError("cannot write an empty maze bank: pass at least one maze")
    size = mazes[0].size
    with open(path, "wb") as f:
        f.write(struct.pack("<3I", len(mazes), size, size))
        for maze in mazes:
            if maze.size != size:
                raise ValueError(f"all mazes in a bank must share one size, got {maze.size} and {size}")
            f.write(maze.walls.astype(np.uint8).tobytes())
            f.write(struct.pack("<4I", *maze.start, *maze.goal))


def load_maze_bank(path: str | Path) -> list[Maze]:
    """Read a maze bank written in the reference format and recompute each route by BFS."""
    data = Path(path).read_bytes()
    if len(data) < 12:
        raise ValueError(f"maze bank {path} is truncated: {len(data)} bytes, expected a 12-byte header")
    n, h, w = struct.unpack_from("<3I", data, 0)
    if h != w:
        raise ValueError(f"maze bank {path} contains non-square {h}x{w} mazes, but only square mazes are supported")
    record = h * w + 16
    if len(data) < 12 + n * record:
        raise ValueError(f"maze bank {path} is truncated: {len(data)} bytes for {n} mazes of {h}x{w}")

    mazes = []
    for i in range(n):
        offset = 12 + i * record
        walls = np.frombuffer(data, dtype=np.uint8, count=h * w, offset=offset).reshape(h, w) != 0
        sr, sc, gr, gc = struct.unpack_from("<4I", data, offset + h * w)
        mazes.append(Maze(walls=walls, start=(sr, sc), goal=(gr, gc), route=shortest_route(walls, (sr, sc), (gr, gc))))
    return mazes
