"""Hadamard matrices for the rotation passes (QuaRot, Quamba, HALO), built in numpy.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``; the
normalised ``H / √n`` is orthogonal, so ``x ↦ x H`` is an exact rotation that
spreads one large channel over all ``n`` channels (max|x H| ≈ ‖x‖/√n).

Orders handled (``n = K · 2^m``):

* powers of two: Sylvester, ``H_{2^m} = H_2^{⊗m}`` (symmetric, so with the Sylvester
  ordering ``H_a ⊗ H_b = H_{ab}`` for any powers of two ``a, b``);
* ``K = q + 1`` with ``q ≡ 3 (mod 4)`` a prime power: Paley construction I,
  ``H = I + [[0, 1ᵀ], [−1, Q]]`` with ``Q`` the (skew) Jacobsthal matrix
  ``Q_ab = χ(a − b)`` of GF(q) (χ the quadratic character);
* ``K = 2(q + 1)`` with ``q ≡ 1 (mod 4)`` a prime power: Paley construction II,
  ``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]`` with the symmetric
  conference matrix ``C = [[0, 1ᵀ], [1, Q]]``;
* ``K = 4t`` by the Williamson construction (four symmetric circulants
  ``A, B, C, D`` of order ``t`` with ``AAᵀ + BBᵀ + CCᵀ + DDᵀ = 4t I``, arranged as
  ``[[A, B, C, D], [−B, A, −D, C], [−C, D, A, −B], [−D, −C, B, A]]``) for
  ``t = 39`` (order 156; first rows from Lonz 2013) and ``t = 43`` (order 172,
  LLaMA-7B's 11008 = 172 · 64; first rows from Hall 1983), the two orders of the
  QuaRot list that neither Paley construction reaches.

Every base matrix is checked (``H Hᵀ = K I``) when it is built.  For a general
``n`` the smallest constructible ``K = r · 2^j`` (``r`` the odd part of ``n``) is
used and ``H_n = H_K ⊗ H_{n/K}``; this covers 12, 20, 28, 36, 40, 44, 52, 60,
100, 108, 140, 156, 172 (and 68, 76, 84, 124, 132, 148, 164, …) times any power
of two.  Other sizes raise ``ValueError`` naming the supported ones.

Random signs (QuaRot's randomised Hadamard): ``Q = diag(s) · H / √n`` with
``s ∈ {±1}ⁿ`` from ``np.random.default_rng(seed)``.  The signs act *before* the
mixing; signs after it (``H · diag(s)``) would only flip the rotated channels,
which changes no per-tensor or per-channel quantization range.

For the online transform (methods §0.2) ``kron_factors(n)`` splits ``H_n`` as
``H_a ⊗ H_b``: with ``x`` reshaped row-major to ``(…, a, b)``,
``x H_n = vec(H_aᵀ X H_b)``, two small MatMuls of cost ``O(n(a + b))``.
"""

from __future__ import annotations

import functools
import math

import numpy as np

__all__ = [
    "SUPPORTED_BASE_ORDERS",
    "hadamard_matrix",
    "is_supported",
    "kron_factors",
    "random_signs",
    "randomized_hadamard",
    "rotate_last",
]

# Williamson first rows (symmetric circulants), order t -> (a, b, c, d).
_WILLIAMSON = {
    39: ("+++--+-+-----+--++----++--+-----+-+--++",
         "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++",
         "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+",
         "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+",
         "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}

#: The non-power-of-two base orders of QuaRot's list, all constructed here.
SUPPORTED_BASE_ORDERS = (12, 20, 28, 36, 40, 44, 52, 60, 100, 108, 140, 156, 172)


# ------------------------------------------------------------ finite fields
def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p^k`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mulmod(a: list[int], b: list[int], mod: list[int], p: int) -> list[int]:
    """Product of two GF(p) polynomials (low degree first) modulo monic ``mod``."""
    k = len(mod) - 1
    prod = [0] * (2 * k - 1)
    for i, ai in enumerate(a):
        for j, bj in enumerate(b):
            prod[i + j] = (prod[i + j] + ai * bj) % p
    for deg in range(len(prod) - 1, k - 1, -1):
        c = prod[deg]
        if c:
            for i in range(k + 1):
                prod[deg - k + i] = (prod[deg - k + i] - c * mod[i]) % p
    return prod[:k]


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree ``k ≤ 3`` over GF(p) (no roots ⇒ irreducible)."""
    for code in range(p ** k):
        coeffs = [(code // p ** i) % p for i in range(k)] + [1]
        if all(sum(c * pow(x, i, p) for i, c in enumerate(coeffs)) % p for x in range(p)):
            return coeffs
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")  # pragma: no cover


@functools.lru_cache(maxsize=None)
def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """``(chi, sub)``: χ of every element of GF(q) and the table ``sub[a, b] = a − b``.

    Elements are integers ``0 … q−1`` read as base-``p`` digit vectors (polynomial
    coefficients, low degree first).
    """
    p, k = _prime_power(q)  # type: ignore[misc]
    if k > 3:
        raise ValueError(f"GF({q}) with degree {k} > 3 is not implemented")
    digits = np.array([[(e // p ** i) % p for i in range(k)] for e in range(q)])
    weights = p ** np.arange(k)
    sub = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    if k == 1:
        squares = {(x * x) % p for x in range(1, p)}
    else:
        mod = _irreducible(p, k)
        squares = set()
        for e in range(1, q):
            sq = _poly_mulmod(list(digits[e]), list(digits[e]), mod, p)
            squares.add(int(np.dot(sq, weights)))
    chi = np.array([0] + [1 if e in squares else -1 for e in range(1, q)], dtype=np.int64)
    return chi, sub


def _jacobsthal(q: int) -> np.ndarray:
    chi, sub = _quadratic_character(q)
    return chi[sub]


# ------------------------------------------------------------ constructions
def _paley1(q: int) -> np.ndarray:
    n = q + 1
    s = np.zeros((n, n), dtype=np.int64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return np.eye(n, dtype=np.int64) + s


def _paley2(q: int) -> np.ndarray:
    n = q + 1
    c = np.zeros((n, n), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    return (np.kron(c, np.array([[1, 1], [1, -1]]))
            + np.kron(np.eye(n, dtype=np.int64), np.array([[1, -1], [-1, -1]])))


def _circulant(row: str) -> np.ndarray:
    r = np.array([1 if ch == "+" else -1 for ch in row], dtype=np.int64)
    return np.stack([np.roll(r, i) for i in range(r.size)])


def _williamson(t: int) -> np.ndarray:
    a, b, c, d = (_circulant(r) for r in _WILLIAMSON[t])
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _base_construction(k: int) -> str | None:
    """Name of the construction that builds order ``k`` directly, or None."""
    if k & (k - 1) == 0:
        return "sylvester"
    if k % 4:
        return None
    pp = _prime_power(k - 1)
    if pp is not None and (k - 1) % 4 == 3 and pp[1] <= 3:
        return "paley1"
    q = k // 2 - 1
    pp = _prime_power(q)
    if pp is not None and q % 4 == 1 and pp[1] <= 3:
        return "paley2"
    if k // 4 in _WILLIAMSON:
        return "williamson"
    return None


@functools.lru_cache(maxsize=None)
def _base_pm1(k: int) -> np.ndarray:
    kind = _base_construction(k)
    if kind == "sylvester":
        h = _sylvester(k)
    elif kind == "paley1":
        h = _paley1(k - 1)
    elif kind == "paley2":
        h = _paley2(k // 2 - 1)
    elif kind == "williamson":
        h = _williamson(k // 4)
    else:  # pragma: no cover - guarded by _split
        raise ValueError(f"no construction for order {k}")
    if not np.array_equal(h @ h.T, k * np.eye(k, dtype=np.int64)):  # pragma: no cover
        raise AssertionError(f"{kind} construction of order {k} is not Hadamard")
    h.setflags(write=False)
    return h


def _split(n: int) -> tuple[int, int]:
    """``(K, 2^m)`` with ``n = K · 2^m`` and ``K`` the smallest directly constructible base."""
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got {n!r}")
    n = int(n)
    odd, twos = n, 0
    while odd % 2 == 0:
        odd //= 2
        twos += 1
    if odd == 1:
        return 1, n
    for j in range(2, twos + 1):
        k = odd << j
        if _base_construction(k) is not None:
            return k, n // k
    raise ValueError(
        f"no Hadamard matrix of order {n} is constructed here; supported orders are "
        f"K·2^m for K a power of two or K in {list(SUPPORTED_BASE_ORDERS)} "
        "(and other K = q+1, q ≡ 3 mod 4, or K = 2(q+1), q ≡ 1 mod 4, q a prime power "
        "with degree ≤ 3)"
    )


def is_supported(n: int) -> bool:
    """True if :func:`hadamard_matrix` can build order ``n``."""
    try:
        _split(n)
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=64)
def _hadamard_pm1(n: int) -> np.ndarray:
    k, rest = _split(n)
    h = np.kron(_base_pm1(k), _sylvester(rest)) if k > 1 else _sylvester(rest)
    h.setflags(write=False)
    return h


def random_signs(n: int, seed: int | None) -> np.ndarray:
    """``n`` random ±1 (float64) from ``np.random.default_rng(seed)``; ones if ``seed`` is None."""
    if seed is None:
        return np.ones(n)
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, size=n).astype(np.float64) * 2.0 - 1.0


def hadamard_matrix(n: int, *, seed: int | None = None) -> np.ndarray:
    """The orthonormal Hadamard matrix ``H_n / √n`` (float64), ``H Hᵀ = I``.

    Args:
        n: the order (see the module docstring for the supported orders).
        seed: when given, the randomised ``diag(s) · H_n / √n`` (same as
            :func:`randomized_hadamard`).

    Raises:
        ValueError: ``n`` is not a supported order.
    """
    h = _hadamard_pm1(n).astype(np.float64) / math.sqrt(n)
    if seed is not None:
        h = random_signs(n, seed)[:, None] * h
    return h


def randomized_hadamard(n: int, seed: int | None) -> np.ndarray:
    """``diag(s) · H_n / √n`` with random signs ``s`` from ``seed`` (orthogonal)."""
    return hadamard_matrix(n, seed=seed)


def kron_factors(n: int) -> tuple[int, int]:
    """``(a, b)`` with ``a · b = n`` and ``H_n = H_a ⊗ H_b`` exactly (normalised too).

    ``a`` is the non-power-of-two base times a power of two and ``b`` a power of
    two; among the exact splits the one with the smallest ``a + b`` (the cost of
    the two MatMuls) is returned.  For ``n`` a power of two ``a ≥ b``.
    """
    k, rest = _split(n)
    best = None
    i = 1
    while i <= rest:
        a, b = k * i, rest // i
        if best is None or (a + b, -a) < (best[0] + best[1], -best[0]):
            best = (a, b)
        i *= 2
    assert best is not None
    return best


def rotate_last(x: np.ndarray, *, seed: int | None = None) -> np.ndarray:
    """``x · Q`` along the last axis, ``Q = diag(s) · H_n / √n`` (float64 result).

    Applied through the Kronecker factors (``O(n(a + b))`` per row), so it never
    builds the ``n × n`` matrix; ``Qᵀ W`` for a ``[n, N]`` weight is
    ``rotate_last(W.T, seed=seed).T``.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[-1]
    a, b = kron_factors(n)
    xs = x * random_signs(n, seed)
    ha = hadamard_matrix(a)
    hb = hadamard_matrix(b)
    y = np.einsum("...ij,ip,jq->...pq", xs.reshape(*x.shape[:-1], a, b), ha, hb, optimize=True)
    return y.reshape(x.shape)
