"""The serving simulator: step-time models and calibrations (stepmodel.py)."""
