"""How a model is fed and judged (tasks, the one data reader) and the built-in datasets."""
