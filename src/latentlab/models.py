"""The networks: plain nn.Modules, each rebuilt from the keyword arguments stored in its checkpoint."""
import torch
from torch import nn


class Encoder(nn.Module):
    """(B, 1, 28, 28) in [0, 1] -> (B, latent_dim)."""

    def __init__(self, *, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),              # (B, w, 14, 14)
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),      # (B, 2w, 7, 7)
            nn.Flatten(),
            nn.Linear(2 * width * 7 * 7, latent_dim),
        )

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """(B, latent_dim) -> (B, 1, 28, 28) in [0, 1]. Mirrors the encoder."""

    def __init__(self, *, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent_dim, 2 * width * 7 * 7), nn.LeakyReLU(0.2),
            nn.Unflatten(1, (2 * width, 7, 7)),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.LeakyReLU(0.2),  # (B, w, 14, 14)
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1),                            # (B, 1, 28, 28)
        )

    def forward(self, z):
        return torch.sigmoid(self.net(z))

    def logits(self, z):
        return self.net(z)


class Autoencoder(nn.Module):
    def __init__(self, *, latent_dim: int = 32, width: int = 32):
        super().__init__()
        self.encoder = Encoder(latent_dim=latent_dim, width=width)
        self.decoder = Decoder(latent_dim=latent_dim, width=width)

    def forward(self, x):
        return self.decoder(self.encoder(x))
