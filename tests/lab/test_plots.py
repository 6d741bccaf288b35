"""Plot helpers whose numbers can be checked."""

import math

import pytest
import torch

from layerwise.lab.analyze import esd_density_at


def test_esd_fit_anchor_is_the_loglog_interpolated_density():
    centers = torch.tensor([1.0, 10.0, 100.0], dtype=torch.float64)
    dens = torch.tensor([1.0, 1e-2, 1e-4], dtype=torch.float64)  # density x^-2
    assert esd_density_at(centers, dens, 10**0.5) == pytest.approx(0.1)
    assert esd_density_at(centers, dens, 50.0) == pytest.approx(50.0**-2)
    assert esd_density_at(centers, dens, 0.1) == 1.0 and esd_density_at(centers, dens, 1e3) == 1e-4  # clamped
    assert math.isfinite(esd_density_at(centers, dens, 10.0))


def test_decay_history_plot_reserves_the_note_strip(tmp_path, monkeypatch):
    """plot_decay_history draws α, Δα and λ panels and keeps the bottom strip free for the shape note."""
    import json

    import matplotlib.pyplot as plt

    from layerwise.lab.report import plot_decay_history

    names = [f"model.layers.{i}.{m}.weight" for i in range(2) for m in ("self_attn.q_proj", "mlp.down_proj")]
    recs = [
        {"kind": "decay", "step": s, "controller": "alphadecay", "rows": [
            {"name": n, "alpha": 2.0 + 0.1 * k + s, "weight_decay": 0.1 * (k + 1)} for k, n in enumerate(names)
        ]}
        for s in (0, 4)
    ]  # fmt: skip
    run = tmp_path / "alphadecay" / "seed0"
    run.mkdir(parents=True)
    (run / "spectral.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    figs = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: (figs.append(fig), real_close(fig)))
    plot_decay_history(run, tmp_path / "decay.png")
    assert (tmp_path / "decay.png").stat().st_size > 0
    (fig,) = figs
    assert len(fig.axes) >= 4  # α first, α last, Δα, λ (+ colour bars)
    assert tuple(fig.get_layout_engine().get()["rect"]) == (0, 0.06, 1, 0.94)
