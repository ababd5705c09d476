"""An fp32 Lion written from the paper, the oracle for Lion8bit (torch has no Lion).

Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", arXiv:2302.06675, Algorithm 2:
    c = beta1 * m + (1 - beta1) * g
    theta = theta - lr * (sign(c) + lambda * theta)       (decoupled weight decay)
    m = beta2 * m + (1 - beta2) * g
"""

import torch


class LionReference(torch.optim.Optimizer):
    """Plain fp32 Lion: state ``exp_avg`` (and ``step``, counted like torch's optimizers)."""

    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *, maximize=False):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = float(group["lr"])
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = -p.grad if group["maximize"] else p.grad
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                state["step"] += 1
                m = state["exp_avg"]
                direction = torch.sign(beta1 * m + (1 - beta1) * g)
                p.copy_(p - lr * (direction + group["weight_decay"] * p))
                m.copy_(beta2 * m + (1 - beta2) * g)
        return loss
