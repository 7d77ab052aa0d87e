"""Sensitivity: the Hessian engine, Fisher traces, measured losses, the sensitivity registry, channel-wise and data-free sensitivities."""
