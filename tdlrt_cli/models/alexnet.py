import torch.nn as nn


class AlexNet(nn.Module):
    """AlexNet adapted to 32x32 inputs, as low-rank training papers use it on CIFAR-10.

    Five convs (64, 192, 384, 256, 256 channels; kernels 5, 5, 3, 3, 3) with BatchNorm and three
    max-pools down to 4x4, then a 3-layer classifier (4096/4 wide hidden layers, dropout 0.5).
    """

    def __init__(self, in_channels=3, num_classes=10, image_size=32, width_mult=1.0):
        super().__init__()
        from . import scaled

        c = [scaled(w, width_mult) for w in (64, 192, 384, 256, 256)]
        hidden = scaled(1024, width_mult)

        def block(ci, co, k):
            return [nn.Conv2d(ci, co, k, padding=k // 2, bias=False), nn.BatchNorm2d(co), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(in_channels, c[0], 5), nn.MaxPool2d(2),
            *block(c[0], c[1], 5), nn.MaxPool2d(2),
            *block(c[1], c[2], 3), *block(c[2], c[3], 3), *block(c[3], c[4], 3), nn.MaxPool2d(2),
        )
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.classifier = nn.Sequential(
            nn.Dropout(0.5), nn.Linear(c[4] * 16, hidden), nn.ReLU(inplace=True),
            nn.Dropout(0.5), nn.Linear(hidden, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
