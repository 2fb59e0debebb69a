"""Per-channel statistics for normalisation: what actions and DINOv2 tokens are divided by.

The model reads and writes normalised numbers, (x − mean) / std per channel: unit-scale inputs for
the network, unit-variance noise in the flow that means the same in every channel, and a planner
whose σ₀ = 1 is "one training standard deviation" in every action dimension. The same numbers
travel in every checkpoint (and feature cache), so training, planning and evaluation agree.
data.ActionStats (7 delta-EE dimensions) and encoder.TokenStats (D token channels) are both Stats.
"""
import json

import torch


class Stats:
    """Per-channel mean and std: normalised = (x − mean) / std, and back. Actions (ActionStats, 7
    numbers) and DINOv2 tokens (encoder.TokenStats, D channels) are both normalised this way; the
    numbers travel in every checkpoint and feature cache (save / load: JSON)."""

    def __init__(self, mean, std):
        self.mean = torch.as_tensor(mean, dtype=torch.float32)
        self.std = torch.as_tensor(std, dtype=torch.float32)

    def normalize(self, values):
        return (values - self.mean.to(values.device)) / self.std.to(values.device)

    def denormalize(self, values):
        return values * self.std.to(values.device) + self.mean.to(values.device)

    def as_dict(self):
        """What a checkpoint or JSON file keeps: cls(**as_dict()) gives the same statistics back."""
        return dict(mean=self.mean, std=self.std)

    def save(self, path):
        with open(path, "w") as file:
            json.dump({name: value.tolist() for name, value in self.as_dict().items()}, file, indent=1)

    @classmethod
    def load(cls, path):
        with open(path) as file:
            return cls(**json.load(file))


class Moments:
    """Running per-channel sums of x and x² over any number of (..., C) batches, in float64 so that
    millions of frames lose no precision; stats() turns them into mean and std. With products=True
    also the sums of x xᵀ (C, C), for covariance()."""

    def __init__(self, products=False):
        self.total, self.squares, self.count = 0.0, 0.0, 0
        self.products = 0.0 if products else None

    def add(self, values):
        flat = values.reshape(-1, values.shape[-1]).double()  # (rows, C)
        self.total, self.squares = self.total + flat.sum(0), self.squares + flat.pow(2).sum(0)
        if self.products is not None:
            self.products = self.products + flat.T @ flat  # (C, C)
        self.count += len(flat)

    def covariance(self):
        """(C, C) covariance of everything added (needs products=True)."""
        mean = self.total / self.count
        return self.products / self.count - torch.outer(mean, mean)

    def stats(self, cls=Stats):
        if self.count == 0:
            raise ValueError("no values to compute statistics from")
        mean = self.total / self.count
        std = (self.squares / self.count - mean ** 2).clamp_min(1e-12).sqrt()
        return cls(mean.float(), std.float().clamp_min(1e-6))
