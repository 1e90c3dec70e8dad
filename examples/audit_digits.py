"""After training: was this set of digits used to train this model?

A data owner holds 50 images (the *suspects*) and 200 images of the same kind known never to
have been trained on (the *non-members*). Two digits MLPs are trained with the same recipe:
one on 300 other digits plus the suspects, one on the 300 alone. The audit compares the
suspects with the non-members on each model's membership signals and says "shown" when the
suspects are significantly more member-like (one-sided permutation test, level 0.05).

"Not shown" is not proof of absence: BENCHMARKS.md (section 10) measures, over seeds, how
often a set of this size trained on with this recipe goes unnoticed, and how often a set
never trained on is shown.

Run: python examples/audit_digits.py
"""

import torch
from torch import nn

from fesmia_hooks.audit import audit
from fesmia_hooks.demos import one_torch_thread
from fesmia_hooks.demos.digits import digits_arrays


def train(x, y, *, epochs, seed):
    """The MLP 64-1024-10, Adam, batch 64: it fits its training set."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 1024), nn.ReLU(), nn.Linear(1024, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def main(epochs=150, base=300, suspects=50, non_members=200, permutations=9999, seed=0):
    with one_torch_thread():  # a small model: on a shared CPU, more threads only wait
        return _run(epochs, base, suspects, non_members, permutations, seed)


def _run(epochs, base, suspects, non_members, permutations, seed):
    x, y = digits_arrays("this example")  # scikit-learn's digits, pixels in [0, 1]
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    trained = order[:base]
    suspect = order[base:base + suspects]
    outside = order[base + suspects:base + suspects + non_members]

    results = {}
    for name, idx in (("with", torch.cat([trained, suspect])), ("without", trained)):
        model = train(x[idx], y[idx], epochs=epochs, seed=seed)
        result = audit(model, (x[suspect], y[suspect]), (x[outside], y[outside]),
                       permutations=permutations, seed=seed, num_classes=10)
        print(f"model trained {name} the suspects -> {result.summary()}")
        results[name] = result
    return results


if __name__ == "__main__":
    main()
