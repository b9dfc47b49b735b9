"""A slow, obvious reference implementation of IST, written from the paper's description.

It trains every parameter with the plain inner optimizer and masks the gradients of
inactive layers; it suppresses LoRA adapters by editing their ``scaling`` by hand and
applies the score update as a Python loop. The tests feed it and ISTOptimizer the same
batches and check that they agree after every step.
"""

from __future__ import annotations

import math

import torch


class ReferenceIST:
    def __init__(self, model, layer_params, layer_tuners, *, lr, seed, active, suppressed,
                 candidates, eta, lam, interval):
        self.model = model
        self.layer_params = layer_params
        self.layer_tuners = layer_tuners
        self.inner = torch.optim.AdamW([p for ps in layer_params for p in ps], lr=lr)
        self.g = torch.Generator().manual_seed(seed)
        self.k, self.ns, self.kc = active, suppressed, candidates
        self.eta, self.lam, self.T = eta, lam, interval
        self.s = [0.0] * len(layer_params)
        self.t = 0
        self.active = self._draw([1 / (1 + math.exp(x)) for x in self.s], self.k)

    def _draw(self, weights, k):
        w = torch.tensor(weights, dtype=torch.float64)
        if k == len(weights):
            return list(range(k))
        return sorted(int(i) for i in torch.multinomial(w, k, replacement=False, generator=self.g))

    def step(self, batch):
        for i, params in enumerate(self.layer_params):
            if i not in self.active:
                for p in params:
                    p.grad = None
        self.inner.step()
        self.inner.zero_grad()
        self.t += 1
        if self.t % self.T == 0:
            self._round(batch)
        self.active = self._draw([1 / (1 + math.exp(x)) for x in self.s], self.k)

    def _round(self, batch):
        sets = []
        tries = 0
        while len(sets) < self.kc and tries < self.kc + 100:
            tries += 1
            cand = self._draw([1 / (1 + math.exp(-x)) for x in self.s], self.ns)
            if cand not in sets:
                sets.append(cand)
        losses = []
        self.model.eval()
        with torch.no_grad():
            for members in sets:
                saved = [(m, dict(m.scaling)) for i in members for m in self.layer_tuners[i]]
                for m, scaling in saved:
                    for name in scaling:
                        m.scaling[name] = scaling[name] * self.lam
                losses.append(float(self.model(**batch).loss))
                for m, scaling in saved:
                    m.scaling.update(scaling)
        self.model.train()
        rewards = [math.exp(-x) for x in losses]
        mean = sum(rewards) / len(rewards)
        p = [1 / (1 + math.exp(-x)) for x in self.s]
        for i in range(len(self.s)):
            total = sum(r - mean for r, members in zip(rewards, sets, strict=True)
                        if i in members)
            self.s[i] += self.eta * total * p[i] * (1 - p[i])
