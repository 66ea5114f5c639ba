"""The head-hidden attacker's surrogate head, for the gradient-shielding measurement
(``shielding.py``).

The attacker holds the tail, inputs of their own and the real head's features for them;
it fits a surrogate of the head on those pairs and attacks ``surrogate_head -> tail``.
The surrogate has the head's architecture (the attacker is assumed to know it, as in
Pelta: the architecture is public, the weights are secret): it is the head's own
onnx2torch module with every weight re-initialised (``reset_parameters`` of each
torch layer; floating-point ONNX initializers the converter keeps as buffers, such
as a scikit-learn MLP's ``MatMul`` coefficients, become parameters, matrices drawn
from U(+-1/sqrt(fan_in)) and bias-like vectors zero). A head with no weights at all
(a ``Cast``) is no secret: its surrogate is the head itself. It is trained with Adam
(linear warm-up over the first 10 % of the steps, then cosine-annealed) on the MSE
between its output and the real features, in units of the features' variance, on 85 %
of the auxiliary rows; each of the budget's learning rates gets a run and the one with
the lowest MSE on the other 15 % is kept (the attacker's own validation).
"""

from __future__ import annotations

import copy
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from bastion.confidential.partition.torch_convert import _predict

if TYPE_CHECKING:
    from bastion.confidential.partition.shielding import ShieldBudget


def _trainable_surrogate(torch: Any, head: Any) -> tuple[Any, int]:
    """A copy of the head module with every weight re-initialised and trainable; and how many
    weights it has (0: the head is weight-free, the copy is exact)."""
    nn = torch.nn
    sur = copy.deepcopy(head)
    for module in sur.modules():
        # onnx2torch keeps initializers that feed generic ops (MatMul, Add) as buffers of an
        # `initializers` module; they are the head's weights as much as a Conv's are
        for name, buf in list(module._buffers.items()):
            if module is not sur and type(module) is nn.Module and buf is not None and buf.is_floating_point() \
                    and buf.ndim >= 1:
                del module._buffers[name]
                module.register_parameter(name, nn.Parameter(buf.detach().clone()))
    n_weights = 0
    for module in sur.modules():
        if hasattr(module, "reset_parameters") and callable(module.reset_parameters) and module is not sur:
            module.reset_parameters()
        if type(module) is nn.Module and module is not sur:
            for p in module._parameters.values():
                if p is None:
                    continue
                with torch.no_grad():
                    if sum(d > 1 for d in p.shape) >= 2:  # a matrix: x @ W, fan-in is the second-to-last dim
                        bound = 1.0 / math.sqrt(max(1, p.shape[-2]))
                        p.uniform_(-bound, bound)
                    else:  # a bias-like vector
                        p.zero_()
    for p in sur.parameters():
        p.requires_grad_(True)
        n_weights += p.numel()
    return sur, n_weights


def _train_surrogate(torch: Any, sur: Any, x_t: Any, f_t: Any, lr: float, spec: ShieldBudget, scale: float,
                     seed: int) -> Any:
    opt = torch.optim.Adam(sur.parameters(), lr=lr)
    warm = max(1, spec.surrogate_steps // 10)

    def factor(step: int) -> float:
        # linear warm-up, then cosine down to 2 %: without the warm-up, Adam's first large steps
        # killed the ReLUs of deeper heads at the learning rates a linear head needs
        if step < warm:
            return (step + 1) / warm
        frac = (step - warm) / max(1, spec.surrogate_steps - warm)
        return 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    gen = torch.Generator().manual_seed(seed)
    sur.train()
    for _ in range(spec.surrogate_steps):
        idx = torch.randint(0, len(x_t), (min(spec.batch, len(x_t)),), generator=gen)
        loss = torch.mean((sur(x_t[idx]) - f_t[idx]) ** 2) / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return sur.eval()


def _fit_surrogate(torch: Any, head: Any, x_aux: np.ndarray, spec: ShieldBudget,
                   seed: int) -> tuple[Any, dict[str, Any]]:
    """Fit a surrogate of ``head`` on the attacker's inputs and the real features for them: one
    run per learning rate of the budget, keeping the run with the lowest MSE on a 15 % hold-out
    of the auxiliary rows (the attacker's own validation; the evaluation rows are never used)."""
    f_aux = _predict(torch, head, x_aux)  # what the host saw for the attacker's own inputs
    fresh, n_weights = _trainable_surrogate(torch, head)
    info: dict[str, Any] = {"surrogate": "head architecture, re-initialised", "surrogate_weights": n_weights,
                            "surrogate_steps": spec.surrogate_steps}
    if n_weights == 0:
        info.update(surrogate="exact (the head has no weights)", surrogate_steps=0)
        return fresh.eval(), info
    order = np.random.default_rng(seed).permutation(len(x_aux))
    n_val = min(len(x_aux) // 2, max(1, round(0.15 * len(x_aux))))
    va, tr = order[:n_val], order[n_val:]
    scale = float(np.var(f_aux[tr])) or 1.0  # MSE in units of the features' variance, so one lr fits every cut
    x_t, f_t = torch.from_numpy(x_aux[tr]), torch.from_numpy(f_aux[tr])
    x_v, f_v = torch.from_numpy(x_aux[va]), torch.from_numpy(f_aux[va])
    best: tuple[float, float, Any] | None = None
    for lr in spec.surrogate_lrs:
        sur = _train_surrogate(torch, copy.deepcopy(fresh), x_t, f_t, lr, spec, scale, seed)
        with torch.no_grad():
            val = float(torch.mean((sur(x_v) - f_v) ** 2)) / scale
        if best is None or val < best[0]:  # NaN (a diverged run) never wins
            best = (val, lr, sur)
    assert best is not None
    val, lr, sur = best
    for p in sur.parameters():
        p.requires_grad_(False)
    info.update(surrogate_lr=lr, surrogate_val_loss=val)
    return sur, info
