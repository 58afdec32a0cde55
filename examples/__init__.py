"""Runnable examples of lightning_layca, each a LightningModule and a LightningDataModule configured in YAML.

* :mod:`examples.mnist1d_cnn`: MNIST-1D (generated offline) with a 1-D CNN; the demo.
* :mod:`examples.digits_cnn`: scikit-learn's 8x8 digits with a 2-D CNN.
* :mod:`examples.cifar10_vgg`: CIFAR-10 with a VGG network, the paper's setting (downloads the data).

Run any of them through :mod:`examples.cli` from the repository root, for example::

    python -m examples.cli fit --config examples/configs/mnist1d_layca.yaml
"""
