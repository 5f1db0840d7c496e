"""Low-rank activation predictors: collect the dense model's activations, train, evaluate."""
