"""The attackers' networks and how they are trained (torch, imported lazily).

Two attackers (torch, CPU, seeded; one intra-op thread by default so a seed gives the
same numbers every run):

``decoder``
    An MLP (two hidden layers with layer norm, plus a linear path from features to
    output) from the (flattened, standardised) features to the (flattened) input, trained
    with Adam on the reconstruction loss (MSE on [0, 1] images and on real columns on a
    standardised scale; BCE on binary columns), the learning rate cut at each plateau of
    the validation loss (a 15 % split of the auxiliary data) and training stopped at the
    fourth; the best checkpoint is kept. A plain MLP rather than transposed convolutions:
    the features of a cut may be convolutional maps, vectors or logits, and the inputs
    here are small (8x8 images, tables); the linear path is what makes a layer that still
    holds the input linearly (an early convolution) reconstructable within the quick
    budget.

``cgan``
    A conditional GAN in the pix2pix style: a generator G(features, z) -> input and a
    discriminator D(input, features) -> real/fake that judges (input, features) *pairs*,
    so it checks that a reconstruction is plausible *for these features*. G's loss is the
    adversarial loss plus ``recon_weight`` x the reconstruction loss. G has the decoder's
    architecture (plus the noise input) and starts from the decoder trained with the same
    seed and budget; the adversarial phase then runs for the budget's GAN steps, and the
    checkpoint kept is the one with the best validation score (SSIM for images,
    feature-recovery accuracy / R² for tabular) *including the starting point*. So on
    the attacker's own validation data the c-GAN is never worse than the decoder; when
    adversarial training does not help, it returns exactly the decoder's reconstructions
    (``details["gan_selected_step"] == 0``). Scores on the evaluation pairs are what they
    are, and may be a little lower than the decoder's by chance. Measured on the digits
    CNN (issue 16's image scenario), the adversarial phase added at most 0.015 SSIM to
    the decoder at the quick budget and about 0.001 at the standard one: on 8x8 inputs a
    well-trained regression already gets what the features hold; pix2pix's advantage
    (sharper, plausible detail) shows on larger images.

Reconstructions of the evaluation inputs use z = 0 (the mode of the noise prior), so
they are deterministic.

``BudgetSpec`` / ``BUDGETS`` size that training; ``_Codec`` maps arrays to the networks'
scale and back.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from bastion.confidential.partition.recon_scores import _binary_columns


@dataclass(frozen=True)
class BudgetSpec:
    """Training budget of the attackers, in optimiser steps (batches), not epochs: the run
    time then scales with the feature size, not with the amount of auxiliary data.

    ``decoder_steps`` is a maximum: after ``patience`` steps without a better validation loss
    the learning rate is cut (x0.3, from the best checkpoint), and the fourth such plateau
    stops training; ``gan_steps`` is the
    adversarial phase of the c-GAN after its decoder warm start; ``hidden`` is the width of the
    MLPs (the generator also has a linear path from features to input, so a hidden layer
    narrower than the input is not a bottleneck for what is linearly recoverable)."""

    decoder_steps: int
    patience: int
    gan_steps: int
    hidden: int
    batch: int = 64

    def __post_init__(self) -> None:
        for name, value, lo, hi in (("decoder_steps", self.decoder_steps, 1, 1_000_000),
                                    ("patience", self.patience, 1, 1_000_000),
                                    ("gan_steps", self.gan_steps, 0, 1_000_000),
                                    ("hidden", self.hidden, 8, 8192), ("batch", self.batch, 1, 8192)):
            if not isinstance(value, int) or not lo <= value <= hi:
                raise ValueError(f"BudgetSpec.{name} must be an integer in [{lo}, {hi}], got {value!r}")


BUDGETS: dict[str, BudgetSpec] = {
    "quick": BudgetSpec(decoder_steps=400, patience=60, gan_steps=200, hidden=128),
    "standard": BudgetSpec(decoder_steps=2000, patience=200, gan_steps=1500, hidden=256),
    "large": BudgetSpec(decoder_steps=8000, patience=500, gan_steps=6000, hidden=512),
}


@contextmanager
def _torch_session(seed: int, threads: int) -> Iterator[Any]:
    """Seeded, thread-limited torch, restoring the caller's RNG state and thread count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            yield torch
    finally:
        torch.set_num_threads(before)


class _Codec:
    """Maps arrays to the networks' scale and back: features standardised with the aux
    statistics; inputs flattened, binary/[0, 1] columns kept (sigmoid outputs), real
    columns standardised (linear outputs)."""

    def __init__(self, features_aux: np.ndarray, inputs_aux: np.ndarray, kind: str) -> None:
        f = features_aux.reshape(len(features_aux), -1)
        self.f_mean = f.mean(axis=0)
        self.f_std = np.where(f.std(axis=0) > 1e-6, f.std(axis=0), 1.0).astype(np.float32)
        x = inputs_aux.reshape(len(inputs_aux), -1)
        self.input_shape = inputs_aux.shape[1:]
        # sigmoid columns: every pixel of an image, binary columns of a table
        self.sig = np.ones(x.shape[1], bool) if kind == "image" else _binary_columns(inputs_aux)
        self.x_mean = np.where(self.sig, 0.0, x.mean(axis=0)).astype(np.float32)
        std = x.std(axis=0)
        self.x_std = np.where(self.sig | (std <= 1e-6), 1.0, std).astype(np.float32)

    def features(self, f: np.ndarray) -> np.ndarray:
        z = (f.reshape(len(f), -1) - self.f_mean) / self.f_std
        return np.clip(z, -20.0, 20.0).astype(np.float32)

    def inputs(self, x: np.ndarray) -> np.ndarray:
        return ((x.reshape(len(x), -1) - self.x_mean) / self.x_std).astype(np.float32)

    def decode(self, out: np.ndarray) -> np.ndarray:
        """Network outputs (on the network's scale, after the output activation) -> inputs."""
        x = out * self.x_std + self.x_mean
        return x.reshape((len(out), *self.input_shape)).astype(np.float32)


MAX_SKIP = 1 << 22  # weights of the generator's linear path features -> input (6144 x 64 = 393,216 for a conv cut)
DECODER_LR = 3e-3  # Adam (1e-2 diverged on 3,072-wide conv features)
# learning rate cut by LR_FACTOR at each validation plateau (``patience`` steps without a better loss, counted
# from the last improvement), training resuming from the best checkpoint; the LR_CUTS+1-th plateau stops it. A
# cosine schedule with early stopping did worse: with the budget's schedule still at a high rate, the largest
# budget stopped a conv cut early at 28.5 dB where the standard one, decaying sooner, reached 29.4 dB
LR_FACTOR = 0.3
LR_CUTS = 3
# the layers that read the features (first hidden layer, linear path) learn at DECODER_LR x sqrt(256 / width) when
# the features are wider than 256: at one rate for all, a 6,144-wide conv cut reached 18.6 dB PSNR in the quick
# budget against 28.0 dB with the scaling (image CNN, second convolution), while narrow cuts did not change
WIDE_FEATURES = 256


def _make_generator(torch: Any, f_dim: int, z_dim: int, out_dim: int, hidden: int, sig: np.ndarray) -> Any:
    nn = torch.nn

    class Generator(nn.Module):
        """MLP features (+ noise) -> input, plus a linear path features -> input; sigmoid on [0, 1]
        and binary columns, linear on real ones."""

        def __init__(self) -> None:
            super().__init__()
            self.z_dim = z_dim
            self.body = nn.Sequential(
                nn.Linear(f_dim + z_dim, hidden), nn.LayerNorm(hidden), nn.ReLU(), nn.Dropout(0.1),
                nn.Linear(hidden, hidden), nn.LayerNorm(hidden), nn.ReLU(),
                nn.Linear(hidden, out_dim),
            )
            # a linear path from the features (not the noise) to the output: what is linearly
            # recoverable (an early conv layer, an identity-like feature) is learnt in a few hundred
            # steps instead of being squeezed through the MLP; skipped when it would be huge
            self.skip = nn.Linear(f_dim, out_dim) if f_dim * out_dim <= MAX_SKIP else None
            self.register_buffer("sig", torch.from_numpy(sig.copy()))

        def logits(self, f: Any, z: Any | None = None) -> Any:
            if self.z_dim:
                if z is None:
                    z = torch.zeros(len(f), self.z_dim)
                out = self.body(torch.cat([f, z], dim=1))
            else:
                out = self.body(f)
            return out if self.skip is None else out + self.skip(f)

        def activate(self, logits: Any) -> Any:
            return torch.where(self.sig, torch.sigmoid(logits), logits)

        def forward(self, f: Any, z: Any | None = None) -> Any:
            return self.activate(self.logits(f, z))

    return Generator()


def _make_discriminator(torch: Any, f_dim: int, x_dim: int, hidden: int) -> Any:
    nn = torch.nn
    h = max(64, hidden // 2)

    class Discriminator(nn.Module):
        """D(input, features) -> logit of "real pair": each branch projected, then an MLP on both."""

        def __init__(self) -> None:
            super().__init__()
            self.fx = nn.Linear(x_dim, h)
            self.ff = nn.Linear(f_dim, h)
            self.body = nn.Sequential(nn.LeakyReLU(0.2), nn.Dropout(0.3), nn.Linear(2 * h, h), nn.LeakyReLU(0.2),
                                      nn.Linear(h, 1))

        def forward(self, x: Any, f: Any) -> Any:
            return self.body(torch.cat([self.fx(x), self.ff(f)], dim=1)).squeeze(1)

    return Discriminator()


def _recon_loss(torch: Any, logits: Any, target: Any, sig: Any, kind: str) -> Any:
    """Per-value loss, averaged: MSE on image pixels (what PSNR measures) and on standardised real
    columns, BCE on binary columns."""
    f = torch.nn.functional
    if kind == "image":
        return f.mse_loss(torch.sigmoid(logits), target)
    per = torch.where(sig, f.binary_cross_entropy_with_logits(logits, target, reduction="none"),
                      (logits - target) ** 2)
    return per.mean()


def _batches(torch: Any, n: int, batch: int, gen: Any) -> Iterator[Any]:
    while True:
        perm = torch.randperm(n, generator=gen)
        for i in range(0, n - batch + 1 if n >= batch else 1, batch):
            yield perm[i:i + batch]


def _predict(torch: Any, g: Any, f: Any) -> np.ndarray:
    g.eval()
    with torch.no_grad():
        out = torch.cat([g(f[i:i + 4096]) for i in range(0, len(f), 4096)])
    g.train()
    return out.numpy()


def _fit_decoder(torch: Any, spec: BudgetSpec, f_tr: Any, x_tr: Any, f_va: Any, x_va: Any, kind: str,
                 sig: np.ndarray, gen: Any, tick: Callable[[int], None]) -> tuple[Any, dict[str, Any]]:
    """Train the decoder (a generator without noise input) on the reconstruction loss alone,
    early-stopped on the validation loss; returns the best checkpoint."""
    g = _make_generator(torch, f_tr.shape[1], 0, x_tr.shape[1], spec.hidden, sig)
    wide = [g.body[0].weight, *([g.skip.weight] if g.skip is not None else [])]
    rest = [p for p in g.parameters() if all(p is not w for w in wide)]
    scale = min(1.0, math.sqrt(WIDE_FEATURES / f_tr.shape[1]))
    opt = torch.optim.Adam([{"params": wide, "lr": DECODER_LR * scale}, {"params": rest}], lr=DECODER_LR,
                           weight_decay=1e-5)
    batch = min(spec.batch, len(f_tr))
    check_every = max(10, min(100, len(f_tr) // batch))
    best, best_state, best_step, step, cuts = math.inf, copy.deepcopy(g.state_dict()), 0, 0, 0
    batches = _batches(torch, len(f_tr), batch, gen)
    while step < spec.decoder_steps:
        idx = next(batches)
        loss = _recon_loss(torch, g.logits(f_tr[idx]), x_tr[idx], g.sig, kind)
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        tick(step)
        if step % check_every == 0 or step == spec.decoder_steps:
            g.eval()
            with torch.no_grad():
                val = float(_recon_loss(torch, g.logits(f_va), x_va, g.sig, kind))
            g.train()
            if val < best * (1 - 1e-4):
                best, best_state, best_step = val, copy.deepcopy(g.state_dict()), step
            elif step - best_step >= spec.patience * (cuts + 1):
                # a plateau: go on from the best checkpoint at a lower rate; stop after LR_CUTS cuts
                if cuts == LR_CUTS:
                    break
                cuts += 1
                g.load_state_dict(best_state)
                for group in opt.param_groups:
                    group["lr"] *= LR_FACTOR
    g.load_state_dict(best_state)
    return g, {"decoder_steps": step, "decoder_val_loss": best, "decoder_lr_cuts": cuts}


def _add_noise_input(torch: Any, decoder: Any, z_dim: int) -> Any:
    """The c-GAN's generator, starting as the decoder: the decoder's weights, plus zero weights
    for the noise columns, so G(f, z) == decoder(f) for every z until adversarial training moves it."""
    first = decoder.body[0]
    f_dim, out_dim = first.in_features, decoder.body[-1].out_features
    g = _make_generator(torch, f_dim, z_dim, out_dim, first.out_features, decoder.sig.numpy())
    state = decoder.state_dict()
    w = state["body.0.weight"]
    state["body.0.weight"] = torch.cat([w, torch.zeros(w.shape[0], z_dim)], dim=1)
    g.load_state_dict(state)
    return g


def _fit_gan(torch: Any, spec: BudgetSpec, g: Any, f_tr: Any, x_tr: Any, f_va: Any, val_score: Callable[[Any], float],
             kind: str, recon_weight: float, gen: Any, tick: Callable[[int], None]) -> tuple[Any, dict[str, Any]]:
    """pix2pix-style adversarial fine-tuning of G (already the decoder) against D(input, features);
    keeps the checkpoint with the best validation score, the starting one included."""
    fnn = torch.nn.functional
    d = _make_discriminator(torch, f_tr.shape[1], x_tr.shape[1], spec.hidden)
    opt_g = torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999))
    batch = min(spec.batch, len(f_tr))
    check_every = max(10, min(100, len(f_tr) // batch))
    best, best_state, best_step = val_score(g), copy.deepcopy(g.state_dict()), 0
    start = best
    batches = _batches(torch, len(f_tr), batch, gen)
    noise = 0.05  # instance noise on D's inputs: real binary/quantised values are otherwise trivially told apart
    for step in range(1, spec.gan_steps + 1):
        idx = next(batches)
        f, x = f_tr[idx], x_tr[idx]
        z = torch.randn(len(idx), g.z_dim, generator=gen)
        fake = g(f, z)
        # discriminator: real pairs -> 0.9 (one-sided label smoothing), generated pairs -> 0
        d_real = d(x + noise * torch.randn(x.shape, generator=gen), f)
        d_fake = d(fake.detach() + noise * torch.randn(x.shape, generator=gen), f)
        loss_d = (fnn.binary_cross_entropy_with_logits(d_real, torch.full_like(d_real, 0.9))
                  + fnn.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake)))
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        # generator: fool D on (G(f, z), f) pairs + recon_weight x reconstruction
        logits = g.logits(f, z)
        d_gen = d(g.activate(logits) + noise * torch.randn(x.shape, generator=gen), f)
        loss_g = (fnn.binary_cross_entropy_with_logits(d_gen, torch.ones_like(d_gen))
                  + recon_weight * _recon_loss(torch, logits, x, g.sig, kind))
        opt_g.zero_grad()
        loss_g.backward()
        opt_g.step()
        tick(step)
        if step % check_every == 0 or step == spec.gan_steps:
            val = val_score(g)
            if val > best + 1e-6:
                best, best_state, best_step = val, copy.deepcopy(g.state_dict()), step
    g.load_state_dict(best_state)
    return g, {"gan_steps": spec.gan_steps, "gan_selected_step": best_step, "val_score_start": start,
               "val_score": best}

