"""Training stage: CIFAR data, a backbone registry, transfer strategies, metrics and reports."""
