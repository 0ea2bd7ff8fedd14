"""SimpleRng: the reference system's 64-bit LCG, vectorised so large weight tensors initialise fast.

State s starts at seed + 1; each draw sets s = s * A + C (mod 2^64) and returns s. Floats take the
top 24 bits; normals use Box-Muller on two consecutive draws. Reproducing it lets our initial
weights match the reference's bit for bit (up to float32 rounding of log and cos).
"""

from __future__ import annotations

import numpy as np

_A = np.uint64(6364136223846793005)
_C = np.uint64(1442695040888963407)
_MASK64 = (1 << 64) - 1


class SimpleRng:
    def __init__(self, seed: int):
        self.state = (int(seed) + 1) & _MASK64

    def next_u64_array(self, n: int) -> np.ndarray:
        """Draw the next n raw 64-bit values, in order."""
        out = np.empty(n, dtype=np.uint64)
        if n == 0:
            return out
        a, c, s = int(_A), int(_C), self.state
        block = min(n, 256)
        for i in range(block):
            s = (s * a + c) & _MASK64
            out[i] = s
        # Jump ahead: s[i + L] = A^L s[i] + C_L, where (A^L, C_L) composes the map L times.
        a_l, c_l = a, c
        for _ in range(block - 1):
            a_l, c_l = (a_l * a) & _MASK64, (c_l * a + c) & _MASK64
        filled, length = block, block
        with np.errstate(over="ignore"):
            while filled < n:
                take = min(length, n - filled)
                out[filled : filled + take] = out[filled - length : filled - length + take] * np.uint64(a_l) + np.uint64(c_l)
                filled += take
                if filled < n and take == length:
                    # Double the jump: (A^L, C_L) applied twice.
                    a_l, c_l = (a_l * a_l) & _MASK64, (c_l * a_l + c_l) & _MASK64
                    length *= 2
        self.state = int(out[-1])
        return out

    def next_u64(self) -> int:
        return int(self.next_u64_array(1)[0])

    def uniform(self, n: int) -> np.ndarray:
        """n floats in [0, 1) from the top 24 bits of each draw."""
        return (self.next_u64_array(n) >> np.uint64(40)).astype(np.float64) / float(1 << 24)

    def normal(self, n: int) -> np.ndarray:
        """n standard normals, one per two draws (cosine branch of Box-Muller)."""
        f = self.uniform(2 * n).astype(np.float32)
        u1 = np.maximum(f[0::2], np.float32(1e-10))
        u2 = f[1::2]
        return (np.sqrt(np.float32(-2.0) * np.log(u1)) * np.cos(np.float32(2 * np.pi) * u2)).astype(np.float32)

    def below(self, n: int, bound: int) -> np.ndarray:
        """n integers draw % bound."""
        return (self.next_u64_array(n) % np.uint64(bound)).astype(np.int64)
