"""freeseg.capture.SamplingCapture on a toy model: which call is kept, the conditional rows,
outputs untouched, and the refusals (nothing recorded, a failed run, latents of another run)."""

import pytest
import torch

from freeseg.capture import KEEP_NEAREST, SamplingCapture, StaleCapture

LATENT_HW = (8, 8)
GRID = (4, 4)


class Toy(torch.nn.Module):
    """[B,16,C] tokens (a latent/2 level of an 8x8 latent) through one projection."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.to_q = torch.nn.Linear(3, 5)

    def forward(self, x):
        return self.to_q(x) * 2


def recorder(**options) -> tuple[Toy, SamplingCapture]:
    toy = Toy()
    return toy, SamplingCapture([("q", toy.to_q, 2)], "cross_attn_queries", **options)


def run(toy, rec, calls, samples):
    """One sampling run: `calls` is [(input, sigma, rows)]; returns the model outputs."""
    rec.begin()
    outs = [rec.call(lambda x=x: toy(x), sigma, rows, LATENT_HW) for x, sigma, rows in calls]
    rec.end(samples)
    return outs


def expected(toy, x) -> torch.Tensor:
    with torch.no_grad():
        q = toy.to_q(x)
    return torch.nn.functional.interpolate(q.transpose(1, 2).reshape(x.shape[0], 5, 4, 4), size=GRID,
                                           mode="bilinear", align_corners=False)


def test_last_call_conditional_rows_and_untouched_outputs():
    toy, rec = recorder()
    xs = [torch.randn(4, 16, 3) for _ in range(3)]
    samples = torch.randn(2, 4, 8, 8)
    outs = run(toy, rec, [(xs[0], 5.0, slice(2, 4)), (xs[1], 1.0, slice(2, 4)), (xs[2], 0.1, None)], samples)
    for x, out in zip(xs, outs):
        assert torch.equal(out, toy(x))
    feats, names, sigma = rec.features(samples.clone(), GRID)
    assert names == ["q"] and sigma == 1.0  # the last call with conditional rows
    assert torch.allclose(feats, expected(toy, xs[1][2:4]))


def test_nearest_sigma_keeps_the_nearest_call():
    toy, rec = recorder(keep=KEEP_NEAREST, sigma=0.5)
    xs = [torch.randn(1, 16, 3) for _ in range(3)]
    samples = torch.zeros(1, 4, 8, 8)
    run(toy, rec, [(x, s, slice(0, 1)) for x, s in zip(xs, (2.0, 0.6, 0.1))], samples)
    feats, _, sigma = rec.features(samples, GRID)
    assert sigma == 0.6 and torch.allclose(feats, expected(toy, xs[1]))


def test_calls_outside_a_run_are_not_recorded():
    toy, rec = recorder()
    rec.call(lambda: toy(torch.randn(1, 16, 3)), 1.0, slice(0, 1), LATENT_HW)
    with pytest.raises(StaleCapture, match="nothing was recorded"):
        rec.features(torch.zeros(1, 4, 8, 8), GRID)


def test_refusals():
    toy, rec = recorder()
    samples = torch.randn(1, 4, 8, 8)
    run(toy, rec, [(torch.randn(2, 16, 3), 1.0, None)], samples)
    with pytest.raises(StaleCapture, match="no model call with a conditional half"):
        rec.features(samples, GRID)
    run(toy, rec, [(torch.randn(1, 16, 3), 1.0, slice(0, 1))], samples)
    other = samples.clone()
    other[0, 0, 0, 0] += 1e-6
    with pytest.raises(StaleCapture, match="not the output of the last sampling run"):
        rec.features(other, GRID)
    with pytest.raises(StaleCapture, match="not the output of the last sampling run"):
        rec.features(samples[:, :, :4], GRID)
    rec.begin()
    rec.call(lambda: toy(torch.randn(1, 16, 3)), 1.0, slice(0, 1), LATENT_HW)
    rec.end(None)  # the run failed
    with pytest.raises(StaleCapture, match="did not finish"):
        rec.features(samples, GRID)
    with pytest.raises(ValueError, match="keep"):
        recorder(keep="first")
