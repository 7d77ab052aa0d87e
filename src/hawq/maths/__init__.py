"""Pure maths: quantizer arithmetic, budgets, Pareto/ILP allocation, bit plans (no modules, no data)."""
