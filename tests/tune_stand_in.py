"""A stand-in for a sweep's trial function, in a module of its own so the Tune actors that run it import
only Ray (the test module imports sdetr's sweep code, and with it torch and torchvision)."""

from __future__ import annotations

EPOCHS = 4


def fake_trial(params):
    """Reports like a sweep trial: AP grows with epochs and ρ, GFLOPs grow with ρ."""
    from ray import tune

    rho = params["model.rho"]
    for epoch in range(EPOCHS):
        tune.report({"AP": rho * (epoch + 1) / EPOCHS, "gflops": 100 + 50 * rho, "epochs_done": epoch + 1})
