r"""Feed-forward sublayer and the whole post-norm Transformer block of [P] §5: Jacobians, Hessians, Thm 6.

FFN with residual (no biases): ``S = σ(Y W_1) W_2 + Y`` with ``Y`` of shape ``L x d_V``, ``W_1`` of shape
``d_V x d_ff``, ``W_2`` of shape ``d_ff x d_V`` and ``σ`` ReLU or GELU (exact, erf form). With
``U = Y W_1`` and ``D = diag(vec_r σ'(U))`` (for ReLU ``1{Y W_1 > 0}``; [P] prints ``1{X > 0}``, a typo):

* ``B_1 = dS/dW_1 = (I_L ⊗ W_2^T) D (Y ⊗ I_{d_ff})``, ``B_2 = dS/dW_2 = σ(Y W_1) ⊗ I_{d_V}``,
  ``J_SY = dS/dY = (I_L ⊗ W_2^T) D (I_L ⊗ W_1^T) + I`` ([P] Thm 4).
* Second derivatives ``ξ_ab = d vec_r(B_a) / d vec_r(W_b)^T``:
  ``ξ_{W_2,W_1} = (I_L ⊗ K_{d_V,d_ff} ⊗ I_{d_V}) (I_{L d_ff} ⊗ vec_r I_{d_V}) D (Y ⊗ I_{d_ff})``
  (nonzero for ReLU), ``ξ_{W_1,W_2} = (I_{L d_V} ⊗ (D (Y ⊗ I_{d_ff}))^T) (I_L ⊗ K_{d_V,L} ⊗ I_{d_ff})
  (vec_r I_L ⊗ I_{d_V d_ff}) K_{d_V,d_ff}``, ``ξ_{W_2,W_2} = 0`` and
  ``ξ_{W_1,W_1} = ((I_L ⊗ W_2^T) ⊗ (Y ⊗ I_{d_ff})^T) E diag(vec_r σ''(U)) (Y ⊗ I_{d_ff})`` with
  ``E = [e_1 ⊗ e_1, ...]`` (zero for ReLU a.e.; GELU adds this ``diag(GELU'')`` term).
  [P] writes the ``W_1``-``W_2`` pair with ``W_2`` inside (dimensionally inconsistent; the derivative of
  ``B_1``, linear in ``W_2``, cannot contain ``W_2``) and bounds it by ``sqrt(d_ff) ||W_2||``: see
  :func:`theorem6_bound`.

Post-norm block ([P] eq. (4)): ``Y = LN(X + F(X))``, ``S = σ(Y W_1) W_2 + Y``, ``Z = LN(S)``, parameters
``("Q", "K", "V", "W1", "W2")``. [P] Thm 5: ``H_tr^{(i,j)} = d^2 Z / dW_i dW_j = (J_Z ⊗ I_{n_i}) ξ_ij +
(I_{L d_V} ⊗ B_i^T) H_Z B_j`` with ``B_i = dS/dW_i``, ``ξ_ij = d vec_r(B_i)/dW_j`` and ``J_Z, H_Z`` the
LayerNorm Jacobian and (flat) second derivative at ``S``. Thm 6:
``||H_tr^{(i,j)}|| <= ||J_Z|| ||ξ_ij|| + ||B_i|| ||H_Z|| ||B_j||``. All block quantities here are dense
(small sizes only): they are assembled with the second-order chain rule, of which Thm 5 is one instance,
from the attention formulas (:mod:`.attention`), the LayerNorm formulas (:mod:`.layernorm`) and the FFN
derivatives below.

References:
    [P] E. Petrov, N. Kiselev, V. Meshkov, A. Grabovoy, "Closing the Curvature Gap: Full Transformer Hessians
        and Their Implications for Scaling Laws", arXiv:2510.16927 (Lemma 1 ReLU, Thms 4-6, Prop. on
        ``||Y||`` and ``||S||``).
    [O] W. Ormaniec, F. Dangel, S. P. Singh, arXiv:2410.10986 (the attention blocks used inside the block).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import attention as _att
from . import layernorm as _ln
from ._linalg import (
    HessianBlock,
    chain_second,
    commutation,
    diag_embedding_jacobian,
    eye,
    kron,
    spectral_norm,
    vec_r_col,
)

__all__ = [
    "BLOCK_NAMES",
    "FFN_NAMES",
    "BlockTerms",
    "activation_derivatives",
    "block_forward",
    "block_hessian_blocks",
    "block_jacobians",
    "block_loss_hessian_bound",
    "block_second_derivatives",
    "block_terms",
    "ffn_forward",
    "ffn_hessian_blocks",
    "ffn_jacobians",
    "ffn_second_derivatives",
    "theorem6_bound",
]

#: FFN parameter names.
FFN_NAMES: tuple[str, str] = ("W1", "W2")
#: Parameter names of the whole block, in the order of the full Hessian.
BLOCK_NAMES: tuple[str, ...] = ("Q", "K", "V", "W1", "W2")


def activation_derivatives(x: Tensor, activation: str = "relu") -> tuple[Tensor, Tensor, Tensor]:
    """``(σ(x), σ'(x), σ''(x))`` for ``"relu"`` (``σ'' = 0`` a.e., [P] Lemma 1) or ``"gelu"`` (erf form).

    GELU: ``σ(x) = x Φ(x)``, ``σ'(x) = Φ(x) + x φ(x)``, ``σ''(x) = φ(x) (2 - x^2)`` with ``Φ, φ`` the standard
    normal cdf and pdf (``torch.nn.functional.gelu`` with ``approximate="none"``).
    """
    if activation == "relu":
        return x.clamp_min(0), (x > 0).to(x.dtype), torch.zeros_like(x)
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return x * cdf, cdf + x * pdf, pdf * (2 - x * x)
    raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")


def ffn_forward(
    Y: Tensor, W_1: Tensor, W_2: Tensor, activation: str = "relu", residual: bool = True
) -> Tensor:
    """``S = σ(Y W_1) W_2 (+ Y)``."""
    out = activation_derivatives(Y @ W_1, activation)[0] @ W_2
    return out + Y if residual else out


def ffn_jacobians(Y: Tensor, W_1: Tensor, W_2: Tensor, activation: str = "relu") -> dict[str, Tensor]:
    """Dense ``B_1 = dS/dW_1``, ``B_2 = dS/dW_2``, ``J_SY = dS/dY`` ([P] Thm 4), keys ``"W1", "W2", "Y"``."""
    n, d_v = Y.shape
    d_ff = W_1.shape[1]
    act, d1, _ = activation_derivatives(Y @ W_1, activation)
    i_l = eye(n, Y)
    left = kron(i_l, W_2.T) @ torch.diag(d1.reshape(-1))
    return {
        "W1": left @ kron(Y, eye(d_ff, Y)),
        "W2": kron(act, eye(d_v, Y)),
        "Y": left @ kron(i_l, W_1.T) + eye(n * d_v, Y),
    }


def ffn_second_derivatives(
    Y: Tensor, W_1: Tensor, W_2: Tensor, activation: str = "relu"
) -> dict[tuple[str, str], Tensor]:
    """Dense ``ξ_ab = d vec_r(dS/dW_a) / d vec_r(W_b)^T`` for ``a, b`` in ``("W1", "W2")`` (module docstring).

    Block ``(a, b)`` has shape ``(L d_V n_a) x n_b``. ``("W2", "W1")`` is [P]'s ``ξ_12``
    (docs/formulas.md §5);
    ``("W1", "W2")`` is its correct counterpart (see the module docstring); ``("W1", "W1")`` carries the
    ``diag(σ'')`` term (zero for ReLU).
    """
    n, d_v = Y.shape
    d_ff = W_1.shape[1]
    _, d1, d2 = activation_derivatives(Y @ W_1, activation)
    i_l, i_v, i_f = eye(n, Y), eye(d_v, Y), eye(d_ff, Y)
    y_kron = kron(Y, i_f)  # d vec_r(Y W_1) / d vec_r(W_1)^T
    d_mat = torch.diag(d1.reshape(-1))
    left = kron(i_l, W_2.T)
    xi_11 = kron(left, y_kron.T) @ diag_embedding_jacobian(n * d_ff, Y) @ torch.diag(d2.reshape(-1)) @ y_kron
    xi_21 = (
        kron(i_l, commutation(d_v, d_ff, Y), i_v) @ kron(eye(n * d_ff, Y), vec_r_col(i_v)) @ d_mat @ y_kron
    )
    d_left = kron(i_l, commutation(d_v, n, Y), i_f) @ kron(vec_r_col(i_l), eye(d_v * d_ff, Y))
    xi_12 = kron(eye(n * d_v, Y), (d_mat @ y_kron).T) @ d_left @ commutation(d_v, d_ff, Y)
    return {
        ("W1", "W1"): xi_11,
        ("W1", "W2"): xi_12,
        ("W2", "W1"): xi_21,
        ("W2", "W2"): Y.new_zeros(n * d_v * d_ff * d_v, d_ff * d_v),
    }


def ffn_hessian_blocks(
    Y: Tensor, W_1: Tensor, W_2: Tensor, target: Tensor, activation: str = "relu"
) -> dict[tuple[str, str], HessianBlock]:
    """Hessian blocks of ``l = ||S - Target||_F^2 / (L d_V)`` in ``(W_1, W_2)`` with ``S`` the FFN output.

    ``H_o(a, b) = c B_a^T B_b`` and ``H_f(a, b) = c (vec_r(S - Target)^T ⊗ I_{n_a}) ξ_ab`` with
    ``c = 2/(L d_V)``.
    For ReLU ``H_f(W_1, W_1) = H_f(W_2, W_2) = 0`` but the mixed functional part is not (docs/formulas.md §5).
    """
    n, d_v = Y.shape
    c = 2.0 / (n * d_v)
    jac = ffn_jacobians(Y, W_1, W_2, activation)
    xi = ffn_second_derivatives(Y, W_1, W_2, activation)
    resid = vec_r_col(ffn_forward(Y, W_1, W_2, activation) - target).T
    out: dict[tuple[str, str], HessianBlock] = {}
    for a in FFN_NAMES:
        for b in FFN_NAMES:
            n_a = jac[a].shape[1]
            out[(a, b)] = HessianBlock(c * jac[a].T @ jac[b], c * kron(resid, eye(n_a, Y)) @ xi[(a, b)])
    return out


# ==========================================================================================================
# Whole post-norm block
# ==========================================================================================================


def block_forward(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
) -> dict[str, Tensor]:
    """``F`` (attention), ``U = X + F``, ``Y = LN(U)``, ``S = σ(Y W_1) W_2 + Y``, ``Z = LN(S)`` ([P] eq. (4)).

    LayerNorms without affine weights (as in [P]'s analysis), with the given ``eps``.
    """
    f = _att.forward(X, W_Q, W_K, W_V, tau)["F"]
    u = X + f
    y = _ln.layernorm(u, eps=eps)
    s = ffn_forward(y, W_1, W_2, activation)
    return {"F": f, "U": u, "Y": y, "S": s, "Z": _ln.layernorm(s, eps=eps)}


def _ffn_stage(Y: Tensor, W_1: Tensor, W_2: Tensor, activation: str) -> tuple[Tensor, Tensor]:
    """Jacobian and second derivative (3-tensor) of ``S`` in the stacked inputs ``p = (Y, W_1, W_2)``.

    Elementwise, with ``σ_k = σ^{(k)}(Y W_1)``: ``dS_lm/dY_la = Σ_f σ_1[l,f] W_1[a,f] W_2[f,m] + δ_am``,
    ``dS_lm/dW_1[a,f] = σ_1[l,f] Y_la W_2[f,m]``, ``dS_lm/dW_2[f,m'] = σ_0[l,f] δ_mm'``, and the second
    derivatives follow by differentiating once more (only ``W_2``-``W_2`` vanishes; for ReLU also every term
    with ``σ_2``).
    """
    n, d_v = Y.shape
    d_ff = W_1.shape[1]
    s0, s1, s2 = activation_derivatives(Y @ W_1, activation)
    i_l, i_v, i_f = eye(n, Y), eye(d_v, Y), eye(d_ff, Y)
    n_s, n_1, n_2 = n * d_v, d_v * d_ff, d_ff * d_v
    j_y = torch.einsum("lma,lp->lmpa", torch.einsum("lf,af,fm->lma", s1, W_1, W_2) + i_v.T, i_l)
    j_1 = torch.einsum("lf,la,fm->lmaf", s1, Y, W_2)
    j_2 = torch.einsum("lf,mn->lmfn", s0, i_v)
    jac = torch.cat([j_y.reshape(n_s, n_s), j_1.reshape(n_s, n_1), j_2.reshape(n_s, n_2)], dim=1)

    h_yy = torch.einsum("lmab,lp,lq->lmpaqb", torch.einsum("lf,af,bf,fm->lmab", s2, W_1, W_1, W_2), i_l, i_l)
    core_y1 = torch.einsum("lf,lb,af,fm->lmabf", s2, Y, W_1, W_2) + torch.einsum(
        "lf,ab,fm->lmabf", s1, i_v, W_2
    )
    h_y1 = torch.einsum("lmabf,lp->lmpabf", core_y1, i_l).reshape(n_s, n_s, n_1)
    h_y2 = torch.einsum("lmafn,lp->lmpafn", torch.einsum("lf,af,mn->lmafn", s1, W_1, i_v), i_l)
    h_y2 = h_y2.reshape(n_s, n_s, n_2)
    h_11 = torch.einsum("lf,la,lb,fm,fg->lmafbg", s2, Y, Y, W_2, i_f).reshape(n_s, n_1, n_1)
    h_12 = torch.einsum("lf,la,fg,mn->lmafgn", s1, Y, i_f, i_v).reshape(n_s, n_1, n_2)
    n_p = n_s + n_1 + n_2
    hess = Y.new_zeros(n_s, n_p, n_p)
    sy, s1_, s2_ = slice(0, n_s), slice(n_s, n_s + n_1), slice(n_s + n_1, n_p)
    hess[:, sy, sy] = h_yy.reshape(n_s, n_s, n_s)
    hess[:, sy, s1_] = h_y1
    hess[:, s1_, sy] = h_y1.transpose(1, 2)
    hess[:, sy, s2_] = h_y2
    hess[:, s2_, sy] = h_y2.transpose(1, 2)
    hess[:, s1_, s1_] = h_11
    hess[:, s1_, s2_] = h_12
    hess[:, s2_, s1_] = h_12.transpose(1, 2)
    return jac, hess


@dataclass(frozen=True, eq=False)
class BlockTerms:
    """The ingredients of [P] Thm 5 for one input, all dense.

    Attributes:
        forward: Output of :func:`block_forward`.
        sizes: ``numel`` of each parameter, keyed by :data:`BLOCK_NAMES`.
        J_Z: ``dZ/dS`` (``n x n``, ``n = L d_V``).
        H_Z: Flat second derivative of the final LayerNorm at ``S`` (``n^2 x n``).
        B: ``B_i = dS/dW_i`` (``n x n_i``).
        xi: ``ξ_ij = d vec_r(B_i)/dW_j`` (``(n n_i) x n_j``).
        jacobians: ``dZ/dW_i`` (``n x n_i``).
        second: ``H_tr^{(i,j)} = d^2 Z / dW_i dW_j`` (``(n n_i) x n_j``).
    """

    forward: dict[str, Tensor]
    sizes: dict[str, int]
    J_Z: Tensor
    H_Z: Tensor
    B: dict[str, Tensor]
    xi: dict[tuple[str, str], Tensor]
    jacobians: dict[str, Tensor]
    second: dict[tuple[str, str], Tensor]


def block_terms(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
) -> BlockTerms:
    """Dense Jacobians and second derivatives of the block output ``Z`` in all five weight matrices.

    Built by the second-order chain rule (``(J_g ⊗ I) H_p + (I ⊗ J_p^T) H_g J_p``) through the stages
    ``θ_att -> U = X + F -> Y = LN(U)``, ``(Y, W_1, W_2) -> S``, ``S -> Z = LN(S)``; the last step is exactly
    [P] Thm 5. Unlike [P]'s ``ξ`` list this includes every pair, e.g. ``d B_Q / d W_1`` (``J_SY`` depends on
    ``W_1``) and, for GELU, the dependence of ``J_SY`` on ``Y``. Memory ``O(n (Σ n_i)^2)``: small sizes only.
    """
    fw = block_forward(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, tau)
    n, d_v = X.shape
    weights = {"Q": W_Q, "K": W_K, "V": W_V, "W1": W_1, "W2": W_2}
    sizes = {k: w.numel() for k, w in weights.items()}
    att_names = _att.NAMES
    n_s = n * d_v
    n_att = sum(sizes[k] for k in att_names)
    n_ffn = sizes["W1"] + sizes["W2"]
    # Stage A: θ_att -> U = X + F (attention Jacobians and second derivatives Φ).
    g = _att.jacobians(X, W_Q, W_K, W_V, tau)
    phi = _att.second_derivatives(X, W_Q, W_K, W_V, tau)
    j_u = torch.cat([g[k] for k in att_names], dim=1)
    h_u = torch.cat(
        [
            torch.cat([phi[(a, b)].reshape(n_s, sizes[a], sizes[b]) for b in att_names], dim=2)
            for a in att_names
        ],
        dim=1,
    )
    # Stage B: U -> Y = LN(U).
    j_ln1 = _ln.jacobian(fw["U"], eps=eps, dense=True)
    h_ln1 = _ln.hessian(fw["U"], eps=eps, dense=True).reshape(n_s, n_s, n_s)
    j_ya = j_ln1 @ j_u
    h_ya = chain_second(j_ln1, h_ln1, j_u, h_u)
    # Lift θ = (θ_att, W_1, W_2) -> p = (Y, W_1, W_2).
    n_theta = n_att + n_ffn
    j_lift = torch.block_diag(j_ya, eye(n_ffn, X))
    h_lift = X.new_zeros(n_s + n_ffn, n_theta, n_theta)
    h_lift[:n_s, :n_att, :n_att] = h_ya
    # Stage C: p -> S; stage D: S -> Z = LN(S).
    j_c, h_c = _ffn_stage(fw["Y"], W_1, W_2, activation)
    j_s = j_c @ j_lift
    h_s = chain_second(j_c, h_c, j_lift, h_lift)
    j_z = _ln.jacobian(fw["S"], eps=eps, dense=True)
    h_z = _ln.hessian(fw["S"], eps=eps, dense=True)
    j_tot = j_z @ j_s
    h_tot = chain_second(j_z, h_z.reshape(n_s, n_s, n_s), j_s, h_s)
    offsets, start = {}, 0
    for k in BLOCK_NAMES:
        offsets[k] = slice(start, start + sizes[k])
        start += sizes[k]
    b_mats = {k: j_s[:, offsets[k]] for k in BLOCK_NAMES}
    jacs = {k: j_tot[:, offsets[k]] for k in BLOCK_NAMES}
    xi, second = {}, {}
    for a in BLOCK_NAMES:
        for b in BLOCK_NAMES:
            xi[(a, b)] = h_s[:, offsets[a], offsets[b]].reshape(n_s * sizes[a], sizes[b])
            second[(a, b)] = h_tot[:, offsets[a], offsets[b]].reshape(n_s * sizes[a], sizes[b])
    return BlockTerms(fw, sizes, j_z, h_z, b_mats, xi, jacs, second)


def block_jacobians(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
) -> dict[str, Tensor]:
    """``dZ/dW_i = J_Z B_i`` (``L d_V x n_i``) for ``i`` in :data:`BLOCK_NAMES` ([P] Thm 4)."""
    return block_terms(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, tau).jacobians


def block_second_derivatives(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
) -> dict[tuple[str, str], Tensor]:
    """``H_tr^{(i,j)} = d^2 Z / dW_i dW_j`` (``(L d_V n_i) x n_j``) for all 25 pairs ([P] Thm 5)."""
    return block_terms(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, tau).second


def _loss_blocks(terms: BlockTerms, target: Tensor) -> dict[tuple[str, str], HessianBlock]:
    z = terms.forward["Z"]
    n_s = z.numel()
    c = 2.0 / n_s
    resid = (z - target).reshape(-1)
    out = {}
    for (a, b), sec in terms.second.items():
        func = c * torch.einsum("o,oij->ij", resid, sec.reshape(n_s, terms.sizes[a], terms.sizes[b]))
        out[(a, b)] = HessianBlock(c * terms.jacobians[a].T @ terms.jacobians[b], func)
    return out


def block_hessian_blocks(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    target: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
) -> dict[tuple[str, str], HessianBlock]:
    """Hessian blocks of ``l = ||Z - Target||_F^2 / (L d_V)`` for the whole block ([P] eq. (transformer
    decomposition)): ``c (dZ/dW_i)^T (dZ/dW_j) + c (vec_r(Z - Target)^T ⊗ I) H_tr^{(i,j)}``,
    ``c = 2/(L d_V)``.
    """
    terms = block_terms(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, tau)
    return _loss_blocks(terms, target)


def _paper_theorem6(
    terms: BlockTerms,
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    eps: float,
    tau: float | None,
) -> dict[tuple[str, str], float]:
    n, d_v = X.shape
    d_k, d_ff = W_Q.shape[1], W_1.shape[1]
    t = math.sqrt(d_k) if tau is None else float(tau)
    x, q, k, v, w1, w2 = (float(spectral_norm(m)) for m in (X, W_Q, W_K, W_V, W_1, W_2))
    y_norm = math.sqrt(n * d_v)  # ||Y||_2 <= ||Y||_F = sqrt(L d_V) ([P] Prop. on Y and S)
    fw = terms.forward
    j_z = _ln.jacobian_norm_bound(fw["S"], eps=eps, variant="paper")
    h_z = _ln.hessian_norm_bound(fw["S"], eps=eps, variant="paper")
    j_y = _ln.jacobian_norm_bound(fw["U"], eps=eps, variant="paper")
    h_y = _ln.hessian_norm_bound(fw["U"], eps=eps, variant="paper")
    g = {"V": n * x, "Q": v * k * x**3 / (n * t), "K": v * q * x**3 / (n * t)}
    phi_vq = {
        "Q": 2 * k * x**3 / (n**2 * math.sqrt(d_v) * t),
        "K": 2 * q * x**3 / (n**2 * math.sqrt(d_v) * t),
    }
    wq = {"Q": k, "K": q}
    phi: dict[tuple[str, str], float] = {("V", "V"): 0.0}
    for a in ("Q", "K"):
        phi[("V", a)] = phi[(a, "V")] = phi_vq[a]
        for b in ("Q", "K"):
            val = 12 * v * wq[a] * wq[b] * x**5 / (n * d_v * t**2)
            if a != b:
                val += 2 * v * x**3 / (n**2 * math.sqrt(d_v) * t)
            phi[(a, b)] = val
    j_sy = w1 * w2 + 1
    relu_out = float(spectral_norm(activation_derivatives(fw["Y"] @ W_1, "relu")[0]))
    b = {"W1": w2 * y_norm, "W2": relu_out}
    b.update({kk: j_sy * j_y * g[kk] for kk in _att.NAMES})
    xi: dict[tuple[str, str], float] = {
        ("W1", "W1"): 0.0,
        ("W2", "W2"): 0.0,
        ("W1", "W2"): math.sqrt(d_v) * y_norm,
        ("W2", "W1"): math.sqrt(d_ff) * w2,
    }
    for kk in _att.NAMES:
        xi[("W1", kk)] = math.sqrt(d_ff) * w2 * j_y * g[kk]
        xi[("W2", kk)] = math.sqrt(d_v) * w1 * j_y * g[kk]
        for ll in _att.NAMES:
            xi[(kk, ll)] = j_sy * (g[kk] * h_y * g[ll] + j_y * phi[(kk, ll)])
    return {key: j_z * val + b[key[0]] * h_z * b[key[1]] for key, val in xi.items()}


def theorem6_bound(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
    variant: str = "factors",
) -> dict[tuple[str, str], float]:
    r"""[P] Thm 6: ``||H_tr^{(i,j)}||_2 <= ||J_Z|| ||ξ_ij|| + ||B_i|| ||H_Z|| ||B_j||`` per pair.

    ``variant="factors"``: the right-hand side with the exact spectral norms of the dense factors (``H_Z`` in
    its flat ``n^2 x n`` form); valid for all 25 pairs and both activations.

    ``variant="paper"``: the explicit estimates of [P]'s proof (ReLU only): ``||Y|| <= sqrt(L d_V)``,
    ``||B_1|| <= ||W_2|| ||Y||``, ``||B_2|| = ||ReLU(Y W_1)||``, ``||J_SY|| <= ||W_1|| ||W_2|| + 1``,
    ``||ξ_{W1,W2}|| <= sqrt(d_V) ||Y||``, ``||ξ_{W2,W1}|| <= sqrt(d_ff) ||W_2||``, ``||ξ_{1k}||``,
    ``||ξ_{2k}||``, ``||ξ_{kl}||`` as printed, the attention factors ``||G_V|| <= L x``,
    ``||G_Q|| <= v k x^3 / (L τ)``, the printed ``Φ`` bounds (which carry a spurious loss factor
    ``2/(L d_V)``), and ``||J||``, ``||H||`` of both LayerNorms from [P]'s lemma evaluated at their actual
    inputs ``U = X + F`` and ``S``. Only the pairs the paper covers are returned (not ``(k, W1)``,
    ``(k, W2)`` for attention ``k``). **Not valid in general**: ``d B_2 / d W_1`` does not depend on ``W_2``
    while its printed estimate ``sqrt(d_ff) ||W_2||`` vanishes with ``W_2``, so the ``("W2", "W1")`` bound
    fails for small ``||W_2||``; the attention factors inherit the invalid ``||dA/dT|| <= 1/L``.

    Returns:
        ``{(i, j): bound}``.
    """
    terms = block_terms(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, tau)
    if variant == "paper":
        if activation != "relu":
            raise ValueError("the paper's explicit estimates are for ReLU only")
        return _paper_theorem6(terms, X, W_Q, W_K, W_V, W_1, W_2, eps, tau)
    if variant != "factors":
        raise ValueError(f"variant must be 'factors' or 'paper', got {variant!r}")
    return _factor_bounds(terms)


def _factor_bounds(terms: BlockTerms) -> dict[tuple[str, str], float]:
    j_z = float(spectral_norm(terms.J_Z))
    h_z = float(spectral_norm(terms.H_Z))
    b = {k: float(spectral_norm(m)) for k, m in terms.B.items()}
    return {key: j_z * float(spectral_norm(xi)) + b[key[0]] * h_z * b[key[1]] for key, xi in terms.xi.items()}


def block_loss_hessian_bound(
    X: Tensor,
    W_Q: Tensor,
    W_K: Tensor,
    W_V: Tensor,
    W_1: Tensor,
    W_2: Tensor,
    target: Tensor,
    activation: str = "relu",
    eps: float = 0.0,
    tau: float | None = None,
) -> float:
    """``M_tr = 5 max_{i,j} (c ||dZ/dW_i|| ||dZ/dW_j|| + c ||Z - Target||_F b_ij) >= ||H||_2``.

    [P] Thm 6, the full bound, with ``b_ij`` the ``"factors"`` bound of :func:`theorem6_bound` and
    ``c = 2/(L d_V)``.

    [P] prints the functional term as ``||R^tr_m|| ||H_tr||`` without the loss constant ``c``; since ``c < 1``
    that is looser but still an upper bound. ``5 = sqrt(5 * 5)`` from the 5x5 block-matrix norm inequality.
    """
    terms = block_terms(X, W_Q, W_K, W_V, W_1, W_2, activation, eps, tau)
    c = 2.0 / terms.forward["Z"].numel()
    resid = float(torch.linalg.matrix_norm(terms.forward["Z"] - target))
    jn = {k: float(spectral_norm(m)) for k, m in terms.jacobians.items()}
    bounds = _factor_bounds(terms)
    return 5 * max(c * jn[i] * jn[j] + c * resid * val for (i, j), val in bounds.items())
