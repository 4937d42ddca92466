"""pytorch-example: personalised federated learning on Fashion-MNIST with Flower and PyTorch."""
