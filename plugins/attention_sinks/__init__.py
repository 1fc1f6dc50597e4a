"""Attention sinks: ACT (Yu et al. 2024) as its own analysis.

- `analysis`: `attention-sinks`, which finds sink tokens per head, chooses the
  heads to calibrate on a calibration split (ACT's head filtering) and measures
  the calibration on a held-out split against the uncalibrated model, every head
  calibrated, and layer-matched random heads;
- `data`: the neutral text of the fluency guard.

Sink detection and the calibration edit are core primitives
(`core.tracing.find_sinks`, `core.tracing.SinkCalibration`), shared with
attention-modulation's `sink_beta`.
"""

from headscope.core.hookspecs import hookimpl

from .analysis import AttentionSinks


@hookimpl
def register_analyses(register):
    register(AttentionSinks)
