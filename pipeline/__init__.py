"""d2l's multilayer perceptron on Fashion-MNIST as a DVC pipeline tracked in MLflow."""
