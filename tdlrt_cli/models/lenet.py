import torch.nn as nn


class LeNet5(nn.Module):
    """LeNet5 as in the DLRT/TDLRT papers' MNIST experiments: conv 20 (5x5), conv 50 (5x5), fc 500, fc classes."""

    def __init__(self, in_channels=1, num_classes=10, image_size=28, width_mult=1.0):
        super().__init__()
        from . import scaled

        c1, c2, hidden = scaled(20, width_mult), scaled(50, width_mult), scaled(500, width_mult)
        side = ((image_size - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 5), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))
