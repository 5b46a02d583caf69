import torch.nn as nn

_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG16(nn.Module):
    """VGG16 with BatchNorm for 32x32 inputs: 13 3x3 convs, 5 max-pools, one linear classifier."""

    def __init__(self, in_channels=3, num_classes=10, image_size=32, width_mult=1.0):
        super().__init__()
        from . import scaled

        layers, c = [], in_channels
        for v in _CFG:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                w = scaled(v, width_mult)
                layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
                c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)  # 1x1 already for 32x32; lets larger images through
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))
