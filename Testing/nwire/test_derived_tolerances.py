"""Labeling and sequence tolerances derived from the phantom's geometry and the pixel spacing (issue 23, item 2).

The old tolerances were fixed lengths in mm set on fCal 2.0 at 0.078 mm/px. They now grow with
the pixel (a coarse image's dot centres are a fraction of a pixel off, which is several tenths of
a mm) and shrink with the phantom (a wrong label one wire or layer over is as far as the wires
are apart). Each test shows a case the fixed numbers got wrong.
"""

from __future__ import annotations

import numpy as np
import pytest

from NWireCalibrationLib.labeling import LabelingSettings, label_dots, min_separation_mm
from NWireCalibrationLib.phantom import NWirePhantom, load_phantom
from NWireCalibrationLib.pipeline import probe_to_reference
from NWireCalibrationLib.sequence_labeling import SequenceSettings, label_sequence
from NWireCalibrationLib.simulate import simulate_nwire
from nwire_synthetic import exact_geometry

#: The tolerances as they were: fixed mm, no pixel term, no geometric cap.
FIXED = LabelingSettings(distance_tolerance_px=0.0, collinearity_max_px=0.0, max_wire_distance_px=0.0,
                         collinearity_eps_px=0.0, parallel_eps_px=0.0, alpha_margin_px=0.0, geometry_fraction=1e9)
PRIORS = ("layer-spacing-prior", "obliquity-prior", "parallel-prior", "shared-dots-prior", "too-few-lines",
          "pattern-missing", "no-n-triple")


def _scaled(name: str, factor: float) -> NWirePhantom:
    """The phantom with every wire coordinate multiplied by ``factor`` (same shape, other size)."""
    d = load_phantom(name).to_dict()
    for pattern in d["patterns"]:
        for wire in pattern["wires"]:
            wire["front"] = [factor * v for v in wire["front"]]
            wire["back"] = [factor * v for v in wire["back"]]
    d["landmarks"] = {k: [factor * v for v in p] for k, p in d["landmarks"].items()}
    d["name"] = f"{name} x{factor:g}"
    return NWirePhantom.from_dict(d)


def test_fcal2_keeps_its_numbers_and_separation_is_the_phantoms():
    fcal2 = load_phantom("fCal-2.0")
    # fCal 2.0: layers 10 mm apart, side wires 25-30 mm: the layer step is the smallest separation.
    assert min_separation_mm(fcal2) == pytest.approx(10.0)
    assert min_separation_mm(load_phantom("fCal-1.0")) == pytest.approx(5.0)
    assert min_separation_mm(_scaled("fCal-2.0", 0.2)) == pytest.approx(2.0)
    s = LabelingSettings().resolved(fcal2, 0.078)  # PLUS's fCal 2.0 spacing: the physical floors hold
    assert (s.distance_tolerance_mm, s.collinearity_max_mm, s.max_wire_distance_mm) == (0.8, 1.0, 0.6)
    assert (s.collinearity_eps, s.parallel_eps, s.alpha_margin) == (0.05, 0.05, 0.08)  # the paper's, ours
    coarse = LabelingSettings().resolved(fcal2, 0.5)  # 4 px of 0.5 mm
    assert (coarse.distance_tolerance_mm, coarse.collinearity_max_mm) == (2.0, 2.0)
    assert (coarse.collinearity_eps, coarse.parallel_eps) == (0.05, 0.05)  # 1.5 and 2 px of the shortest 40 px
    coarser = LabelingSettings().resolved(fcal2, 1.0)  # the shortest line (0.8 x 25 mm) is 20 px
    assert coarser.collinearity_eps == pytest.approx(1.5 / 20) and coarser.parallel_eps == pytest.approx(2 / 20)
    assert coarser.alpha_margin == pytest.approx(2 / 20)
    assert coarse.resolved(fcal2, 0.5) == coarse  # resolving twice changes nothing
    small = LabelingSettings().resolved(_scaled("fCal-2.0", 0.2), 0.078)  # capped at a quarter of 2 mm
    assert small.distance_tolerance_mm == small.collinearity_max_mm == small.max_wire_distance_mm == 0.5
    assert LabelingSettings(max_wire_distance_mm=0.0).resolved(fcal2, 0.5).max_wire_distance_mm == 0.0
    with pytest.raises(ValueError, match="pixel_spacing_mm"):
        LabelingSettings().resolved(fcal2, 0.0)
    with pytest.raises(ValueError, match="geometry_fraction"):
        LabelingSettings(geometry_fraction=0.0)


def test_tolerances_grow_with_the_pixel_spacing():
    """Coarse pixels (0.8 mm/px), dot centres 0.5 px off: the fixed tolerances refused half the frames."""
    sim, truth, _ = exact_geometry("fCal-2.0")
    spacing = float(np.mean(sim.pixel_spacing_mm))
    assert spacing > 0.7
    rng = np.random.default_rng(0)
    noisy = truth + rng.normal(0.0, 0.5, truth.shape)
    counts = {}
    for name, settings in (("fixed", FIXED), ("derived", LabelingSettings())):
        # The 3D check is the same physical length in both (see LabelingSettings.max_wire_distance_px).
        settings = LabelingSettings(**{**settings.__dict__, "max_wire_distance_mm": 0.0})
        results = [label_dots(p[::-1], np.ones(len(p)), sim.phantom, spacing, settings=settings) for p in noisy]
        assert all(np.array_equal(r.points_px, p) for r, p in zip(results, noisy) if r.ok)  # never a wrong label
        counts[name] = (sum(r.ok for r in results), sum(r.reason_code in PRIORS for r in results))
    assert counts["fixed"][1] >= 15 and counts["derived"][1] <= 2
    assert counts["derived"][0] >= counts["fixed"][0] + 13


def test_a_wrong_label_one_layer_over_is_refused_on_a_small_phantom():
    """fCal 2.0 at 0.15 of its size (layers 1.5 mm apart): a dot of the next layer is under 2 mm away.

    The fixed 2 mm jump floor let that wrong label stand; the floor derived from the phantom's
    separation (half of 1.5 mm) refuses it.
    """
    phantom = _scaled("fCal-2.0", 0.15)
    assert min_separation_mm(phantom) == pytest.approx(1.5)
    sim = simulate_nwire(phantom=phantom, n_frames=40, seed=0, image_size_px=(128, 96), depth_mm=10.5,
                         linear_width_mm=10.5, tilt_deg=10.0, tracker_noise_mm=0.0, tracker_noise_deg=0.0,
                         walls=False, reverberation=False)
    truth = sim.true_points_px.copy()
    poses = probe_to_reference(sim.sequence)
    spacing = float(np.mean(sim.pixel_spacing_mm))
    assert np.isfinite(truth).all()
    pts = truth.copy()
    i = 7
    pts[i, 0] = truth[i, 3]  # wire 1 labelled with the dot of the layer below (wire 4)
    jump_mm = float(np.linalg.norm(truth[i, 3] - truth[i, 0])) * spacing
    assert 0.75 < jump_mm < 2.0
    ok = np.ones(len(pts), bool)
    cands = list(truth)

    def run(settings):
        return label_sequence(pts, ok, cands, phantom, spacing, reasons=[""] * len(ok), reason_codes=[""] * len(ok),
                              probe_to_reference=poses, phantom_to_reference=sim.phantom_to_reference,
                              settings=settings)

    fixed = run(SequenceSettings(min_jump_fraction=1e9))
    assert fixed.summary["refused"] == [] and fixed.ok[i]  # the wrong label stands
    out = run(SequenceSettings())
    assert out.summary["refused"] == [i]
    assert out.ok[i] and out.stages[i] == "tracked" and np.abs(out.points_px[i] - truth[i]).max() < 1e-9
