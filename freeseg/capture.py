"""The feature-source seam: capture a diffusion model's layer outputs in one forward pass.

Every feature source (the ComfyUI UNet pass in ``nodes/diffusion_features.py``, the diffusers
UNet in ``freeseg.backends.diffusers``) does the same four things, which live here once:

1. the candidate layers of a source, each with the downscale factor of its output, come from
   the runtime (it knows its module tree): ``Layer = (name, module, factor)`` in forward order;
2. ``LayerCapture`` hooks them, runs the runtime's forward, and ends the pass after the last
   layer the features use (``StopPass``), so the finer decoder levels are never computed;
3. it checks that the captured outputs sit at the levels the runtime said (``levels_match``)
   and otherwise runs the whole pass once more, with a warning, for the rest of its passes;
4. ``captured_to_features`` turns the captured outputs into the feature grid.

A new source is one new module: a class with ``extract(images, settings) ->
DiffusionFeatures`` (``FeatureSource``), whose forward pass goes through ``LayerCapture``.
A layer whose output is not the feature tensor itself (a DiT block returns a tuple of text and
image streams) is read through ``pick(output, latent_hw)`` (``freeseg.dit.image_tokens``).

Features captured while a sampler runs (no pass of their own) go through ``SamplingCapture``:
the runtime calls ``begin`` / ``call`` / ``end`` around each sampling run and each model call
of it, and ``features`` gives the kept call's features once the run's output is known.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Protocol, Sequence

import torch

from .features import SOURCE_QUERIES, DiffusionFeatures, StopPass, aggregate_maps, last_used_layer, output_factor, tokens_to_map, \
    wanted_factors
from .settings import FreeSegSettings

__all__ = ["FeatureSource", "Layer", "LayerCapture", "SamplingCapture", "StaleCapture", "feature_grid",
           "Pick", "levels_match", "select_blocks", "captured_to_features", "KEEP_LAST", "KEEP_NEAREST", "KEEP_CHOICES"]

Layer = tuple[str, torch.nn.Module, int]
"""(name, module to hook, downscale factor of its output relative to the latent)."""

Pick = Callable[[Any, tuple[int, int]], torch.Tensor]
"""(a hooked module's output, latent (h, w)) -> its ``[n,N,C]`` tokens or ``[n,C,h,w]`` map."""


class FeatureSource(Protocol):
    """What the orchestrator (``freeseg.pipeline.segment_batch``) asks of a feature source."""

    def extract(self, images: torch.Tensor, settings: FreeSegSettings) -> DiffusionFeatures:
        """``[B,H,W,3]`` float 0..1 -> ``DiffusionFeatures`` with ``[B,C,g,g]`` float16 features,
        ``g = feature_grid(settings)``, image i's noise seeded with ``settings.seed + i``."""


def feature_grid(settings: FreeSegSettings) -> tuple[int, int]:
    """Side of the feature grid: resolution/16 (detail "paper") or resolution/8 ("fine")."""
    side = settings.resolution // (16 if settings.detail == "paper" else 8)
    return side, side


def layer_output(output: Any) -> torch.Tensor:
    """The tensor of a hooked module's output (diffusers blocks return tuples or ``.sample``)."""
    return output[0] if isinstance(output, tuple) else getattr(output, "sample", output)


def levels_match(captured: Mapping[str, torch.Tensor], layers: Sequence[Layer], latent_hw: tuple[int, int]) -> bool:
    """Whether every captured output is at the level its layer was given."""
    return all(output_factor(captured[name], latent_hw) == f for name, _, f in layers if name in captured)


class LayerCapture:
    """Hooks ``layers`` around one forward pass at a time; the pass ends after the last layer
    the features of ``source`` / ``fine`` use (``stop_early``; False: the whole pass).

    ``warn(message)`` is called once if the captured levels are not where ``layers`` said;
    the pass is then rerun whole, and every later pass of this object runs whole. ``pick``
    reads a layer's output (None: ``layer_output``)."""

    def __init__(self, layers: Sequence[Layer], source: str, fine: bool = False, stop_early: bool = True,
                 warn: Optional[Callable[[str], None]] = None, pick: Optional[Pick] = None):
        self.layers = list(layers)
        self.pick = pick
        self.source = source
        self.fine = fine
        self.stop = last_used_layer([(n, f) for n, _, f in self.layers], source, fine) if stop_early else None
        self.warn = warn

    def capture(self, forward: Callable[[], Any], check: Optional[Callable[[], None]] = None,
                stop: Optional[str] = None, latent_hw: tuple[int, int] = (0, 0)) -> dict[str, torch.Tensor]:
        """The outputs of the layers in one ``forward()`` of a latent of ``latent_hw``, which ends
        after layer ``stop`` (None: the whole pass). ``check()`` runs at every captured layer (an
        interrupt check: a cancel stops a long pass midway). Hooks are removed after."""
        captured: dict[str, torch.Tensor] = {}

        def hook(name: str) -> Callable:
            def fn(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
                tensor = layer_output(output) if self.pick is None else self.pick(output, latent_hw)
                captured[name] = tensor.detach()
                if check is not None:
                    check()
                if name == stop:
                    raise StopPass
            return fn

        handles = [module.register_forward_hook(hook(name)) for name, module, _ in self.layers]
        try:
            forward()
        except StopPass:
            pass
        finally:
            for handle in handles:
                handle.remove()
        return captured

    def run(self, forward: Callable[[], Any], latent_hw: tuple[int, int],
            check: Optional[Callable[[], None]] = None) -> dict[str, torch.Tensor]:
        """``capture`` up to the last used layer, checked: ``{name: output}`` in forward order
        (``[n,N,C]`` tokens or ``[n,C,h,w]`` maps, as the layers give them)."""
        captured = self.capture(forward, check, self.stop, latent_hw)
        if self.stop is not None and not levels_match(captured, self.layers, latent_hw):
            if self.warn is not None:
                self.warn("the UNet's levels are not where its structure says; running the whole UNet instead")
            self.stop = None
            captured = self.capture(forward, check, None, latent_hw)
        names = [name for name, _, _ in self.layers]
        ran = names[:names.index(self.stop) + 1] if self.stop is not None else names  # up to the stop
        missing = [name for name in ran if name not in captured]
        if missing:
            raise RuntimeError(f"the layers {', '.join(missing)} did not run in the model's forward pass (does a "
                               "patch on the MODEL skip blocks, e.g. a block cache?); their features are needed")
        return captured

    def features(self, forward: Callable[[], Any], latent_hw: tuple[int, int], grid: tuple[int, int],
                 check: Optional[Callable[[], None]] = None) -> tuple[torch.Tensor, list[str]]:
        """``run`` then ``captured_to_features``: (``[n,C,grid]`` float32, layer names used)."""
        return captured_to_features(self.run(forward, latent_hw, check), latent_hw, grid, self.source, self.fine)


def select_blocks(captured: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                  source: str = SOURCE_QUERIES, fine: bool = False) -> list[str]:
    """Names of the captured layers FreeSeg-Diff uses, in ``captured``'s order.

    ``captured`` maps layer names to ``[B,N,C]`` tokens or ``[B,C,h,w]`` maps. For queries:
    those at latent/4 (the 16x16 blocks at 512 px; the nearest level when the model has none
    there, the coarser one on a tie), plus with ``fine`` those at half that factor (the 32x32
    blocks at 512 px); for decoder features: those at latent/4 and latent/2."""
    factors = {name: output_factor(t, latent_hw) for name, t in captured.items()}
    if not factors:
        raise ValueError("no UNet layer was captured")
    wanted = wanted_factors(factors.values(), source, fine)
    return [name for name in captured if factors[name] in wanted]


def captured_to_features(captured: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                         grid: tuple[int, int], source: str = SOURCE_QUERIES,
                         fine: bool = False) -> tuple[torch.Tensor, list[str]]:
    """Captured layer outputs of one pass -> the feature grid FreeSeg-Diff clusters.

    Selects the layers (``select_blocks``, ``fine`` as there), turns ``[B,N,C]`` tokens into
    ``[B,C,h,w]`` maps, bilinearly resizes each to ``grid`` and concatenates on channels.
    (The fine option pairs with a grid twice as fine: resolution/8 instead of /16.)

    Returns:
        (``[B, sum C_i, grid_h, grid_w]`` float32 on the captured tensors' device, the names
        of the layers used in channel order).
    """
    names = select_blocks(captured, latent_hw, source, fine)
    if not names:
        raise ValueError(f"no captured layer matches source {source!r}")
    maps = [tokens_to_map(captured[n], latent_hw) if captured[n].ndim == 3 else captured[n] for n in names]
    return aggregate_maps(maps, grid), names


KEEP_LAST = "last_call"  # the last model call of the run that has the conditional half
KEEP_NEAREST = "nearest_sigma"  # the call whose sigma is nearest a chosen sigma (the first on a tie)
KEEP_CHOICES = (KEEP_LAST, KEEP_NEAREST)


class StaleCapture(RuntimeError):
    """What ``SamplingCapture.features`` raises when it has no features of the given samples."""


class SamplingCapture:
    """Records the layer outputs of one model call per sampling run, while the sampler runs:
    no extra model call, and the model's outputs are untouched (forward hooks that only read).

    The runtime calls ``begin()`` when a sampling run starts, ``call(forward, sigma, rows,
    latent_hw)`` around every model call of it (``rows``: the batch rows of the conditional
    half, None when the call has none: it then runs without hooks), and ``end(samples)`` with
    the run's output. Which call is kept: ``keep`` (``KEEP_LAST``, or ``KEEP_NEAREST`` to
    ``sigma``: a call no nearer than the one kept runs without hooks). Only the layers the
    features use (``select_blocks``) are kept, rows ``rows`` only.

    ``features(samples, grid)`` checks that ``samples`` are the output of the last finished
    run (same shape, same values), so features from an older run, a run that failed, or a
    handle no sampler used are never handed out: it raises ``StaleCapture`` instead."""

    def __init__(self, layers: Sequence[Layer], source: str, fine: bool = False, keep: str = KEEP_LAST,
                 sigma: float = 0.0, pick: Optional[Pick] = None):
        if keep not in KEEP_CHOICES:
            raise ValueError(f"keep: {keep!r} is not one of {', '.join(KEEP_CHOICES)}")
        self.capture = LayerCapture(layers, source, fine, stop_early=False, pick=pick)
        self.keep, self.sigma = keep, float(sigma)
        self.runs = 0  # sampling runs begun
        self.active = False  # inside a run
        self.kept: Optional[tuple[dict[str, torch.Tensor], float, tuple[int, int]]] = None
        self.samples: Optional[torch.Tensor] = None  # output of the last finished run, on the CPU
        self.calls = 0  # model calls with a conditional half in the current run

    def begin(self) -> None:
        """A sampling run starts: what an earlier run recorded is dropped."""
        self.runs += 1
        self.active, self.kept, self.samples, self.calls = True, None, None, 0

    def end(self, samples: Optional[torch.Tensor]) -> None:
        """The run ended with output ``samples`` (None: it failed)."""
        self.active = False
        self.samples = None if samples is None else samples.detach().to("cpu", copy=True)

    def call(self, forward: Callable[[], Any], sigma: float, rows: Optional[slice],
             latent_hw: tuple[int, int]) -> Any:
        """``forward()``'s result; its layer outputs (rows ``rows``) are kept when this call is
        the one to keep so far."""
        if not self.active or rows is None:
            return forward()
        self.calls += 1
        if (self.keep == KEEP_NEAREST and self.kept is not None
                and abs(sigma - self.sigma) >= abs(self.kept[1] - self.sigma)):
            return forward()
        result = []
        captured = self.capture.capture(lambda: result.append(forward()), latent_hw=latent_hw)
        used = select_blocks(captured, latent_hw, self.capture.source, self.capture.fine)
        self.kept = ({name: captured[name][rows] for name in used}, float(sigma), latent_hw)
        return result[0]

    def features(self, samples: torch.Tensor, grid: tuple[int, int]) -> tuple[torch.Tensor, list[str], float]:
        """(``[B,C,grid]`` float32 features of the kept call, layer names used, its sigma) when
        ``samples`` are the output of the last finished run; ``StaleCapture`` otherwise."""
        if self.runs == 0:
            raise StaleCapture("nothing was recorded: no sampler ran with the captured MODEL since it was made "
                               "(is the capture's model output connected to the sampler? a sampler whose result "
                               "ComfyUI cached does not run); run the sampler again")
        if self.samples is None:
            raise StaleCapture("the last sampling run with the captured MODEL did not finish (it failed or was "
                               "interrupted); run it again")
        if self.kept is None:
            raise StaleCapture("the sampler made no model call with a conditional half (no positive "
                               "conditioning was run), so nothing was recorded; run it again with one")
        if tuple(samples.shape) != tuple(self.samples.shape) or not torch.equal(samples.detach().cpu(), self.samples):
            raise StaleCapture("these latents are not the output of the last sampling run with the captured "
                               "MODEL (the sampler's result was cached, or another sampler ran with that MODEL "
                               "since); run the sampler again (change its seed or re-queue after a change) so "
                               "the features come from the latents given")
        captured, sigma, latent_hw = self.kept
        feats, names = captured_to_features(captured, latent_hw, grid, self.capture.source, self.capture.fine)
        return feats, names, sigma
